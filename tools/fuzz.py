#!/usr/bin/env python3
"""Fuzz the prototxt and caffemodel readers and the CLI's argument space.

Each case mutates a golden file (``../shared/golden/*``, else ``examples/lenet``):
bit flips, truncations, swapped and duplicated fields, huge varints, wrong wire
types (caffemodel, at the protobuf wire level, top level and inside a layer);
bit flips, truncations, swapped / duplicated / deleted lines, huge numbers and
stray braces (prototxt); or it draws a command line from the parser's own flags
with odd values. It runs ``lrprune-caffe inspect`` (readers) or the drawn command
in-process. Acceptable outcomes only: exit 0, or exit 2 with a one-line error.
Anything else is a finding: another exit status (3 = an unexpected exception), a
traceback or a multi-line error, a case over 10 s, or a crash of the process.

    python tools/fuzz.py --minutes 10            # long run; findings in ./fuzz-findings/
    python tools/fuzz.py --cases 200 --seed 1    # a fixed number of cases

Crashes are caught by running the cases in a worker subprocess that writes each
case to disk before running it; when the worker dies, the parent records that
case as a finding and starts a new worker. ``tests/test_fuzz.py`` drives the same
mutations from hypothesis for a bounded run in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from lrprune_caffe.io import wire  # noqa: E402  (the codec the mutations speak)

GOLDEN = ROOT.parent / "shared" / "golden"
CASE_TIMEOUT = 10  # seconds

# ---- seeds ---------------------------------------------------------------------------


def seed_files() -> list:
    """[(prototxt, caffemodel or None)] of the golden cases (examples/lenet where absent)."""
    pairs = []
    if GOLDEN.is_dir():
        for d in sorted(GOLDEN.iterdir()):
            p, w = d / "model.prototxt", d / "model.caffemodel"
            if p.is_file():
                pairs.append((p, w if w.is_file() and w.stat().st_size < 20 * 2**20 else None))
    if not pairs:
        ex = ROOT / "examples" / "lenet"
        pairs.append((ex / "lenet.prototxt", ex / "lenet.caffemodel"))
    return pairs


# ---- wire-level mutations (caffemodel) ---------------------------------------------------

def _segments(buf: bytes, start: int, end: int):
    """[(start, end, key_end, wire_type, payload_start)] of the fields in buf[start:end], or None."""
    segs, pos = [], start
    try:
        while pos < end:
            s = pos
            key, pos = wire.read_varint(buf, pos, end)
            k_end, wt = pos, key & 7
            if wt == wire.VARINT:
                _, pos = wire.read_varint(buf, pos, end)
            elif wt == wire.I64:
                pos += 8
            elif wt == wire.I32:
                pos += 4
            elif wt == wire.LEN:
                n, pos = wire.read_varint(buf, pos, end)
                pos += n
            else:
                return None
            if pos > end:
                return None
            segs.append((s, pos, k_end, wt, k_end))
    except wire.WireError:
        return None
    return segs


def _inner_range(buf: bytes, seg):
    """(start, end) of the payload of a LEN field."""
    from lrprune_caffe.io import wire
    s, e, k_end, wt, _ = seg
    if wt != wire.LEN:
        return None
    _, p = wire.read_varint(buf, k_end, e)
    return p, e


def mutate_caffemodel(data: bytes, rng: random.Random) -> bytes:
    buf = bytes(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        buf = _mutate_once(buf, rng)
    return buf


def _mutate_once(buf: bytes, rng: random.Random) -> bytes:
    op = rng.choice(["flip", "truncate", "swap", "dup", "huge_len", "huge_varint", "wire_type", "inner",
                     "delete", "zero_run"])
    n = len(buf)
    if n == 0:
        return bytes([rng.randrange(256) for _ in range(rng.randrange(1, 20))])
    if op == "flip":
        b = bytearray(buf)
        for _ in range(rng.randrange(1, 8)):
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == "truncate":
        return buf[:rng.randrange(n)]
    if op == "zero_run":
        i = rng.randrange(n)
        return buf[:i] + bytes(rng.randrange(1, 64)) + buf[i + 1:]
    start, end = 0, n
    if op == "inner" or rng.random() < 0.5:  # work inside a layer / blob instead of the top level
        segs = _segments(buf, 0, n)
        lens = [s for s in segs or [] if s[3] == 2]
        if lens:
            r = _inner_range(buf, rng.choice(lens))
            if r and r[1] > r[0]:
                start, end = r
    segs = _segments(buf, start, end)
    if not segs:
        return _mutate_once(buf, random.Random(rng.random())) if op != "flip" else buf
    seg = rng.choice(segs)
    s, e, k_end, wt, _ = seg
    if op in ("swap",) and len(segs) > 1:
        a, b = sorted(rng.sample(range(len(segs)), 2))
        sa, sb = segs[a], segs[b]
        return (buf[:sa[0]] + buf[sb[0]:sb[1]] + buf[sa[1]:sb[0]] + buf[sa[0]:sa[1]] + buf[sb[1]:])
    if op == "dup":
        return buf[:e] + buf[s:e] + buf[e:]
    if op == "delete":
        return buf[:s] + buf[e:]
    if op == "huge_len" and wt == 2:
        _, p = wire.read_varint(buf, k_end, len(buf))
        return buf[:k_end] + wire.varint_bytes(rng.choice([2**31, 2**32 - 1, 2**63, 2**64 - 1, 10**12])) + buf[p:]
    if op == "huge_varint":
        key = buf[s:k_end]
        return buf[:s] + key[:-1] + bytes([key[-1] | 0x80]) + b"\xff" * rng.randrange(1, 12) + b"\x01" + buf[k_end:]
    if op == "wire_type" or op == "huge_len":
        key, _ = wire.read_varint(buf, s, len(buf))
        new_key = (key & ~7) | rng.choice([0, 1, 2, 3, 4, 5, 6, 7])
        return buf[:s] + wire.varint_bytes(new_key) + buf[k_end:]
    return buf


# ---- text mutations (prototxt) -------------------------------------------------------------

TOKENS = ["{", "}", ":", '"', "layer {", "layers {", "dim: 99999999999999999999", "dim: -1", "num_output: 0",
          "kernel_size: 4294967295", "group: 0", "stride: 0", "top: \"data\"", "bottom: \"nope\"",
          "type: \"Convolution\"", "input_dim: 0", "\x00", "\xff", "pad: 2147483647", "axis: -99",
          "pool: MAX", "inf", "nan", "1e309", "name: \"\"", "include { phase: TRAIN }"]


def mutate_prototxt(data: bytes, rng: random.Random) -> bytes:
    text = data.decode("utf-8", "replace")
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.choice(["flip", "truncate", "swap_lines", "dup_lines", "delete_line", "token", "huge_number",
                         "deep"])
        lines = text.splitlines(keepends=True) or [""]
        if op == "flip":
            b = bytearray(text.encode("utf-8", "replace"))
            if b:
                for _ in range(rng.randrange(1, 6)):
                    i = rng.randrange(len(b))
                    b[i] ^= 1 << rng.randrange(8)
            return bytes(b)  # possibly not UTF-8: fine, that is a case too
        if op == "truncate":
            text = text[:rng.randrange(len(text) + 1)]
        elif op == "swap_lines" and len(lines) > 1:
            i, j = rng.sample(range(len(lines)), 2)
            lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
        elif op == "dup_lines":
            i = rng.randrange(len(lines))
            j = min(len(lines), i + rng.randrange(1, 20))
            text = "".join(lines[:j] + lines[i:j] + lines[j:])
        elif op == "delete_line":
            del lines[rng.randrange(len(lines))]
            text = "".join(lines)
        elif op == "token":
            i = rng.randrange(len(text) + 1)
            text = text[:i] + " " + rng.choice(TOKENS) + " " + text[i:]
        elif op == "huge_number":
            import re
            nums = list(re.finditer(r"(?<![\w.])\d+(?![\w.])", text))
            if nums:
                m = rng.choice(nums)
                big = rng.choice(["0", "-1", "2147483648", "4294967296", "9223372036854775808", "1" + "0" * 40])
                text = text[:m.start()] + big + text[m.end():]
        elif op == "deep":
            d = rng.choice([100, 10_000, 100_000])
            text = text + "layer { " * d + "}" * rng.choice([0, d])
    return text.encode("utf-8", "surrogatepass")


# ---- the CLI's argument space ------------------------------------------------------------

SKIP_COMMANDS = {"bench", "finetune", "pipeline"}  # timing loops and training: not in a 10 s case
VALUES = ["0", "-1", "1", "2", "0.5", "1.5", "nan", "inf", "-inf", "1e309", "99999999999", "", "x", "conv1=0.5",
          "conv1=0", "ip1=4,conv2=2", "4x8", "0x0", "'", "--", "a,b", "conv.*", "(", "TEST", "TRAIN"]


def _parser_choices():
    from lrprune_caffe.cli.main import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {k: v for k, v in sub.choices.items() if k not in SKIP_COMMANDS}


def random_argv(rng: random.Random, files: list, outdir: Path) -> list:
    cmds = _parser_choices()
    name = rng.choice(sorted(cmds))
    p = cmds[name]
    proto, model = rng.choice(files)
    argv = [name]
    positional = [a for a in p._actions if not a.option_strings and a.dest != "help"]
    pool = [str(proto), str(model or proto), str(proto), "nope.prototxt", str(outdir)]
    for a in positional:
        if a.nargs == "?" and rng.random() < 0.3:
            continue
        argv += [rng.choice(pool) if rng.random() < 0.8 else str(model or proto)] * (1 if a.nargs != "+" else 2)
    if name in ("compress", "convert"):
        argv += ["-o", str(outdir / f"o{rng.randrange(3)}")]
    elif name == "export-onnx":
        argv += ["-o", str(outdir / "m.onnx")]
    flags = [a for a in p._actions if a.option_strings and a.dest not in ("help", "output", "debug")]
    for a in rng.sample(flags, min(len(flags), rng.randrange(0, 5))):
        opt = rng.choice(a.option_strings)
        if a.nargs == 0:
            argv.append(opt)
        elif a.choices:
            argv += [opt, rng.choice(list(a.choices) + ["bogus"])]
        else:
            argv += [opt, rng.choice(VALUES + [str(proto)])]
    if name == "compress" and rng.random() < 0.8:
        argv.append("--no-verify")  # keep cases short; the engines are not what is fuzzed
    if rng.random() < 0.3:
        argv.append("--force")
    return argv


# ---- the oracle -------------------------------------------------------------------------------

class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def run_cli(argv) -> tuple:
    """(exit status, stdout, stderr) of the CLI in-process, with a 10 s limit (status None on timeout)."""
    from lrprune_caffe.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm) if hasattr(signal, "SIGALRM") else None
    if old is not None:
        signal.alarm(CASE_TIMEOUT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
    except CaseTimeout:
        rc = None
    except SystemExit as e:
        rc = e.code
    finally:
        if old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()


def judge(rc, out, err) -> str:
    """'' when acceptable, else what is wrong."""
    if rc is None:
        return f"took over {CASE_TIMEOUT} s"
    if rc == 0:
        return "traceback on stderr" if "Traceback" in err else ""
    if rc != 2:
        return f"exit status {rc}: {err.strip()[-300:]}"
    lines = [line for line in err.strip().splitlines() if "error" in line]
    if "Traceback" in err:
        return f"traceback: {err.strip()[-300:]}"
    if len(lines) != 1:
        return f"{len(lines)} error lines: {err.strip()[:300]}"
    return ""


def run_case(kind: str, payload, workdir: Path) -> tuple:
    """Run one case; (problem or '', argv, stderr). kind: 'prototxt' | 'caffemodel' (payload: (seed pair,
    mutated bytes)) | 'argv' (payload: argv)."""
    if kind == "argv":
        argv = payload
    else:
        (proto, model), data = payload
        if kind == "prototxt":
            p = workdir / "fuzz.prototxt"
            p.write_bytes(data)
            argv = ["inspect", p] + ([model] if model else [])
        else:
            w = workdir / "fuzz.caffemodel"
            w.write_bytes(data)
            argv = ["inspect", proto, w]
    rc, out, err = run_cli(argv)
    return judge(rc, out, err), [str(a) for a in argv], err


def draw_case(rng: random.Random, files: list, workdir: Path):
    r = rng.random()
    if r < 0.45:
        pair = rng.choice([f for f in files if f[1]] or files)
        return "caffemodel", (pair, mutate_caffemodel(pair[1].read_bytes(), rng))
    if r < 0.85:
        pair = rng.choice(files)
        return "prototxt", (pair, mutate_prototxt(pair[0].read_bytes(), rng))
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    return "argv", random_argv(rng, files, out)


# ---- long runs --------------------------------------------------------------------------------

def worker(seed: int, start: int, count: int, deadline: float, state: Path, findings: Path):
    """Run cases start, start+1, ...; before each, write its number to ``state``."""
    import warnings
    warnings.simplefilter("ignore")
    files = seed_files()
    with tempfile.TemporaryDirectory(prefix="lrprune-fuzz-") as tmp:
        workdir = Path(tmp)
        i = start
        while i < start + count and time.time() < deadline:
            state.write_text(str(i))
            rng = random.Random(f"{seed}:{i}")
            kind, payload = draw_case(rng, files, workdir)
            problem, argv, err = run_case(kind, payload, workdir)
            if problem:
                _record(findings, i, kind, payload, argv, problem)
            i += 1
    state.write_text(f"done {i}")


def _record(findings: Path, i, kind, payload, argv, problem):
    findings.mkdir(parents=True, exist_ok=True)
    entry = {"case": i, "kind": kind, "argv": argv, "problem": problem}
    if kind not in ("argv", "crash"):
        name = f"case{i}.{kind}"
        (findings / name).write_bytes(payload[1])
        entry["file"] = name
    with open(findings / "findings.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=None, help="run for this long")
    ap.add_argument("--cases", type=int, default=None, help="run this many cases (default: 1000 without --minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="fuzz-findings", help="folder for findings (default ./fuzz-findings)")
    ap.add_argument("--worker", nargs=3, type=float, metavar=("START", "COUNT", "DEADLINE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    findings = Path(args.out)
    state = findings / "worker.state"
    if args.worker:
        worker(args.seed, int(args.worker[0]), int(args.worker[1]), args.worker[2], state, findings)
        return 0
    findings.mkdir(parents=True, exist_ok=True)
    total = args.cases if args.cases is not None else (10**9 if args.minutes else 1000)
    deadline = time.time() + (args.minutes * 60 if args.minutes else 10**9)
    t0, i, crashes = time.time(), 0, 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    while i < total and time.time() < deadline:
        state.write_text(str(i))
        proc = subprocess.run([sys.executable, __file__, "--seed", str(args.seed), "--out", str(findings),
                               "--worker", str(i), str(total - i), str(deadline)], env=env)
        st = state.read_text()
        if st.startswith("done"):
            i = int(st.split()[1])
            break
        crashed = int(st)  # the worker died in this case
        crashes += 1
        _record(findings, crashed, "crash", None, [], f"worker died with status {proc.returncode}")
        i = crashed + 1
    n_find = sum(1 for _ in open(findings / "findings.jsonl")) if (findings / "findings.jsonl").exists() else 0
    summary = {"cases": i, "seconds": round(time.time() - t0, 1), "findings": n_find, "crashes": crashes,
               "seed": args.seed, "findings_file": str(findings / "findings.jsonl")}
    print(json.dumps(summary))
    return 1 if n_find else 0


if __name__ == "__main__":
    sys.exit(main())
