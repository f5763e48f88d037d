"""Streaming data: memory and speed of evaluate and finetune on Caffe data sources.

    PYTHONPATH=. python tools/bench_data.py [--records 50000] [--small 5000] [--threads 1]

1. Memory: ``evaluate TRAIN_VAL WEIGHTS`` over an LMDB of ``--small`` and of
   ``--records`` raw MNIST Datum records (golden LeNet), each in a fresh
   process; peak RSS (VmHWM) and, at the end, anonymous / file-backed RSS.
   LMDB reads through a memory map, so pages of the database file that were
   read count in RSS as file-backed (page cache the kernel may drop); the
   anonymous part is what the process itself holds.
2. Throughput: our evaluate (LMDB decode + transform + onnxruntime, batches of
   the data layer) against a plain onnxruntime loop over the same batches
   decoded beforehand, and the decode/transform alone.
3. Training: finetune's time per iteration against a plain torch loop
   (hand-written nn.Sequential LeNet, torch.optim.SGD) at the same batch size.

Needs the golden corpus (../shared), lmdb, torch. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"
SPLIT = GOLDEN.parent / "data" / "mnist5k_split.npz"
WEIGHTS = GOLDEN / "lenet_mnist" / "model.caffemodel"
BODY = GOLDEN / "lenet_lmdb" / "train_val.prototxt"


def write_lmdb(path, n):
    import lmdb
    from lrprune_caffe.data.caffe_io import array_to_datum
    with np.load(SPLIT) as z:
        x = np.concatenate([z["x_train"], z["x_test"]])
        y = np.concatenate([z["y_train"], z["y_test"]])
    env = lmdb.open(str(path), map_size=1 << 31)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(f"{i:08d}".encode(), array_to_datum(x[i % len(x)][None], int(y[i % len(y)])))
    env.close()


def train_val(path, source, batch=100):
    text = BODY.read_text()
    body = text[text.index('layer { name: "conv1"'):]
    layer = (f'layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TEST }}\n'
             f'  transform_param {{ scale: 0.00390625 }}\n'
             f'  data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}\n')
    Path(path).write_text('name: "LeNet"\n' + layer + body)


CHILD = r"""
import json, sys, time
from lrprune_caffe.engines.evaluate import evaluate_files
t = time.perf_counter()
res = evaluate_files(sys.argv[1], sys.argv[2], threads=int(sys.argv[3]), progress=False)
el = time.perf_counter() - t
st = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
kb = lambda k: int(st[k].split()[0]) / 1024
print(json.dumps({"n": res["n"], "top1": res["top1"], "s": el, "hwm_mb": kb("VmHWM"),
                  "anon_mb": kb("RssAnon"), "file_mb": kb("RssFile")}))
"""


def memory(tmp, sizes, threads):
    rows = {}
    for n in sizes:
        db = Path(tmp) / f"lmdb_{n}"
        write_lmdb(db, n)
        tv = Path(tmp) / f"tv_{n}.prototxt"
        train_val(tv, db)
        out = subprocess.run([sys.executable, "-c", CHILD, str(tv), str(WEIGHTS), str(threads)],
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, check=True)
        rows[n] = json.loads(out.stdout.strip().splitlines()[-1])
    return rows


def throughput(tmp, n, threads, batch=100):
    from lrprune_caffe.engines.evaluate import evaluate, load_train_val
    from lrprune_caffe.engines.runtime import ort_session
    from lrprune_caffe.export.onnx import export_model
    tv = Path(tmp) / f"tv_{n}.prototxt"
    net, pdata, scores = load_train_val(tv, WEIGHTS)
    t = time.perf_counter()
    batches = list(pdata.dataset.batches(batch))
    decode_s = time.perf_counter() - t
    sess = ort_session(export_model(net, dynamic_batch=True).SerializeToString(), threads)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: batches[0][0]})
    t = time.perf_counter()
    correct = 0
    for x, y in batches:
        correct += int((sess.run(None, {name: x})[0].reshape(len(x), -1).argmax(1) == y).sum())
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    res = evaluate(net, pdata.dataset, scores, batch, threads=threads, progress=False)
    ours_s = time.perf_counter() - t
    assert res["correct_top1"] == correct, (res["correct_top1"], correct)
    return {"n": n, "decode_img_s": n / decode_s, "plain_ort_img_s": n / plain_s, "ours_img_s": n / ours_s}


def training(threads, batch=64, iters=60):
    import torch
    from lrprune_caffe.data.datasets import load_mnist_split
    from lrprune_caffe.io.caffe import load_net
    from lrprune_caffe.train.finetune import finetune
    from lrprune_caffe.train.solver import SolverSettings
    torch.set_num_threads(threads)
    train, _ = load_mnist_split(SPLIT)
    net = load_net(GOLDEN / "lenet_mnist" / "model.prototxt", WEIGHTS)
    solver = SolverSettings(base_lr=0.01, momentum=0.9, weight_decay=5e-4, max_iter=iters)
    _, hist = finetune(net, train, None, solver=solver, batch_size=batch, threads=threads, progress=False,
                       check=False)
    ours = hist["time_s"] / hist["iterations"]
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(iters):
        idx = torch.from_numpy(rng.choice(len(x), batch, replace=False))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    plain = (time.perf_counter() - t) / iters
    return {"batch": batch, "iters": iters, "ours_ms": ours * 1e3, "plain_ms": plain * 1e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=50000)
    ap.add_argument("--small", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import onnxruntime
    import torch
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {a.threads} thread(s), "
          f"{os.cpu_count()} CPUs\n")
    with tempfile.TemporaryDirectory() as tmp:
        mem = memory(tmp, (a.small, a.records), a.threads)
        print("| records | top-1 | time s | peak RSS MB | anon RSS MB | file RSS MB |\n|---|---|---|---|---|---|")
        for n, r in mem.items():
            print(f"| {n} | {r['top1']:.4f} | {r['s']:.1f} | {r['hwm_mb']:.0f} | {r['anon_mb']:.0f} | "
                  f"{r['file_mb']:.0f} |")
        s, b = mem[a.small], mem[a.records]
        print(f"\npeak RSS {a.records} / {a.small}: {b['hwm_mb'] / s['hwm_mb']:.3f}x; "
              f"anonymous {b['anon_mb'] / s['anon_mb']:.3f}x\n")
        tp = throughput(tmp, a.small, a.threads)
        print(f"| evaluate over {tp['n']} LMDB records | images/s |\n|---|---|\n"
              f"| decode + transform only | {tp['decode_img_s']:.0f} |\n"
              f"| plain onnxruntime loop, batches decoded beforehand | {tp['plain_ort_img_s']:.0f} |\n"
              f"| ours: decode + transform + onnxruntime, streamed | {tp['ours_img_s']:.0f} |\n")
    tr = training(a.threads)
    print(f"| LeNet training step, batch {tr['batch']} | ms |\n|---|---|\n"
          f"| plain torch loop (nn.Sequential, optim.SGD) | {tr['plain_ms']:.2f} |\n"
          f"| ours (finetune: Caffe-exact model, Caffe solver, DataLoader) | {tr['ours_ms']:.2f} |")


if __name__ == "__main__":
    main()
