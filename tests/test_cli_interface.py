"""Issue 11, item 3: one interface. -o/--output everywhere, a blob is --output-blob, every
flag an error message suggests exists, global flags anywhere, exit statuses 0/1/2/3, and
a flag without effect is an error."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

import sys

from lrprune_caffe.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lrprune_caffe"
EXAMPLE = ROOT / "examples" / "lenet"
PROTO, MODEL = EXAMPLE / "lenet.prototxt", EXAMPLE / "lenet.caffemodel"


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def commands() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sub.choices)


def flags_of(p) -> set:
    return set(p._option_string_actions)


def test_every_writing_command_takes_dash_o_output_and_force():
    cmds = commands()
    writers = {name for name, p in cmds.items() if "-o" in flags_of(p)}
    assert writers == {"convert", "compress", "export-onnx", "finetune", "pipeline"}
    for name in writers:
        assert {"-o", "--output", "--force"} <= flags_of(cmds[name]), name
    for name in ("evaluate", "finetune"):
        assert "--output-blob" in flags_of(cmds[name])
    assert "--output" not in flags_of(cmds["evaluate"])  # a blob is never --output


def test_outdir_is_a_hidden_deprecated_alias(tmp_path, capsys):
    rc, out, err = run(capsys, "convert", PROTO, "--outdir", tmp_path / "o")
    assert rc == 0 and (tmp_path / "o" / "model.prototxt").exists()
    assert "--outdir is deprecated" in err
    assert "--outdir" not in commands()["finetune"].format_help()


def test_missing_output_is_a_usage_error(capsys):
    rc, out, err = run(capsys, "convert", PROTO)
    assert rc == 2 and "-o/--output" in err and len(err.strip().splitlines()) == 1


# which commands an error message of a module is about (flags there must exist in one of them)
MODULE_COMMANDS = {
    "core/compress.py": {"compress"}, "transforms/prune.py": {"compress"},
    "transforms/structured_prune.py": {"compress"}, "core/pipeline.py": {"pipeline"},
    "engines/evaluate.py": {"evaluate", "finetune"}, "train": {"finetune", "pipeline"},
    "cli/compress.py": {"compress", "verify"}, "cli/export.py": {"export-onnx", "bench"},
    "cli/train.py": {"evaluate", "finetune", "pipeline"}, "export/onnx.py": {"export-onnx", "compress"},
}
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*[a-z0-9])")


def _message_strings(tree):
    """String pieces of the raise statements (error messages) of a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.value


def suggested_flags():
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        tree = ast.parse(path.read_text())
        for text in _message_strings(tree):
            for flag in FLAG.findall(text):
                found.append((rel, flag, text))
    return found


def named_commands(text, cmds) -> set:
    """Commands a message names in parentheses, e.g. "(evaluate, finetune)"."""
    found = set()
    for group in re.findall(r"\(([a-z-]+(?:, [a-z-]+)*)\)", text):
        names = group.split(", ")
        if all(n in cmds for n in names):
            found.update(names)
    return found


def test_every_flag_an_error_message_suggests_exists():
    cmds = commands()
    found = suggested_flags()
    assert len(found) > 40  # the scan sees the messages
    bad = []
    for rel, flag, text in found:
        key = next((k for k in MODULE_COMMANDS if rel == k or rel.startswith(k + "/")), None)
        names = MODULE_COMMANDS.get(key) or set(cmds)
        names = named_commands(text, cmds) or names
        if not any(flag in flags_of(cmds[n]) for n in names):
            bad.append(f"{rel}: {flag} (not a flag of {sorted(names)}): {text!r}")
    assert not bad, "\n".join(bad)


def test_pipeline_suggestions_are_pipeline_flags(tmp_path, capsys):
    """The issue's case: on a net with two outputs pipeline suggested --output BLOB, which it does not
    take; every flag its message names belongs to pipeline or to the commands the message names."""
    pytest.importorskip("torch")
    from conftest import SHARED, require_shared
    split = require_shared(SHARED / "data" / "mnist5k_split.npz")
    two = tmp_path / "two.prototxt"
    two.write_text(PROTO.read_text() + '\nlayer { name: "extra" type: "Softmax" bottom: "ip2" top: "extra" }\n')
    rc, out, err = run(capsys, "pipeline", two, MODEL, "--data-split", split, "-o", tmp_path / "o",
                       "--schedule", "han", "--max-epochs", "1")
    assert rc == 2 and "2 outputs" in err, err
    cmds = commands()
    for flag in FLAG.findall(err):
        assert any(flag in flags_of(cmds[c]) for c in {"pipeline"} | named_commands(err, cmds)), err


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_flags_before_or_after_the_command(tmp_path, capsys, where):
    g = ["--quiet", "--debug"]
    argv = [*g, "inspect", PROTO] if where == "before" else ["inspect", PROTO, *g]
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and "total:" in out
    argv = [*g, "convert", PROTO, "-o", tmp_path / "o"] if where == "before" else \
        ["convert", PROTO, "-o", tmp_path / "o", *g]
    assert run(capsys, *argv)[0] == 0


def test_exit_statuses(tmp_path, capsys, monkeypatch):
    assert run(capsys, "inspect", PROTO)[0] == 0
    assert run(capsys, "inspect", tmp_path / "nope.prototxt")[0] == 2
    assert run(capsys, "inspect", "--no-such-flag")[0] == 2
    # 1: a check failed
    pytest.importorskip("onnxruntime")
    other = tmp_path / "other.caffemodel"
    from lrprune_caffe.io.caffe import load_net, save_caffemodel
    net = load_net(PROTO, MODEL)
    net.layer("ip2").blobs[1] = net.layer("ip2").blobs[1] + np.arange(10, dtype=np.float32)  # not softmax-invariant
    save_caffemodel(net, other)
    rc, out, err = run(capsys, "verify", PROTO, MODEL, PROTO, other, "--max-rel-l2", "1e-6")
    assert rc == 1 and "FAIL" in out


@pytest.mark.parametrize("debug", [False, True])
def test_internal_error_is_exit_3(capsys, monkeypatch, debug):
    from lrprune_caffe import api

    def bug(*a, **k):
        raise ZeroDivisionError("a bug\nof ours")
    monkeypatch.setattr(api, "inspect_net", bug)
    rc, out, err = run(capsys, *(["--debug"] if debug else []), "inspect", PROTO)
    assert rc == 3
    last = err.strip().splitlines()[-1]
    assert last.startswith("lrprune-caffe: error: internal error: ZeroDivisionError: a bug of ours")
    assert ("Traceback" in err) == debug
    if not debug:
        assert len(err.strip().splitlines()) == 1 and "--debug" in last


def test_protobuf_version_error_is_one_line(capsys, monkeypatch):
    """What a downgraded protobuf gives when onnx's generated code loads (runtime_version.VersionError)."""
    from lrprune_caffe import api
    VersionError = type("VersionError", (Exception,), {"__module__": "google.protobuf.runtime_version"})

    def broken(*a, **k):
        raise VersionError("Detected mismatched Protobuf Gencode/Runtime major versions when loading "
                           "onnx/onnx-ml.proto: gencode 6.31.1 runtime 3.20.3")
    monkeypatch.setattr(api, "inspect_net", broken)
    rc, out, err = run(capsys, "inspect", PROTO)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "protobuf" in err and "pip install -U 'protobuf>=4.21'" in err


def test_python_and_numpy_warnings_become_notes(capsys, monkeypatch):
    from lrprune_caffe import api
    real = api.inspect_net

    def noisy(*a, **k):
        np.float32(3e38) * np.float32(10)  # overflow
        np.array([1.0]) / np.array([0.0])  # divide by zero
        return real(*a, **k)
    monkeypatch.setattr(api, "inspect_net", noisy)
    rc, out, err = run(capsys, "inspect", PROTO)
    assert rc == 0
    assert not re.search(r"\.py:\d+: RuntimeWarning", err), err  # never the raw form
    notes = [line for line in err.splitlines() if "RuntimeWarning" in line]
    assert len(notes) == 2 and all(line.startswith("lrprune-caffe: note: RuntimeWarning: ") for line in notes)


def test_commands_are_imported_explicitly():
    src = (PKG / "cli" / "main.py").read_text()
    assert "importlib" not in src
    for mod in ("compress", "export", "evaluate", "train"):
        tree = ast.parse((PKG / "cli" / f"{mod}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").endswith("main"), f"cli/{mod}.py imports cli.main"
    assert len(sys.modules['lrprune_caffe.cli.main'].COMMAND_MODULES) == 4


# ---- flags that would do nothing -------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--prune", "0.5", "--quality", "1.0"], "--quality is the Q of --prune-method std"),
    (["--rank", "4", "--hooi", "2"], "--hooi refines Tucker-2"),
    (["--prune", "0"], "nothing would be pruned"),
    (["--prune", "conv1=0,ip1=0"], "nothing would be pruned"),
    (["--prune-method", "std", "--quality", "1", "--prune-exclude", "conv1,conv2,ip1,ip2"], "no layer to prune"),
])
def test_flags_without_effect_are_errors(tmp_path, capsys, argv, needle):
    rc, out, err = run(capsys, "compress", PROTO, MODEL, "-o", tmp_path / "o", "--no-verify", *argv)
    assert rc == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_std_with_layer_zero_leaves_only_that_layer_out(tmp_path, capsys):
    """The std error message recommends LAYER=0; it pruned nothing before."""
    import json
    rc, out, err = run(capsys, "compress", PROTO, MODEL, "-o", tmp_path / "o", "--no-verify", "--prune", "conv1=0",
                       "--prune-method", "std", "--quality", "1.0", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    pruned = {r["name"] for r in rep["layers"] if (r.get("sparsity") or 0) > 0}
    assert pruned == {"conv2", "ip1", "ip2"}, [(r["name"], r.get("sparsity")) for r in rep["layers"]]
