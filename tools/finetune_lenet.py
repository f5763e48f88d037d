#!/usr/bin/env python3
"""Fine-tuning defaults, measured: recover a LeNet compressed without data.

``compress --speedup 3 --prune 0.9`` (channel scheme, 90% of each layer's
weights; no data) takes the real-Caffe LeNet (``../shared/golden/lenet_mnist``,
97.3%) to 18.4% top-1. Each row fine-tunes that net for ``--epochs`` (3) epochs
on the split's 4,000 training digits (pixels / 256; masks held), SGD with
momentum 0.9, weight decay 5e-4, batch 64, at one learning rate, with or
without the original net as the teacher (``finetune --teacher``, T 4,
distillation weight 0.9), for each seed; top-1 on the 1,000 held-out digits
(numpy forward, checked against real Caffe in tests/test_calibrate.py).

    PYTHONPATH=. python tools/finetune_lenet.py [--rows 0.001,0.01,0.03,0.05,t0.01,t0.02] [--seeds 0,1,2]
                                                [--threads 1] [--out examples/lenet/FINETUNE.md]

A row ``tLR`` distills from the teacher at rate LR.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOLDEN = ROOT.parent / "shared" / "golden" / "lenet_mnist"
SPLIT = ROOT.parent / "shared" / "data" / "mnist5k_split.npz"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="0.001,0.01,0.03,0.05,t0.01,t0.02")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args(argv)
    if not (GOLDEN / "model.prototxt").exists() or not SPLIT.exists():
        print(f"needs {GOLDEN} and {SPLIT}", file=sys.stderr)
        return 2
    import torch
    from lrprune_caffe.core.compress import CompressData, CompressOptions, compress
    from lrprune_caffe.data.datasets import load_mnist_split
    from lrprune_caffe.io.caffe import load_net
    from lrprune_caffe.train.finetune import DEFAULT_DISTILL_WEIGHT, DEFAULT_TEMPERATURE, finetune
    from lrprune_caffe.train.solver import SolverSettings
    from lrprune_caffe.transforms.forward import forward

    orig = load_net(str(GOLDEN / "model.prototxt"), str(GOLDEN / "model.caffemodel"))
    res = compress(orig, CompressOptions.from_kwargs(verify=False, speedup=3, prune=0.9), CompressData())
    train, test = load_mnist_split(SPLIT)

    def top1(net):
        return float(np.mean(forward(net, {"data": test.x})["prob"].argmax(1) == test.y))

    start = top1(res.net)
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = ["| lr | teacher | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "| --- | --- |" + " --- |" * (len(seeds) + 1)]
    t0 = time.perf_counter()
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        teach = row.startswith("t")
        lr = float(row.lstrip("t"))
        accs = []
        for seed in seeds:
            net, _ = finetune(res.net, train, masks=res.masks, solver=SolverSettings(base_lr=lr),
                              epochs=args.epochs, batch_size=64, seed=seed, threads=args.threads, check=False,
                              progress=False, teacher=orig if teach else None)
            accs.append(top1(net))
            print(f"lr {lr:g} teacher {teach} seed {seed}: {accs[-1]:.3f}", file=sys.stderr, flush=True)
        lines.append(f"| {lr:g} | {'yes' if teach else 'no'} | " + " | ".join(f"{100 * a:.1f}%" for a in accs)
                     + f" | {100 * statistics.mean(accs):.1f}% |")
    md = "\n".join([
        "# Fine-tuning a LeNet compressed without data", "",
        f"Produced by `python tools/finetune_lenet.py --rows {args.rows} --seeds {args.seeds}`: "
        f"`compress --speedup 3 --prune 0.9` (no data) leaves {100 * start:.1f}% top-1; each cell fine-tunes "
        f"it for {args.epochs} epochs on the 4,000 training digits (SGD, momentum 0.9, weight decay 5e-4, "
        f"batch 64, fixed rate, masks held), with or without the original net as the teacher "
        f"(T {DEFAULT_TEMPERATURE:g}, distillation weight {DEFAULT_DISTILL_WEIGHT:g}); top-1 on the 1,000 held-out "
        f"digits. torch {torch.__version__}, {args.threads} thread(s), Python {platform.python_version()}; "
        f"{time.perf_counter() - t0:.0f} s in all.", "", *lines, ""])
    if args.out:
        from lrprune_caffe.fileutil import atomic_write_bytes
        atomic_write_bytes(args.out, md.encode())
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
