#!/usr/bin/env python3
"""Write the example model: Caffe's LeNet deploy net with seeded He-normal weights.

Outputs (next to this script unless ``-o`` says otherwise):

* ``lenet.prototxt``  - Caffe's ``examples/mnist/lenet.prototxt`` (conv1 20 5x5,
  MAX pool 2/2, conv2 50 5x5, MAX pool 2/2, ip1 500, ReLU, ip2 10, Softmax),
  with a 1x1x28x28 input instead of Caffe's batch of 64;
* ``lenet.caffemodel`` - 431,080 float32 weights: He-normal (He et al. 2015,
  "Delving deep into rectifiers", std = sqrt(2 / fan_in)) from
  ``numpy.random.default_rng(seed)``, biases zero.

Both are written by the project's own writer (``lrprune_caffe.caffe_io.save_net``);
the same seed gives bit-identical files. The weights are untrained: the model is
for trying the commands, not for classifying digits (a later release ships a
trained one).

Usage::

    python examples/lenet/make_example.py [--seed 0] [-o examples/lenet]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from google.protobuf import text_format

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a source checkout without installing

from lrprune_caffe.analysis import expected_weight_shapes, infer_shapes, validate  # noqa: E402
from lrprune_caffe.caffe_io import load_net, save_net  # noqa: E402
from lrprune_caffe.ir import Layer, Net  # noqa: E402
from lrprune_caffe.proto import pb  # noqa: E402

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


def he_normal(shape, rng) -> np.ndarray:
    """He-normal weights: N(0, 2 / fan_in), fan_in = prod(shape[1:]) (He et al. 2015)."""
    fan_in = int(np.prod(shape[1:]))
    w = rng.standard_normal(shape, dtype=np.float32)
    return w * np.float32(np.sqrt(2.0 / fan_in))


def build_lenet(seed: int = 0) -> Net:
    msg = text_format.Parse(LENET_DEPLOY, pb.NetParameter())
    net = Net(name=msg.name, layers=[Layer.from_proto(lp) for lp in msg.layer], source="<LeNet deploy>")
    rng = np.random.default_rng(seed)
    shapes = infer_shapes(net)
    for layer in net.layers:
        wanted = expected_weight_shapes(net, layer, shapes) or []
        if wanted:
            layer.blobs = [he_normal(wanted[0], rng)] + [np.zeros(s, np.float32) for s in wanted[1:]]
    validate(net)
    return net


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="write examples/lenet/lenet.prototxt + lenet.caffemodel")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--outdir", default=str(HERE))
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    net = build_lenet(args.seed)
    proto, model = out / "lenet.prototxt", out / "lenet.caffemodel"
    save_net(net, proto, model)
    back = load_net(proto, model)  # read it back with the project's reader
    assert back.params() == net.params() == 431_080
    print(f"wrote {proto} and {model} ({model.stat().st_size:,} bytes, {net.params():,} params, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
