"""Issue 11, item 4: the bad-input classes test_bad_input.py did not cover yet. Each: ONE line,
exit 2, naming the file (and layer), nothing written, inputs untouched."""

from __future__ import annotations

import os
import re
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lrprune_caffe.cli.main import main
from lrprune_caffe.errors import UserError
from lrprune_caffe.io import caffe as caffe_io
from lrprune_caffe.io import prototxt as prototxt_io
from lrprune_caffe.ir.net import array_to_blobproto
from lrprune_caffe.schema.proto import pb

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lenet"
PROTO, MODEL = EXAMPLE / "lenet.prototxt", EXAMPLE / "lenet.caffemodel"
INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc, err, *patterns):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lrprune-caffe: error: ")
    for pat in patterns:
        assert re.search(pat, lines[0]), f"{pat!r} not in {lines[0]!r}"


def write(tmp_path, name, data):
    p = tmp_path / name
    (p.write_bytes if isinstance(data, bytes) else p.write_text)(data)
    return p


def lenet_weights_msg():
    msg = pb.NetParameter()
    msg.ParseFromString(MODEL.read_bytes())
    return msg


# ---- what a wrong file is -----------------------------------------------------------

def _onnx_bytes(tmp_path):
    onnx = pytest.importorskip("onnx")
    from lrprune_caffe.export.onnx import export_model
    return export_model(caffe_io.load_net(PROTO, MODEL)).SerializeToString() if onnx else b""


def _zip_bytes(tmp_path):
    p = tmp_path / "a.npz"
    np.savez(p, x=np.zeros(3))
    return p.read_bytes()


@pytest.mark.parametrize("make, words", [
    (_onnx_bytes, "is an ONNX model"), (_zip_bytes, r"is a zip archive \(an \.npz\?\)"),
    (lambda t: b"\x89PNG\r\n\x1a\n" + bytes(100), "is a PNG image"),
    (lambda t: b"\x1f\x8b\x08" + bytes(50), "is gzip-compressed data"),
], ids=["onnx", "zip", "png", "gzip"])
def test_wrong_kind_of_file_as_caffemodel(tmp_path, capsys, make, words):
    w = write(tmp_path, "w.caffemodel", make(tmp_path))
    rc, out, err = run(capsys, "inspect", PROTO, w)
    one_line(rc, err, r"w\.caffemodel", words, r"expected a binary \.caffemodel")


def test_caffemodel_and_zip_as_prototxt(tmp_path, capsys):
    rc, out, err = run(capsys, "inspect", MODEL)
    one_line(rc, err, r"lenet\.caffemodel", r"is a binary caffemodel \(weights\)", r"expected a text \.prototxt")
    z = write(tmp_path, "n.prototxt", _zip_bytes(tmp_path))
    rc, out, err = run(capsys, "inspect", z)
    one_line(rc, err, "is a zip archive", r"expected a text \.prototxt")


def test_non_utf8_prototxt(tmp_path, capsys):
    p = write(tmp_path, "latin1.prototxt", ('name: "caf\xe9"\n' + INPUT).encode("latin-1"))
    rc, out, err = run(capsys, "inspect", p)
    one_line(rc, err, r"latin1\.prototxt", "not UTF-8 text", "0xe9", "offset 10")


# ---- size, nesting ------------------------------------------------------------------

def test_enormous_prototxt_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    big = tmp_path / "big.prototxt"
    with open(big, "wb") as f:
        f.truncate(3 * 2**30)  # sparse zeros: binary
    rc, out, err = run(capsys, "inspect", big)
    one_line(rc, err, r"big\.prototxt", "binary file of 3,221,225,472 bytes")
    text = write(tmp_path, "t.prototxt", PROTO.read_text() + "\n" * 2000)
    monkeypatch.setattr(prototxt_io, "PROTOTXT_LIMIT", 1000)
    rc, out, err = run(capsys, "inspect", text)
    one_line(rc, err, r"t\.prototxt", "too large for a net definition", "under 0 MB|under")


def test_deeply_nested_prototxt_is_bounded(tmp_path, capsys):
    depth = 200_000
    p = write(tmp_path, "deep.prototxt", "layer { " * depth + "}" * depth)
    tracemalloc.start()
    rc, out, err = run(capsys, "inspect", p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    one_line(rc, err, r"deep\.prototxt")
    assert peak < 200 * 2**20


# ---- mixed V1 / current ----------------------------------------------------------------

def test_mixed_layer_and_layers_prototxt(tmp_path, capsys):
    p = write(tmp_path, "mixed.prototxt", 'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 8\ninput_dim: 8\n'
              'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n'
              'layers { name: "s" type: SIGMOID bottom: "r" top: "s" }\n')
    rc, out, err = run(capsys, "inspect", p)
    one_line(rc, err, r"mixed\.prototxt", "mixes current 'layer {}' and legacy V1 'layers {}'")


def test_mixed_layer_and_layers_caffemodel(tmp_path, capsys):
    msg = lenet_weights_msg()
    v1 = msg.layers.add(name="extra", type=pb.V1LayerParameter.INNER_PRODUCT)
    v1.blobs.add().CopyFrom(array_to_blobproto(np.ones((2, 2), np.float32)))
    w = write(tmp_path, "mixed.caffemodel", msg.SerializeToString())
    rc, out, err = run(capsys, "inspect", PROTO, w)
    one_line(rc, err, r"mixed\.caffemodel", "mixes current 'layer' and legacy V1 'layers'", "Caffe refuses")


# ---- dims -------------------------------------------------------------------------

@pytest.mark.parametrize("dims, words", [
    ((2**40, 2**40, 2**40, 1), "more than a 64-bit count holds"),
    ((1, 1, 10**6, 10**6), "more than this machine's"),
], ids=["overflow", "memory"])
def test_dims_too_large_are_refused_before_allocating(tmp_path, capsys, dims, words):
    p = write(tmp_path, "huge.prototxt", 'layer { name: "data" type: "Input" top: "data" input_param { shape { '
              + " ".join(f"dim: {d}" for d in dims) + ' } } }\nlayer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n')
    tracemalloc.start()
    rc, out, err = run(capsys, "inspect", p)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    one_line(rc, err, r"layer 'data' \(Input\)", words)
    assert peak < 100 * 2**20


# ---- blobs that do not fit the layer ---------------------------------------------------

def _edit_weights(tmp_path, layer, fn, name="w.caffemodel"):
    msg = lenet_weights_msg()
    lp = next(lp for lp in msg.layer if lp.name == layer)
    fn(lp)
    return write(tmp_path, name, msg.SerializeToString())


def test_missing_bias(tmp_path, capsys):
    w = _edit_weights(tmp_path, "ip2", lambda lp: lp.blobs.pop())
    rc, out, err = run(capsys, "inspect", PROTO, w)
    one_line(rc, err, r"layer 'ip2' \(InnerProduct\)", "has 1 blobs, expected 2", "the bias is missing")


def test_wrong_bias_length(tmp_path, capsys):
    def shorter(lp):
        lp.blobs[1].CopyFrom(array_to_blobproto(np.zeros(9, np.float32)))
    w = _edit_weights(tmp_path, "ip2", shorter)
    rc, out, err = run(capsys, "inspect", PROTO, w)
    one_line(rc, err, r"layer 'ip2' \(InnerProduct\)", r"blob 1 \(bias\) has shape \(9,\)", r"need \(10,\)")


def test_transposed_fc(tmp_path, capsys):
    def transpose(lp):
        from lrprune_caffe.ir.net import blobproto_to_array
        lp.blobs[0].CopyFrom(array_to_blobproto(np.ascontiguousarray(blobproto_to_array(lp.blobs[0]).T)))
    w = _edit_weights(tmp_path, "ip2", transpose)
    rc, out, err = run(capsys, "inspect", PROTO, w)
    one_line(rc, err, r"layer 'ip2' \(InnerProduct\)", r"blob 0 \(weights\) has shape \(500, 10\)", "transpose")


# ---- NaN / Inf ------------------------------------------------------------------------

@pytest.fixture
def nan_weights(tmp_path):
    def poison(lp):
        from lrprune_caffe.ir.net import blobproto_to_array
        a = blobproto_to_array(lp.blobs[0]).copy()
        a.flat[:3] = np.nan
        a.flat[5] = np.inf
        lp.blobs[0].CopyFrom(array_to_blobproto(a))
    return _edit_weights(tmp_path, "conv2", poison, "nan.caffemodel")


def test_nonfinite_weights_inspect_warns(nan_weights, capsys):
    rc, out, err = run(capsys, "inspect", PROTO, nan_weights)
    assert rc == 0
    assert "layer 'conv2' (Convolution) blob 0: 3 NaN, 1 infinite" in err


@pytest.mark.parametrize("cmd", [["convert", "-o", "{out}"], ["compress", "-o", "{out}", "--rank", "4", "--no-verify"],
                                 ["export-onnx", "-o", "{out}.onnx"]])
def test_nonfinite_weights_refused_unless_allowed(nan_weights, tmp_path, capsys, cmd):
    if cmd[0] == "export-onnx":
        pytest.importorskip("onnx")
    out = tmp_path / "out"
    argv = [cmd[0], PROTO, nan_weights, *[a.format(out=out) for a in cmd[1:]]]
    rc, _, err = run(capsys, *argv)
    one_line(rc, err, r"nan\.caffemodel", r"layer 'conv2' \(Convolution\)", "3 NaN and 1 infinite",
             "--allow-nonfinite")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]
    rc, _, err = run(capsys, *argv, "--allow-nonfinite")
    assert rc == 0, err


# ---- writing a caffemodel over 2 GB ---------------------------------------------------------

def test_caffemodel_over_2gb_refused_before_writing(tmp_path, capsys):
    net = caffe_io.load_net(PROTO, MODEL)
    ip1 = net.layer("ip1")
    ip1.blobs[0] = np.broadcast_to(np.float32(0), (2**29 + 1, 800))  # 1.7 TB as a 0-stride view
    tracemalloc.start()
    with pytest.raises(UserError, match=r"over the 2 GB limit"):
        caffe_io.save_caffemodel(net, tmp_path / "big.caffemodel")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20
    assert list(tmp_path.iterdir()) == []


def test_caffemodel_size_from_shapes_matches_the_bytes():
    net = caffe_io.load_net(PROTO, MODEL)
    chunks, total = caffe_io.caffemodel_chunks(net)
    assert caffe_io.caffemodel_size(net) == total == sum(len(bytes(c)) for c in chunks)


# ---- protobuf too old -------------------------------------------------------------------

def test_protobuf_too_old_is_one_line(capsys, monkeypatch):
    from lrprune_caffe.schema import proto
    with pytest.raises(UserError, match=r"protobuf 3\.20\.3 is installed; lrprune-caffe needs protobuf >= 4\.21"):
        proto.check_protobuf_runtime("3.20.3")
    proto.check_protobuf_runtime("4.21.0")
    import google.protobuf
    monkeypatch.setattr(google.protobuf, "__version__", "3.19.6")

    def reimport(*a, **k):
        proto.check_protobuf_runtime()  # what importing the schema does first
    from lrprune_caffe import api
    monkeypatch.setattr(api, "inspect_net", reimport)
    rc, out, err = run(capsys, "inspect", PROTO)
    one_line(rc, err, "protobuf 3.19.6 is installed", ">= 4.21")


def test_zip_is_named_even_when_it_holds_a_caffemodel(tmp_path, capsys):
    z = tmp_path / "model.caffemodel"
    with zipfile.ZipFile(z, "w") as f:
        f.write(MODEL, "lenet.caffemodel")
    rc, out, err = run(capsys, "inspect", PROTO, z)
    one_line(rc, err, "is a zip archive")
    assert os.path.getsize(MODEL) > 0


# ---- what tools/fuzz.py found (10-minute run) ------------------------------------------------

def test_fuzz_finding_weighted_layer_without_bottom(tmp_path, capsys):
    src = PROTO.read_text()
    i = src.index('name: "ip2"')
    j = src.index('bottom: "ip1"', i)
    p = write(tmp_path, "nobottom.prototxt", src[:j] + src[j + len('bottom: "ip1"'):])
    rc, out, err = run(capsys, "inspect", p, MODEL)
    one_line(rc, err, r"layer 'ip2' \(InnerProduct\)", r"has 0 bottom\(s\)", "needs at least 1")


def test_fuzz_finding_level_out_of_range(capsys):
    rc, out, err = run(capsys, "inspect", PROTO, "--level", "99999999999")
    one_line(rc, err, "--level 99999999999 is out of range")
