"""Every command in README.md and examples/*/README.md works as written and its stated result holds.

A command's stated result is what the text after it says, up to the next command: a
``#=>`` line in its block, else the paragraph after the block. Parsed forms:
``top-1 A% -> B%`` (compress: original -> compressed, on its --labels), ``top-1 A%`` (evaluate),
``N of M rounds reach the goal; final top-1 A%`` (pipeline). Numbers hold within TOL points.
Long commands run with a small epoch cap (``--max-epochs``, appended: the last flag wins).
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from conftest import ROOT
from lrprune_caffe.cli.main import main

TOL = 0.6  # percentage points: a stated "97.10%" holds for 96.5 .. 97.7
EPOCH_CAP = "1"  # the example pipeline needs at most 1 epoch per round (examples/lenet/README.md)
NOT_RUN = {  # commands a test must not run, and why
    "python examples/lenet/train_lenet.py": "retrains and overwrites the shipped example model",
}


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.*?)\n```", text, flags=re.S)


def documented_commands():
    """(readme, command line, stated result text) for every command of the READMEs."""
    out = []
    for path in [ROOT / "README.md", *sorted(ROOT.glob("examples/*/README.md"))]:
        text = path.read_text()
        blocks = list(re.finditer(r"```sh\n(.*?)\n```", text, flags=re.S))
        pending = []  # commands of the current block waiting for a stated result
        for i, m in enumerate(blocks):
            after = text[m.end(): blocks[i + 1].start() if i + 1 < len(blocks) else len(text)]
            lines = m.group(1).replace("\\\n", " ").splitlines()
            cmds = []
            for line in lines:
                s = line.strip()
                if s.startswith("#=>") and cmds:
                    cmds[-1][2] += s[3:] + "\n"
                elif s and not s.startswith("#"):
                    cmds.append([path.relative_to(ROOT).as_posix(), s.split(" #")[0].strip(), ""])
            if cmds and not cmds[-1][2]:  # the paragraph after the block states the last one's result
                cmds[-1][2] = after.strip().split("\n\n")[0]
            pending += cmds
        out += [tuple(c) for c in pending]
    return out


def _argv(cmd, tmp_path):
    if "&&" in cmd:
        first, cmd = (c.strip() for c in cmd.split("&&", 1))
        assert first.startswith("pip install"), first
    argv = shlex.split(cmd)
    if argv[0] != "lrprune-caffe":
        return None
    argv = argv[1:]
    for flag in ("-o", "--output"):
        if flag in argv:
            i = argv.index(flag)
            argv[i + 1] = str(tmp_path / "out")
    if argv[0] == "pipeline":
        argv += ["--max-epochs", EPOCH_CAP]
    return argv


def _pct(text):
    return [float(v) for v in re.findall(r"([\d.]+)%", text)]


CASES = [c for c in documented_commands() if not c[1].startswith("pip install -e")]


def test_every_command_is_found():
    cmds = [c[1] for c in CASES]
    assert any(c.startswith("lrprune-caffe pipeline") for c in cmds)
    assert sum("lrprune-caffe compress" in c for c in cmds) >= 2
    assert all(_argv(c, ROOT) is not None or c in NOT_RUN for c in cmds), cmds


@pytest.mark.parametrize("readme, cmd, stated", [
    pytest.param(*c, id=f"{c[0]}:{_argv(c[1], ROOT)[0] if _argv(c[1], ROOT) else 'script'}",
                 marks=[pytest.mark.slow] if "pipeline" in c[1] else [])
    for c in CASES])
def test_command_works_as_written(readme, cmd, stated, tmp_path, monkeypatch, capsys):
    if cmd in NOT_RUN:
        pytest.skip(NOT_RUN[cmd])
    argv = _argv(cmd, tmp_path)
    if argv[0] == "pipeline":
        pytest.importorskip("torch")
    if "--plot" in argv or argv[0] == "pipeline":
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(ROOT)
    rc = main(argv + (["--json"] if argv[0] in ("evaluate", "pipeline") else []) + ["--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    if argv[0] == "compress":
        m = re.search(r"top-1(?: accuracy)? ([\d.]+)% -> ([\d.]+)%", stated)
        assert m, f"{readme}: no stated top-1 for {cmd!r}"
        acc = json.loads((tmp_path / "out" / "report.json").read_text())["verification"]["blobs"]["prob"]
        assert 100 * acc["top1_ref"] == pytest.approx(float(m.group(1)), abs=TOL)
        assert 100 * acc["top1_test"] == pytest.approx(float(m.group(2)), abs=TOL)
        assert "top-1 accuracy" in out
        if "--plot" in argv:
            assert "report.png" in (tmp_path / "out" / "report.md").read_text()
    elif argv[0] == "evaluate":
        stated_top1 = _pct(stated)
        assert stated_top1, f"{readme}: no stated top-1 for {cmd!r}"
        assert 100 * json.loads(out)["top1"] == pytest.approx(stated_top1[0], abs=TOL)
    elif argv[0] == "pipeline":
        m = re.search(r"(\d+) of (\d+) rounds reach the goal; final top-1 ([\d.]+)%", stated)
        assert m, f"{readme}: no stated result for {cmd!r}"
        rep = json.loads(out)
        reached = sum(r["reached"] for r in rep["rounds"])
        assert (reached, len(rep["rounds"])) == (int(m.group(1)), int(m.group(2)))
        assert reached >= 1, "the example reaches its tolerance in at least one round"
        assert 100 * rep["final"]["top1"] == pytest.approx(float(m.group(3)), abs=TOL)
        assert (tmp_path / "out" / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        pytest.fail(f"{readme}: no check for {cmd!r}: say what its result is, and test it here")


def test_main_job_command(tmp_path, monkeypatch, capsys):
    cmds = [c for c in readme_commands() if "lrprune-caffe compress" in c and c.startswith("pip install")]
    assert len(cmds) == 1, "README keeps one install + main-job line"
    assert "\n" not in cmds[0].strip(), "one line"
    argv = shlex.split(cmds[0].split("&&", 1)[1])
    assert argv[0] == "lrprune-caffe"
    argv = argv[1:]
    i = argv.index("-o")
    argv[i + 1] = str(tmp_path / "lenet")
    monkeypatch.chdir(ROOT)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "top-1 accuracy" in out
    assert max(len(line) for line in out.splitlines()) <= 100, "the console summary fits 100 columns"
    rep = json.loads((tmp_path / "lenet" / "report.json").read_text())
    acc = rep["verification"]["blobs"]["prob"]
    assert acc["top1_ref"] > 0.96 and acc["top1_test"] > 0.9
    md = (tmp_path / "lenet" / "report.md").read_text()
    assert "top-1 accuracy 97.10% (original) -> 95.40% (compressed)" in md, "report.md holds the accuracy"
    assert {"model.onnx", "masks.npz", "report.md"} <= {p.name for p in (tmp_path / "lenet").iterdir()}


def test_test_command_matches_ci():
    cmds = [c for c in readme_commands() if "pytest" in c]
    assert cmds and "pip install" in cmds[0]
    test_cmd = cmds[0].split("&&", 1)[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.replace("python ", "python3 ") in ci or test_cmd in ci
