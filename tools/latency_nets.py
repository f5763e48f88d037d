"""Full-size test nets for tools/bench_latency.py, written as Caffe prototxt text and given seeded weights.

- ``vgg16``: VGG-16 (Simonyan & Zisserman 2015, config D): 13 3x3 convs, 3 FCs.
- ``resnet50``: ResNet-50 (He et al. 2016) as in Caffe's deploy net: bias-free convs, BatchNorm + Scale,
  bottlenecks [3, 4, 6, 3] with the stride on the first 1x1, projection shortcuts, Eltwise SUM.
- ``googlenet``: GoogLeNet / Inception v1 (Szegedy et al. 2015, Table 1): 9 inception modules
  (1x1, 3x3 reduce + 3x3, 5x5 reduce + 5x5, 3x3 max pool + 1x1 projection, Concat); no LRN.
- ``mobilenet``: MobileNet v1 (Howard et al. 2017, Table 1): 3x3 depthwise + 1x1 pointwise, BatchNorm.
- ``tiny``: two 3x3 convs, a pool and two FCs (input 32 by default): the bench's quick mode and its test.

The golden corpus (../shared/golden/resnet_mini, inception_mini, mobilenet_mini) holds the same
structures at small scale, run by real Caffe. ``input`` sets the input's height and width (224 for the
real nets; smaller for quick checks).

Weights: conv / FC weights get a power-law spectrum (singular values i^-0.7 of the channel unfolding,
random singular vectors, plus 1% noise), like trained nets and unlike He-normal noise, whose flat
spectra make every rank choice look alike; depthwise convs are plain He-normal. BatchNorm holds mean 0,
variance 1; Scale 1 and 0. Seeded by ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import numpy as np

NETS = ("vgg16", "resnet50", "googlenet", "mobilenet", "tiny")


class Proto:
    def __init__(self, name, size):
        self.lines = [f'name: "{name}"',
                      f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 '
                      f'dim: {size} dim: {size} }} }} }}']

    def add(self, text):
        self.lines.append(text)

    def conv(self, name, bottom, n, k, s=1, p=None, group=1, bias=True, bn=False, relu=True):
        p = k // 2 if p is None else p
        self.add(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" convolution_param '
                 f'{{ num_output: {n} kernel_size: {k} stride: {s} pad: {p} group: {group} '
                 f'bias_term: {"true" if bias else "false"} }} }}')
        if bn:
            self.add(f'layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{name}" top: "{name}" '
                     f'batch_norm_param {{ use_global_stats: true }} }}')
            self.add(f'layer {{ name: "scale_{name}" type: "Scale" bottom: "{name}" top: "{name}" '
                     f'scale_param {{ bias_term: true }} }}')
        if relu:
            self.relu(name)
        return name

    def relu(self, blob):
        self.add(f'layer {{ name: "{blob}_relu" type: "ReLU" bottom: "{blob}" top: "{blob}" }}')

    def pool(self, name, bottom, kind="MAX", k=2, s=2, p=0, global_pool=False):
        geo = "global_pooling: true" if global_pool else f"kernel_size: {k} stride: {s} pad: {p}"
        self.add(f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" pooling_param '
                 f'{{ pool: {kind} {geo} }} }}')
        return name

    def ip(self, name, bottom, n, relu=True):
        self.add(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                 f'inner_product_param {{ num_output: {n} }} }}')
        if relu:
            self.relu(name)
        return name

    def eltwise(self, name, a, b):
        self.add(f'layer {{ name: "{name}" type: "Eltwise" bottom: "{a}" bottom: "{b}" top: "{name}" '
                 f'eltwise_param {{ operation: SUM }} }}')
        return name

    def concat(self, name, bottoms):
        bs = " ".join(f'bottom: "{b}"' for b in bottoms)
        self.add(f'layer {{ name: "{name}" type: "Concat" {bs} top: "{name}" }}')
        return name

    def softmax(self, bottom):
        self.add(f'layer {{ name: "prob" type: "Softmax" bottom: "{bottom}" top: "prob" }}')

    def text(self):
        return "\n".join(self.lines) + "\n"


def vgg16(size=224) -> str:
    P = Proto("VGG16", size)
    x = "data"
    for stage, (n, reps) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
        for i in range(1, reps + 1):
            x = P.conv(f"conv{stage}_{i}", x, n, 3)
        x = P.pool(f"pool{stage}", x)
    x = P.ip("fc6", x, 4096)
    x = P.ip("fc7", x, 4096)
    P.softmax(P.ip("fc8", x, 1000, relu=False))
    return P.text()


def resnet50(size=224) -> str:
    P = Proto("ResNet50", size)
    x = P.conv("conv1", "data", 64, 7, s=2, p=3, bias=False, bn=True)
    x = P.pool("pool1", x, k=3, s=2)
    for stage, (mid, out, blocks) in enumerate([(64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3)], 2):
        for b in range(blocks):
            name = f"res{stage}{chr(ord('a') + b)}"
            s = 2 if (b == 0 and stage > 2) else 1
            short = x
            if b == 0:
                short = P.conv(f"{name}_branch1", x, out, 1, s=s, bias=False, bn=True, relu=False)
            y = P.conv(f"{name}_branch2a", x, mid, 1, s=s, bias=False, bn=True)
            y = P.conv(f"{name}_branch2b", y, mid, 3, bias=False, bn=True)
            y = P.conv(f"{name}_branch2c", y, out, 1, bias=False, bn=True, relu=False)
            x = P.eltwise(name, short, y)
            P.relu(x)
    x = P.pool("pool5", x, kind="AVE", global_pool=True)
    P.softmax(P.ip("fc1000", x, 1000, relu=False))
    return P.text()


_INCEPTION = [("3a", 64, 96, 128, 16, 32, 32), ("3b", 128, 128, 192, 32, 96, 64), "pool",
              ("4a", 192, 96, 208, 16, 48, 64), ("4b", 160, 112, 224, 24, 64, 64), ("4c", 128, 128, 256, 24, 64, 64),
              ("4d", 112, 144, 288, 32, 64, 64), ("4e", 256, 160, 320, 32, 128, 128), "pool",
              ("5a", 256, 160, 320, 32, 128, 128), ("5b", 384, 192, 384, 48, 128, 128)]


def googlenet(size=224) -> str:
    P = Proto("GoogLeNet", size)
    x = P.conv("conv1/7x7_s2", "data", 64, 7, s=2, p=3)
    x = P.pool("pool1/3x3_s2", x, k=3, s=2)
    x = P.conv("conv2/3x3_reduce", x, 64, 1)
    x = P.conv("conv2/3x3", x, 192, 3)
    x = P.pool("pool2/3x3_s2", x, k=3, s=2)
    pools = 2
    for spec in _INCEPTION:
        if spec == "pool":
            pools += 1
            x = P.pool(f"pool{pools}/3x3_s2", x, k=3, s=2)
            continue
        m, n1, r3, n3, r5, n5, pp = spec
        b1 = P.conv(f"inception_{m}/1x1", x, n1, 1)
        b3 = P.conv(f"inception_{m}/3x3", P.conv(f"inception_{m}/3x3_reduce", x, r3, 1), n3, 3)
        b5 = P.conv(f"inception_{m}/5x5", P.conv(f"inception_{m}/5x5_reduce", x, r5, 1), n5, 5)
        bp = P.conv(f"inception_{m}/pool_proj", P.pool(f"inception_{m}/pool", x, k=3, s=1, p=1), pp, 1)
        x = P.concat(f"inception_{m}/output", [b1, b3, b5, bp])
    x = P.pool("pool5/7x7_s1", x, kind="AVE", global_pool=True)
    P.softmax(P.ip("loss3/classifier", x, 1000, relu=False))
    return P.text()


def mobilenet(size=224) -> str:
    P = Proto("MobileNet", size)
    x = P.conv("conv1", "data", 32, 3, s=2, bias=False, bn=True)
    c = 32
    cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    for i, (n, s) in enumerate(cfg, 2):
        x = P.conv(f"conv{i}_dw", x, c, 3, s=s, group=c, bias=False, bn=True)
        x = P.conv(f"conv{i}_pw", x, n, 1, bias=False, bn=True)
        c = n
    x = P.pool("pool6", x, kind="AVE", global_pool=True)
    P.softmax(P.ip("fc7", x, 1000, relu=False))
    return P.text()


def tiny(size=32) -> str:
    P = Proto("Tiny", size)
    x = P.conv("conv1", "data", 32, 3)
    x = P.pool("pool1", P.conv("conv2", x, 64, 3))
    x = P.ip("fc1", x, 128)
    P.softmax(P.ip("fc2", x, 10, relu=False))
    return P.text()


BUILDERS = {"vgg16": vgg16, "resnet50": resnet50, "googlenet": googlenet, "mobilenet": mobilenet, "tiny": tiny}


def _spectral(rng, shape, group, decay=0.7, noise=0.01, max_rank=512):
    """Weights whose channel unfolding (per group) has singular values ~ i^-decay (He-normal scale)."""
    n, c = int(shape[0]), int(np.prod(shape[1:]))
    ng = n // group
    fan_in = c
    parts = []
    for _ in range(group):
        if ng == 1 or c == 1:
            parts.append(rng.standard_normal((ng, c), dtype=np.float32))
            continue
        m = min(ng, c, max_rank)
        s = np.arange(1, m + 1, dtype=np.float32) ** -decay
        A = rng.standard_normal((ng, m), dtype=np.float32)
        B = rng.standard_normal((m, c), dtype=np.float32)
        W = (A * s) @ B
        W *= np.float32(np.sqrt(ng * c) / np.linalg.norm(W))  # unit mean square, like N(0, 1)
        W += np.float32(noise) * rng.standard_normal((ng, c), dtype=np.float32)
        parts.append(W)
    W = np.concatenate(parts, axis=0) * np.float32(np.sqrt(2.0 / fan_in))
    return W.reshape(shape).astype(np.float32)


def build(name: str, size: int = 224, seed: int = 0, workdir=None):
    """The net as an IR Net with seeded weights (and, with ``workdir``, its prototxt + caffemodel there)."""
    import os

    from lrprune_caffe.io.caffe import read_net, save_net
    from lrprune_caffe.ir.analysis import expected_weight_shapes, infer_shapes, validate

    text = BUILDERS[name](size)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.prototxt")
        with open(path, "w") as fh:
            fh.write(text)
        net = read_net(path)
    net.source = None
    rng = np.random.default_rng(seed)
    shapes = infer_shapes(net)
    for layer in net.layers:
        wanted = expected_weight_shapes(net, layer, shapes)
        if not wanted:
            continue
        if layer.type in ("Convolution", "InnerProduct"):
            group = int(layer.msg.convolution_param.group or 1) if layer.type == "Convolution" else 1
            blobs = [_spectral(rng, wanted[0], group)] + [np.zeros(s, np.float32) for s in wanted[1:]]
        elif layer.type == "BatchNorm":
            blobs = [np.zeros(wanted[0], np.float32), np.ones(wanted[1], np.float32), np.ones(wanted[2], np.float32)]
        elif layer.type == "Scale":
            blobs = [np.ones(wanted[0], np.float32)] + [np.zeros(s, np.float32) for s in wanted[1:]]
        else:
            raise ValueError(f"{name}: no weights recipe for {layer.type}")
        layer.blobs = blobs
    validate(net)
    if workdir is not None:
        proto, model = os.path.join(workdir, f"{name}.prototxt"), os.path.join(workdir, f"{name}.caffemodel")
        save_net(net, proto, model)
        net.source = proto
        return net, proto, model
    return net
