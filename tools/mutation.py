#!/usr/bin/env python3
"""Mutation testing of lrprune-caffe's core modules: do the tests notice a planted bug?

    python tools/mutation.py                       # every module, 30 sampled mutants each
    python tools/mutation.py --modules sparse,fileutil --sample 0 --json out.json
    python tools/mutation.py --rerun out.json      # only the survivors of an earlier run
    python tools/mutation.py --list                # how many mutants each module has

A small self-contained AST mutator (no dependency; mutmut 3 mutates every function
of a tree it copies and has no sampling, cosmic-ray rewrites files in place from a
session database - both awkward for a sampled run on a shared 2-core machine).
Each mutant changes one thing:

* comparison swaps: ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``==`` <-> ``!=``, ``in`` <-> ``not in``,
  ``is`` <-> ``is not``;
* ``and`` <-> ``or``; ``not x`` -> ``x``; ``-x`` -> ``x``;
* arithmetic: ``+`` <-> ``-``, ``*`` <-> ``/``, ``//`` -> ``/`` (also in ``+=`` ...);
* constants: an int n -> n + 1 and n - 1, a float x -> x + 1, ``True`` <-> ``False``;
* ``return X`` -> ``return None``;
* removed statements: a call statement, ``raise``, an assignment to an attribute or
  item, an augmented assignment (each becomes ``pass``).

Docstrings, other strings, f-strings, annotations, ``__all__`` and lines marked
``# pragma: no mutate`` are left alone. Every module is mutated in a private copy of
the repository (``../shared`` linked beside it, so the tests see the golden corpus);
each of the module's test files (``GROUPS``) runs once unmutated under a line tracer that
notes which test executes which line; per mutant, those tests run, one file at a time
(most targeted first) with ``pytest -x`` and a timeout of ``--timeout-factor`` (5) x the
module's traced time, at least 120 s;
if they all pass, the whole files run again before the mutant counts as surviving. A mutant is *killed*
when a test fails (or the run errs or times out) and *survives* when all pass.
Mutants on lines no test file executes in-process are not run: they survive as "not
covered" (lines reached only in a subprocess count as not executed). ``EQUIVALENT``
lists survivors judged to change no behaviour, with the reason; the score is
killed / (sampled - equivalent). ``--rerun`` runs an earlier run's survivors again and
prints the scores of the two runs combined (the same sample, after new tests).

This is a developer tool: it takes tens of minutes and is not part of CI.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: module group -> (source files, glob patterns allowed; test files, fastest / most targeted first)
GROUPS = {
    "io.wire": (["lrprune_caffe/io/wire.py"],
                ["tests/test_wire.py", "tests/test_proto.py", "tests/test_io_golden.py", "tests/test_sparse.py"]),
    "io.caffe": (["lrprune_caffe/io/caffe.py", "lrprune_caffe/io/prototxt.py", "lrprune_caffe/io/caffemodel.py"],
                 ["tests/test_caffemodel_codec.py", "tests/test_io_golden.py", "tests/test_bad_input.py",
                  "tests/test_bad_input_classes.py", "tests/test_proto.py", "tests/test_cli_io.py"]),
    "ir.layers": (["lrprune_caffe/ir/layers/*.py"],
                  ["tests/test_layer_shapes.py", "tests/test_layers_mutants.py", "tests/test_registry.py",
                   "tests/test_onnx_activations.py",
                   "tests/test_ssd.py", "tests/test_onnx.py", "tests/test_io_golden.py",
                   "tests/test_torch_model.py", "tests/test_prune.py"]),  # to_torch, channel shrinking
    "lowrank": (["lrprune_caffe/lowrank/*.py"],
                ["tests/test_lowrank_mutants.py", "tests/test_decompose.py", "tests/test_datafit.py",
                 "tests/test_latency.py", "tests/test_factorize.py", "tests/test_calibrate.py"]),
    "masks": (["lrprune_caffe/transforms/prune.py", "lrprune_caffe/ir/masks.py"],
              ["tests/test_masks.py", "tests/test_prune.py", "tests/test_compress_prune.py", "tests/test_calibrate.py",
               "tests/test_finetune.py", "tests/test_sparse.py"]),
    "export.sparse": (["lrprune_caffe/export/sparse.py"], ["tests/test_sparse.py"]),
    "fileutil": (["lrprune_caffe/fileutil.py"],
                 ["tests/test_fileutil.py", "tests/test_fileutil_mutants.py", "tests/test_cli_robustness.py",
                  "tests/test_bad_input.py"]),
}

#: mutant id -> why it changes no behaviour (ids as printed by this tool); judged by hand
EQUIVALENT: dict[str, str] = {
    "lrprune_caffe/io/caffemodel.py::merge_weights::4 -> 3":
        "len(e) <= 3: a 4-D e only reaches this test when e != arr.shape, where (1,)*0 + e == arr.shape is false",
    "lrprune_caffe/io/caffemodel.py::caffemodel_chunks::1 -> 0 #2":
        "chunks[-0] is chunks[-1]: the name is the only chunk yet",
    "lrprune_caffe/ir/layers/conv.py::ConvolutionSpec.infer::n + 2 * p < k or out < 1 -> n + 2 * p < k and out < 1":
        "n + 2p < k implies out = (n + 2p - k) // stride + 1 < 1",
    "lrprune_caffe/ir/layers/dense.py::InnerProductSpec.weight_shapes::0 -> -1":
        "in_shapes[-1] is in_shapes[0]: one bottom",
    "lrprune_caffe/ir/layers/normalization.py::LRNSpec.to_torch::1 -> 0":
        "pre = n // 2 equals (n - 1) // 2 for the odd local_size Caffe requires (even ones are refused above)",
    "lrprune_caffe/lowrank/svd_methods.py::svd::0 -> 1 #2": "G.shape[1] == G.shape[0]: a Gram matrix is square",
    "lrprune_caffe/lowrank/svd_methods.py::svd::0 -> -1 #2": "G.shape[-1] == G.shape[0]: a Gram matrix is square",
    "lrprune_caffe/lowrank/svd_methods.py::svd::0 -> 1": "default seed of the randomized route: any seed is as valid",
    "lrprune_caffe/lowrank/latency_budget.py::interp_2d::0 -> -1 #10":
        "u < 0 only for x2 < g2[0], which is outside the grid and masked to NaN (inside: x2 >= g2[j])",
    "lrprune_caffe/lowrank/datafit.py::<module>::128 -> 129": "the im2col buffer size: memory only, same result",
    "lrprune_caffe/lowrank/datafit.py::relu_targets::f0 > t -> f0 >= t":
        "only on an exact tie f0 == f1, where z0 and z1 both minimize the same objective (and are equal, 0, "
        "unless p < 0 < z0 with mu (t - p)^2 / (1 + mu) == t^2 exactly)",
    "lrprune_caffe/ir/layers/structure.py::SoftmaxSpec.to_onnx::ctx.opset >= 13 -> ctx.opset > 13":
        "at opset 13 the Transpose-Softmax(last axis)-Transpose route computes the same softmax over the axis",
    "lrprune_caffe/ir/layers/pooling.py::caffe_pool2d::w + 2 * pw -> w - 2 * pw":
        "only more -inf / 0 padding on the right: the extra windows lie past ow and are cut by [:, :, :oh, :ow]",
    "lrprune_caffe/lowrank/svd_methods.py::_ensure_vectors::res.side == 'left' -> res.side != 'left'":
        "only which vectors count as already there: the other side is None, so they are recomputed, same result",
    "lrprune_caffe/lowrank/svd_methods.py::left_vectors::0 -> 1":
        "default seed of the randomized route: any seed is as valid",
    "lrprune_caffe/transforms/prune.py::smallest_k_masks::1 -> 2 #3":
        "keep.reshape(-2) is keep.reshape(-1): numpy takes any negative size as the unknown one",
    "lrprune_caffe/export/sparse.py::_sparse_of::1 -> 2": "arr.reshape(-2) is arr.reshape(-1) in numpy",
    "lrprune_caffe/export/sparse.py::csr_relative_bytes::1 -> 2 #6":
        "rows per processing block: memory only, same count",
    "lrprune_caffe/export/sparse.py::caffemodel_layer_bytes::7 -> 8": "field 8's key is one byte, as field 7's",
    "lrprune_caffe/io/prototxt.py::_looks_binary::return False -> return None":
        "every caller tests it with if: None is falsy",
    "lrprune_caffe/io/prototxt.py::_state_meets_rule::return False -> return None #5":
        "its callers take any() of it: None is falsy",
    "lrprune_caffe/io/caffemodel.py::caffemodel_size::100 -> 101": "field 101's key is two bytes, as field 100's",
    "lrprune_caffe/io/caffemodel.py::caffemodel_size::100 -> 99": "field 99's key is two bytes, as field 100's",
    "lrprune_caffe/io/wire.py::blob_size::1 -> 2 #2": "a size only: field 2's key is one byte, as field 1's",
    "lrprune_caffe/io/wire.py::blob_size::1 -> 0 #2": "a size only: field 0's key is one byte, as field 1's",
    "lrprune_caffe/export/sparse.py::caffemodel_layer_bytes::1 -> 2": "field 2's key is one byte, as field 1's",
    "lrprune_caffe/export/sparse.py::caffemodel_layer_bytes::100 -> 101":
        "field 101's key is two bytes, as field 100's",
    "lrprune_caffe/fileutil.py::_default_mode::0 -> 1":
        "umask(1) only to read the old umask, which is put back at once",
    "lrprune_caffe/fileutil.py::OutputSet.__init__::False -> True":
        "_created is empty until a folder is made, so the rmdir loop has nothing to remove",
    "lrprune_caffe/fileutil.py::OutputSet.__exit__::return False -> return None":
        "None is falsy: the exception propagates",
    "lrprune_caffe/fileutil.py::_check_not_input::not same and path.exists() -> not same or path.exists()":
        "the extra calls are when same already holds (realpaths equal, inp exists, so path exists and "
        "samefile is True) or when path does not exist (samefile raises OSError, suppressed)",
    "lrprune_caffe/fileutil.py::_alive::0 -> -1":
        "kill(pid, -1): a gone pid still gives ESRCH (looked up before the signal number), a live one "
        "EINVAL or EPERM, an OSError: alive, as kill(pid, 0) says",
    "lrprune_caffe/fileutil.py::OutputSet._abort::self._signals.__exit__(None, None, None) -> pass":
        "the next line drops the only reference to the generator context manager; CPython closes the "
        "generator at once and its finally restores the SIGTERM handler (test_output_set_restores_the_"
        "sigterm_handler passes either way)",
}

_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div}


@dataclass
class Mutant:
    id: str
    module: str
    path: str
    line: int
    index: int           # position of the node in the pre-order walk
    kind: str
    arg: object          # which op / which constant change
    before: str
    after: str
    status: str = "pending"   # killed | survived | not covered | timeout | error | equivalent
    seconds: float = 0.0
    detail: str = ""
    covered: bool = True


# ---- finding and applying mutations -----------------------------------------------------

def _walk(tree):
    """[(node, parent, qualname)] in a fixed pre-order, without docstrings, annotations,
    f-strings, ``__all__`` and ``if __name__ == "__main__"`` blocks."""
    out = []

    def skip(child, node):
        if isinstance(child, ast.JoinedStr):
            return True
        if isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant):
            return True  # docstrings and bare strings
        if isinstance(node, ast.arg) and child is node.annotation:
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and child is node.returns:
            return True
        if isinstance(node, ast.AnnAssign) and child is node.annotation:
            return True
        if isinstance(child, (ast.Assign, ast.AnnAssign)):
            targets = child.targets if isinstance(child, ast.Assign) else [child.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                return True
        if isinstance(child, ast.If) and "__main__" in ast.unparse(child.test):
            return True
        return False

    def visit(node, qual):
        for child in ast.iter_child_nodes(node):
            if skip(child, node):
                continue
            q = qual
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                q = f"{qual}.{child.name}" if qual else child.name
            out.append((child, node, q))
            visit(child, q)
    visit(tree, "")
    return out


def _options(node, parent):
    """[(kind, arg)] of the mutations of one node."""
    opts = []
    if isinstance(node, ast.Compare):
        opts += [("cmp", i) for i, op in enumerate(node.ops) if type(op) in _CMP_SWAP]
    elif isinstance(node, ast.BoolOp):
        opts.append(("boolop", None))
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BIN_SWAP:
        opts.append(("binop", None))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        opts.append(("unary", None))
    elif isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool):
            opts.append(("const", not v))
        elif isinstance(v, int):
            opts += [("const", v + 1), ("const", v - 1)]
        elif isinstance(v, float):
            opts.append(("const", v + 1.0))
    if isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        opts.append(("return", None))
    removable = (isinstance(node, (ast.Expr, ast.Raise, ast.AugAssign))
                 or (isinstance(node, ast.Assign) and all(isinstance(t, (ast.Attribute, ast.Subscript))
                                                          for t in node.targets)))
    if removable and isinstance(node, ast.stmt):
        opts.append(("remove", None))
    return opts


def _replace_child(parent, old, new):
    for name, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, name, new)
            return
        if isinstance(value, list):
            for i, v in enumerate(value):
                if v is old:
                    value[i] = new
                    return
    raise LookupError("child not found")


def _apply(node, parent, kind, arg):
    """Mutate ``node`` in place (or replace it in ``parent``); returns the node now there."""
    if kind == "cmp":
        node.ops[arg] = _CMP_SWAP[type(node.ops[arg])]()
        return node
    if kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return node
    if kind == "binop":
        node.op = _BIN_SWAP[type(node.op)]()
        return node
    if kind == "unary":
        _replace_child(parent, node, node.operand)
        return node.operand
    if kind == "const":
        node.value = arg
        return node
    if kind == "return":
        node.value = ast.Constant(None)
        return node
    if kind == "remove":
        new = ast.Pass()
        ast.copy_location(new, node)
        _replace_child(parent, node, new)
        return new
    raise ValueError(kind)


def _short(node) -> str:
    s = ast.unparse(node).strip().splitlines()[0]
    return s if len(s) <= 70 else s[:67] + "..."


def find_mutants(module: str, relpath: str, src: str = None) -> list:
    """Every mutant of one file (``src``: its text, by default the file in ROOT)."""
    src = (ROOT / relpath).read_text() if src is None else src
    lines = src.splitlines()
    tree = ast.parse(src)
    out, seen = [], {}
    for index, (node, parent, qual) in enumerate(_walk(tree)):
        line = getattr(node, "lineno", None)
        if line is None or "pragma: no mutate" in lines[line - 1]:
            continue
        for kind, arg in _options(node, parent):
            before = _short(node)
            if kind == "unary":
                after = _short(node.operand)
            elif kind == "remove":
                after = "pass"
            else:  # changed in place: apply to a copy
                after = _short(_apply(copy.deepcopy(node), None, kind, arg))
            key = f"{relpath}::{qual or '<module>'}::{before} -> {after}"
            seen[key] = seen.get(key, 0) + 1
            mid = key if seen[key] == 1 else f"{key} #{seen[key]}"
            out.append(Mutant(mid, module, relpath, line, index, kind, arg, before, after))
    return out


def mutant_source(m: Mutant, src: str) -> str:
    """``src`` (the text ``m`` was found in) with ``m`` applied."""
    tree = ast.parse(src)
    walk = _walk(tree)
    if m.index >= len(walk) or _short(walk[m.index][0]) != m.before:
        raise LookupError(f"{m.path} changed since its mutants were listed")
    node, parent, _ = walk[m.index]
    _apply(node, parent, m.kind, m.arg)
    return ast.unparse(tree) + "\n"


def group_files(module: str) -> list:
    files = []
    for pat in GROUPS[module][0]:
        found = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pat) if p.name != "__init__.py" or "*" not in pat)
        if not found:
            raise SystemExit(f"{module}: no source file matches {pat!r} (moved? update GROUPS)")
        files += found
    missing = [t for t in GROUPS[module][1] if not (ROOT / t).exists()]
    if missing:
        raise SystemExit(f"{module}: test file(s) {', '.join(missing)} not found (update GROUPS)")
    return files


# ---- a line tracer, loaded into pytest as a plugin (-p mutation) -------------------------

_HITS: dict = {}      # file -> line -> {test node ids that executed it ("" = outside any test)}
_CURRENT = [""]       # the node id of the test running now


def pytest_configure(config):
    files = os.environ.get("MUTATION_TRACE_FILES")
    if not files:
        return
    wanted = set(files.split(os.pathsep))

    def local(frame, event, arg):
        if event == "line":
            _HITS[frame.f_code.co_filename].setdefault(frame.f_lineno, set()).add(_CURRENT[0])
        return local

    def glob(frame, event, arg):
        fn = frame.f_code.co_filename
        if fn in wanted:
            _HITS.setdefault(fn, {}).setdefault(frame.f_lineno, set()).add(_CURRENT[0])
            return local
        return None
    sys.settrace(glob)
    threading.settrace(glob)


def pytest_runtest_logstart(nodeid, location):
    _CURRENT[0] = nodeid


def pytest_runtest_logfinish(nodeid, location):
    _CURRENT[0] = ""


def pytest_unconfigure(config):
    out = os.environ.get("MUTATION_TRACE_OUT")
    if out:
        sys.settrace(None)
        Path(out).write_text(json.dumps({f: {str(ln): sorted(ids) for ln, ids in lines.items()}
                                         for f, lines in _HITS.items()}))


# ---- running ----------------------------------------------------------------------------

class Workspace:
    """A private copy of the repository (../shared linked beside it) to mutate."""

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="lrprune-mutation-"))
        shared = ROOT.parent / "shared"
        if shared.exists():
            os.symlink(shared, self.base / "shared")
        self.repo = self.base / ROOT.name
        shutil.copytree(ROOT, self.repo, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info"))

    def pytest(self, tests, timeout, env_extra=None):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.repo), str(self.repo / "tools")]),
                   PYTHONDONTWRITEBYTECODE="1", **(env_extra or {}))
        env.pop("CI", None)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "--no-header", "-p", "no:cacheprovider",
               "-o", "addopts=", *tests]
        if env_extra and "MUTATION_TRACE_FILES" in env_extra:
            cmd[3:3] = ["-p", "mutation"]
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=self.repo, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - t0, ""
        tail = [ln for ln in p.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))][:1]
        return p.returncode, time.monotonic() - t0, (tail[0] if tail else p.stdout.strip()[-200:])

    def close(self):
        shutil.rmtree(self.base, ignore_errors=True)


def baseline(ws: Workspace, module: str):
    """(seconds, {test file: {relpath: covered lines}}) of the module's tests on the unmutated
    code: each test file runs alone under the line tracer, so a mutant runs only the files that
    execute its line."""
    files = group_files(module)
    env = {"MUTATION_TRACE_FILES": os.pathsep.join(str(ws.repo / f) for f in files)}
    cov, total = {}, 0.0
    for i, test in enumerate(GROUPS[module][1]):
        trace = ws.base / f"trace-{module}-{i}.json"
        rc, secs, detail = ws.pytest([test], timeout=1800, env_extra=dict(env, MUTATION_TRACE_OUT=str(trace)))
        if rc not in (0, 5):
            raise SystemExit(f"{module}: {test} fails without any mutation ({detail})")
        total += secs
        hits = json.loads(trace.read_text()) if trace.exists() else {}
        cov[test] = {f: {int(ln): set(ids) for ln, ids in hits.get(str(ws.repo / f), {}).items()} for f in files}
    return total, cov  # traced time: an upper bound of the untraced one, for the timeout


def run_mutant(ws: Workspace, m: Mutant, selections, timeout):
    """``selections``: [(test file, node ids or None = the whole file)], most targeted first.
    First only the tests that executed the mutant's line run, one file at a time with ``-x``
    until one fails; a mutant they all pass runs the whole files again (a test may check what
    a module-scoped fixture, traced under another test, computed) before it counts as survived."""
    target = ws.repo / m.path
    original = target.read_text()
    rc, secs, detail = 0, 0.0, ""
    try:
        target.write_text(mutant_source(m, original))
        for whole in (False, True):
            if whole and not any(ids for _, ids in selections):
                break  # the first pass already ran whole files
            for test, ids in selections:
                rc, s, detail = ws.pytest([test] if whole or not ids else sorted(ids), timeout)
                secs += s
                if rc not in (0, 5):
                    break
            if rc not in (0, 5):
                break
    except LookupError as e:
        rc, secs, detail = "stale", 0.0, str(e)
    finally:
        target.write_text(original)
    m.seconds = round(secs, 1)
    m.detail = detail
    m.status = {0: "survived", 1: "killed", "timeout": "timeout", "stale": "stale"}.get(
        rc, "error" if rc != 5 else "survived")


def score(ms):
    judged = [m for m in ms if m.status not in ("equivalent", "stale")]
    killed = sum(m.status in ("killed", "timeout", "error") for m in judged)
    return killed, len(judged)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", help=f"comma-separated, of: {', '.join(GROUPS)} (default all)")
    ap.add_argument("--sample", type=int, default=30, help="mutants per module, 0 = all (default 30)")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--json", help="write every mutant and its outcome here")
    ap.add_argument("--timeout-factor", type=float, default=5.0,
                    help="a mutant's run times out after this many times the traced run (default 5); a "
                         "timeout counts as killed, so under heavy load raise it")
    ap.add_argument("--rerun", help="rerun only the survivors listed in an earlier --json file")
    ap.add_argument("--list", action="store_true", help="count the mutants per module and exit")
    ap.add_argument("--run-uncovered", action="store_true", help="also run mutants on lines no test executes")
    a = ap.parse_args(argv)
    modules = a.modules.split(",") if a.modules else list(GROUPS)
    for mod in modules:
        if mod not in GROUPS:
            ap.error(f"unknown module {mod!r}; choose from {', '.join(GROUPS)}")

    if a.list:
        for mod in modules:
            n = sum(len(find_mutants(mod, f)) for f in group_files(mod))
            print(f"{mod:14s} {n:5d} mutants in {len(group_files(mod))} file(s)")
        return 0
    workspaces = [Workspace() for _ in range(max(1, a.jobs))]
    pristine = workspaces[0].repo  # mutants are listed from the copy they are applied to

    def mutants_of(mod):
        return [m for f in group_files(mod) for m in find_mutants(mod, f, (pristine / f).read_text())]

    chosen = {}
    if a.rerun:
        old = json.loads(Path(a.rerun).read_text())["mutants"]
        want = {m["id"] for m in old if m["status"] in ("survived", "not covered")}
        for mod in modules:
            ms = [m for m in mutants_of(mod) if m.id in want]
            if ms:
                chosen[mod] = ms
        gone = want - {m.id for ms in chosen.values() for m in ms}
        if gone:
            print(f"{len(gone)} earlier survivors no longer exist as mutants (code changed)")
    else:
        for mod in modules:
            ms = mutants_of(mod)
            rng = random.Random(f"{a.seed}:{mod}")
            chosen[mod] = sorted(rng.sample(ms, a.sample) if 0 < a.sample < len(ms) else ms,
                                 key=lambda m: (m.path, m.line, m.index))

    results, t_start = {}, time.monotonic()
    try:
        for mod, ms in chosen.items():
            secs, cov = baseline(workspaces[0], mod)
            timeout = max(120.0, a.timeout_factor * secs)
            print(f"== {mod}: {len(ms)} mutants, tests {' '.join(GROUPS[mod][1])} ({secs:.0f} s unmutated)",
                  flush=True)
            todo = []
            tests_of = {}
            for m in ms:
                tests_of[m.id] = []
                for t in GROUPS[mod][1]:
                    ids = cov[t].get(m.path, {}).get(m.line)
                    if ids:  # executed outside any test (import, collection): the whole file
                        tests_of[m.id].append((t, None if "" in ids else ids))
                m.covered = bool(tests_of[m.id])
                if m.id in EQUIVALENT:
                    m.status, m.detail = "equivalent", EQUIVALENT[m.id]
                elif not m.covered and not a.run_uncovered:
                    m.status = "not covered"
                    print(f"  {m.status}     {m.path}:{m.line}  {m.before}  ->  {m.after}", flush=True)
                else:
                    todo.append(m)
            free = list(workspaces)
            lock = threading.Lock()

            def work(m):
                with lock:
                    ws = free.pop()
                try:
                    run_mutant(ws, m, tests_of[m.id] or [(t, None) for t in GROUPS[mod][1]], timeout)
                finally:
                    with lock:
                        free.append(ws)
                print(f"  {m.status:8s} {m.seconds:5.1f}s  {m.path}:{m.line}  {m.before}  ->  {m.after}", flush=True)
            with ThreadPoolExecutor(len(workspaces)) as pool:
                list(pool.map(work, todo))
            results[mod] = ms
            if a.json:  # after every module: a crash or ^C keeps what was done
                write_json(a.json, a, results)
    finally:
        for ws in workspaces:
            ws.close()

    if a.rerun:  # the earlier run's sample, its survivors replaced by this run's outcome
        print(f"\n(reran {sum(map(len, results.values()))} survivors of {a.rerun})")
        redone = {m.id: m for ms in results.values() for m in ms}
        results = {}
        for d in json.loads(Path(a.rerun).read_text())["mutants"]:
            if d["module"] in modules:
                m = redone.get(d["id"]) or Mutant(**d)
                if m.id in EQUIVALENT and m.status in ("survived", "not covered"):
                    m.status, m.detail = "equivalent", EQUIVALENT[m.id]
                results.setdefault(d["module"], []).append(m)
    print(f"\nmutation score per module ({time.monotonic() - t_start:.0f} s):")
    for mod, ms in results.items():
        k, n = score(ms)
        unc = sum(m.status == "not covered" for m in ms)
        eq = sum(m.status == "equivalent" for m in ms)
        to = sum(m.status == "timeout" for m in ms)
        print(f"  {mod:14s} {k:3d}/{n:<3d} killed  {100 * k / max(n, 1):5.1f}%"
              f"   ({to} of them timeouts, {unc} not covered, {eq} equivalent excluded)")
    surv = [m for ms in results.values() for m in ms if m.status in ("survived", "not covered")]
    if surv:
        print("\nsurviving mutants:")
        for m in surv:
            print(f"  [{m.status}] {m.path}:{m.line}  {m.before}  ->  {m.after}\n      id: {m.id}")
    if a.json:
        write_json(a.json, a, results)
    return 0


def write_json(path, a, results):
    Path(path).write_text(json.dumps({"seed": a.seed, "sample": a.sample, "mutants": [
        asdict(m) for ms in results.values() for m in ms]}, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
