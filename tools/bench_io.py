#!/usr/bin/env python3
"""Benchmark: read and write a VGG-16-sized caffemodel (138M float32 weights, ~528 MB).

What it does

1. builds VGG-16 (Simonyan & Zisserman 2014, configuration D: the layer list of
   BVLC's ``VGG_ILSVRC_16_layers_deploy.prototxt``, 224x224 input) as an IR net
   with seeded He-normal weights and writes it once with the project's writer
   (not measured);
2. ``read``: in a fresh subprocess, after imports, times
   ``caffe_io.load_net(prototxt, caffemodel)`` (parse, upgrade, merge, validate);
3. ``write``: in a fresh subprocess, loads the model (not timed), then times
   ``caffe_io.save_net(net, prototxt, caffemodel)``;
4. each is repeated ``--repeat`` times (default 3); the table shows the median
   (and min/max) time and the peak extra memory of the operation.

Peak memory is the process's high-water mark (``VmHWM`` in /proc/self/status)
minus its resident size just before the operation: after the imports for
``read``; for ``write`` the high-water mark is reset first (``echo 5 >
/proc/self/clear_refs``) so the load before it does not count. Where /proc is
missing it falls back to ``getrusage(RUSAGE_SELF).ru_maxrss``.

Files are read from the page cache (warm: they were just written), which is
how a user re-running a command sees them; cold-cache numbers add disk time.

Usage::

    python tools/bench_io.py [--repeat 3] [--json] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# VGG-16 (configuration D): (name, kind, arg). conv: num_output (3x3, pad 1),
# pool: 2x2 stride 2 MAX, fc: num_output. ReLU follows every conv/fc but fc8;
# Dropout follows fc6/fc7, as in the BVLC deploy prototxt.
VGG16 = [
    ("conv1_1", "conv", 64), ("conv1_2", "conv", 64), ("pool1", "pool", None),
    ("conv2_1", "conv", 128), ("conv2_2", "conv", 128), ("pool2", "pool", None),
    ("conv3_1", "conv", 256), ("conv3_2", "conv", 256), ("conv3_3", "conv", 256), ("pool3", "pool", None),
    ("conv4_1", "conv", 512), ("conv4_2", "conv", 512), ("conv4_3", "conv", 512), ("pool4", "pool", None),
    ("conv5_1", "conv", 512), ("conv5_2", "conv", 512), ("conv5_3", "conv", 512), ("pool5", "pool", None),
    ("fc6", "fc", 4096), ("fc7", "fc", 4096), ("fc8", "fc", 1000),
]
VGG16_PARAMS = 138_357_544


def build_vgg16(seed: int = 0):
    """VGG-16 as an IR Net with He-normal weights (He et al. 2015, std = sqrt(2 / fan_in))
    and zero biases, drawn from ``numpy.random.default_rng(seed)``."""
    import numpy as np

    from lrprune_caffe.ir.net import Layer, Net
    from lrprune_caffe.schema.proto import pb

    rng = np.random.default_rng(seed)
    layers = []
    inp = Layer("data", "Input", [], ["data"])
    inp.msg.input_param.shape.add().dim.extend([1, 3, 224, 224])
    layers.append(inp)
    blob, channels, spatial = "data", 3, 224
    for name, kind, n in VGG16:
        if kind == "conv":
            layer = Layer(name, "Convolution", [blob], [name])
            cp = layer.msg.convolution_param
            cp.num_output = n
            cp.pad.append(1)
            cp.kernel_size.append(3)
            fan_in = channels * 9
            w = rng.standard_normal((n, channels, 3, 3), dtype=np.float32)
            channels = n
        elif kind == "pool":
            layer = Layer(name, "Pooling", [blob], [name])
            pp = layer.msg.pooling_param
            pp.pool, pp.kernel_size, pp.stride = pb.PoolingParameter.MAX, 2, 2
            layers.append(layer)
            blob, spatial = name, spatial // 2
            continue
        else:
            layer = Layer(name, "InnerProduct", [blob], [name])
            layer.msg.inner_product_param.num_output = n
            fan_in = channels * spatial * spatial
            w = rng.standard_normal((n, fan_in), dtype=np.float32)
            channels, spatial = n, 1
        w *= np.float32(np.sqrt(2.0 / fan_in))
        layer.blobs = [w, np.zeros(n, np.float32)]
        layers.append(layer)
        blob = name
        if name != "fc8":
            relu = "relu" + name[len("conv"):] if kind == "conv" else "relu" + name[2:]
            layers.append(Layer(relu, "ReLU", [blob], [blob]))
        if name in ("fc6", "fc7"):
            drop = Layer("drop" + name[2:], "Dropout", [blob], [blob])
            drop.msg.dropout_param.dropout_ratio = 0.5
            layers.append(drop)
    layers.append(Layer("prob", "Softmax", [blob], ["prob"]))
    return Net(name="VGG_ILSVRC_16_layers", layers=layers)


# ---- measurement inside a fresh subprocess -----------------------------------

def _status_kb(key: str):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_kb():
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def child(op: str, prototxt: str, caffemodel: str, outdir: str = None) -> dict:
    import numpy  # noqa: F401  (imports are not part of the measurement)

    from lrprune_caffe.io import caffe as caffe_io

    if op == "read":
        base, method = _peak_kb()
        t0 = time.perf_counter()
        net = caffe_io.load_net(prototxt, caffemodel)
        seconds = time.perf_counter() - t0
        peak, _ = _peak_kb()
        return {"op": op, "seconds": seconds, "peak_extra_bytes": (peak - base) * 1024,
                "memory_method": method, "params": net.params()}
    if op == "write":
        net = caffe_io.load_net(prototxt, caffemodel)
        reset = _reset_peak()
        base = _status_kb("VmRSS") if reset else _peak_kb()[0]
        method = "VmHWM after clear_refs" if reset else "ru_maxrss (peak includes the load)"
        t0 = time.perf_counter()
        caffe_io.save_net(net, os.path.join(outdir, "out.prototxt"), os.path.join(outdir, "out.caffemodel"))
        seconds = time.perf_counter() - t0
        peak, _ = _peak_kb()
        size = os.path.getsize(os.path.join(outdir, "out.caffemodel"))
        return {"op": op, "seconds": seconds, "peak_extra_bytes": (peak - base) * 1024,
                "memory_method": method, "params": net.params(), "written_bytes": size}
    raise SystemExit(f"unknown op {op}")


def run_child(op, prototxt, caffemodel, outdir=None, threads=None) -> dict:
    args = [op, prototxt, caffemodel] + ([outdir] if outdir else [])
    return run_json_child(os.path.abspath(__file__), args, threads, what=op)


def run_json_child(script, args, threads=None, what="child") -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter (its own peak memory; BLAS threads
    pinned with ``threads``) and return the JSON object on its last stdout line."""
    cmd = [sys.executable, script, "--child", *map(str, args)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"{what} subprocess failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- driver -------------------------------------------------------------------

def versions() -> dict:
    import google.protobuf
    import numpy
    from google.protobuf.internal import api_implementation

    import lrprune_caffe
    return {"python": platform.python_version(), "numpy": numpy.__version__,
            "protobuf": google.protobuf.__version__, "protobuf_backend": api_implementation.Type(),
            "lrprune_caffe": lrprune_caffe.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count()}


def summarize(runs) -> dict:
    times = [r["seconds"] for r in runs]
    mems = [r["peak_extra_bytes"] for r in runs]
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "peak_extra_bytes_median": statistics.median(mems), "peak_extra_bytes_max": max(mems),
            "memory_method": runs[0]["memory_method"], "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per operation (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="folder for the model files (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated model files")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    from lrprune_caffe.io import caffe as caffe_io

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_io_"))
    work.mkdir(parents=True, exist_ok=True)
    proto, model = str(work / "vgg16.prototxt"), str(work / "vgg16.caffemodel")
    out = work / "out"
    out.mkdir(exist_ok=True)
    try:
        t0 = time.perf_counter()
        net = build_vgg16(args.seed)
        assert net.params() == VGG16_PARAMS, net.params()
        caffe_io.save_net(net, proto, model)
        del net
        setup_s = time.perf_counter() - t0
        size = os.path.getsize(model)
        reads = [run_child("read", proto, model) for _ in range(args.repeat)]
        writes = [run_child("write", proto, model, str(out)) for _ in range(args.repeat)]
        for r in reads + writes:
            assert r["params"] == VGG16_PARAMS, r
        assert all(w["written_bytes"] == size for w in writes)
        same = Path(out / "out.caffemodel").read_bytes() == Path(model).read_bytes()
        result = {
            "versions": versions(),
            "threads": "single-threaded (the I/O path runs no thread pool)",
            "model": {"name": "VGG-16 (224x224 input, seeded He-normal weights)",
                      "params": VGG16_PARAMS, "caffemodel_bytes": size, "setup_s": setup_s},
            "read": summarize(reads),
            "write": summarize(writes),
            "rewrite_bit_identical": same,
            "page_cache": "warm",
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    v = result["versions"]
    print(f"python {v['python']}  numpy {v['numpy']}  protobuf {v['protobuf']} ({v['protobuf_backend']})  "
          f"lrprune-caffe {v['lrprune_caffe']}  {v['cpus']} CPUs  {v['platform']}")
    print(f"model: {result['model']['name']}, {VGG16_PARAMS:,} params, caffemodel {size / 1e6:.1f} MB "
          f"({size:,} bytes); median of {args.repeat} fresh subprocesses, warm page cache")
    print(f"{'operation':<10} {'median s':>9} {'min s':>7} {'max s':>7} {'peak extra MB':>14} {'x file':>7}")
    for op in ("read", "write"):
        r = result[op]
        mem = r["peak_extra_bytes_max"]
        print(f"{op:<10} {r['median_s']:9.2f} {r['min_s']:7.2f} {r['max_s']:7.2f} "
              f"{mem / 1e6:14.1f} {mem / size:7.2f}")
    print(f"memory: {result['read']['memory_method']} (read), {result['write']['memory_method']} (write)")
    print(f"re-written caffemodel bit-identical to the original: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
