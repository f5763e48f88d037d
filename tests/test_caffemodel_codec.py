"""io/caffe.py's fast caffemodel reader against protobuf's own parser, on every encoding a
valid caffemodel may use: packed and unpacked floats, doubles and dims, data split over
several fields, legacy num/channels/height/width blobs, V1 layers; and corrupt input."""

from __future__ import annotations

import numpy as np
import pytest

from lrprune_caffe.errors import BadFileError
from lrprune_caffe.io import wire
from lrprune_caffe.io.caffe import read_caffemodel, read_net
from lrprune_caffe.schema.proto import pb


def f(field, wt, payload: bytes) -> bytes:
    """One field: key, then (for LEN) the length, then ``payload``."""
    if wt == wire.LEN:
        return wire.len_prefix(field, len(payload)) + payload
    return wire.key_bytes(field, wt) + payload


def unpacked_blob(shape, values, double=False) -> bytes:
    """A BlobProto with every repeated field unpacked (valid protobuf; Caffe never writes it)."""
    dims = b"".join(f(1, wire.VARINT, wire.varint_bytes(d)) for d in shape)
    if double:
        data = b"".join(f(8, wire.I64, np.float64(v).tobytes()) for v in values)
    else:
        data = b"".join(f(5, wire.I32, np.float32(v).tobytes()) for v in values)
    return f(7, wire.LEN, dims) + data


def layer(name, type_, blob_bytes: list) -> bytes:
    body = f(1, wire.LEN, name.encode()) + f(2, wire.LEN, type_.encode())
    body += b"".join(f(7, wire.LEN, b) for b in blob_bytes)
    return f(100, wire.LEN, body)


def protobuf_view(data: bytes):
    """[(name, type, [float32 arrays shaped as Caffe shapes them])] by protobuf's parser."""
    net = pb.NetParameter.FromString(data)
    out = []
    for lp in list(net.layer) + list(net.layers):
        blobs = []
        for b in lp.blobs:
            vals = np.array(b.double_data if len(b.double_data) and not len(b.data) else b.data, np.float32)
            shape = tuple(b.shape.dim) if b.HasField("shape") else (b.num, b.channels, b.height, b.width)
            blobs.append(vals.reshape(shape))
        out.append((lp.name, lp.type if isinstance(lp.type, str) else lp.type, blobs))
    return out


def read(tmp_path, data: bytes):
    p = tmp_path / "m.caffemodel"
    p.write_bytes(data)
    return read_caffemodel(p)


def assert_same(ours, ref):
    assert [w.name for w in ours] == [r[0] for r in ref]
    for w, (_, _, blobs) in zip(ours, ref):
        assert len(w.blobs) == len(blobs)
        for a, b in zip(w.blobs, blobs):
            assert a.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def test_protobuf_written_blobs(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    net = pb.NetParameter(name="n", layer=[
        pb.LayerParameter(name="conv", type="Convolution", blobs=[
            pb.BlobProto(shape=pb.BlobShape(dim=list(w.shape)), data=w.reshape(-1)),
            pb.BlobProto(shape=pb.BlobShape(dim=[4]), data=[1, 2, 3, 4])]),
        pb.LayerParameter(name="relu", type="ReLU"),
        pb.LayerParameter(name="legacy", type="InnerProduct", blobs=[
            pb.BlobProto(num=1, channels=1, height=2, width=3, data=[1, 2, 3, 4, 5, 6])]),
        pb.LayerParameter(name="dbl", type="Scale", blobs=[
            pb.BlobProto(shape=pb.BlobShape(dim=[3]), double_data=[0.5, -1.25, 1e30])]),
        pb.LayerParameter(name="scalar", type="Bias", blobs=[pb.BlobProto(shape=pb.BlobShape(), data=[7])]),
    ])
    data = net.SerializeToString()
    ours = read(tmp_path, data)
    assert_same(ours, protobuf_view(data))
    by = {w.name: w for w in ours}
    assert by["legacy"].legacy == [True] and by["conv"].legacy == [False, False]
    assert by["conv"].type == "Convolution" and by["relu"].blobs == []
    assert by["scalar"].blobs[0].shape == ()


def test_unpacked_fields_and_split_data(tmp_path):
    vals = [0.5, -2.0, 3.0, 4.5, 1e-3, 6.0]
    packed_half = f(5, wire.LEN, np.array(vals[:2], "<f4").tobytes())
    rest = b"".join(f(5, wire.I32, np.float32(v).tobytes()) for v in vals[2:])
    dims = f(1, wire.LEN, wire.varint_bytes(2) + wire.varint_bytes(3))
    mixed = f(7, wire.LEN, dims) + packed_half + rest  # packed, then unpacked: one repeated field
    two_packed = (f(7, wire.LEN, f(1, wire.VARINT, wire.varint_bytes(6)))
                  + f(5, wire.LEN, np.array(vals[:4], "<f4").tobytes())
                  + f(5, wire.LEN, np.array(vals[4:], "<f4").tobytes()))
    data = (layer("a", "InnerProduct", [unpacked_blob((2, 3), vals), unpacked_blob((6,), vals, double=True)])
            + layer("b", "InnerProduct", [mixed, two_packed])
            + layer("c", "Scale", [f(7, wire.LEN, f(1, wire.LEN, wire.varint_bytes(2)))
                                   + f(8, wire.LEN, np.array([1.5, 2.5], "<f8").tobytes())]))
    ours = read(tmp_path, data)
    assert_same(ours, protobuf_view(data))
    assert ours[0].blobs[0].shape == (2, 3) and ours[1].blobs[1].tolist() == np.float32(vals).tolist()


def test_v1_layers(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    net = pb.NetParameter(layers=[pb.V1LayerParameter(
        name="ip", type=pb.V1LayerParameter.INNER_PRODUCT,
        blobs=[pb.BlobProto(num=1, channels=1, height=2, width=3, data=w.reshape(-1))])])
    data = net.SerializeToString()
    (wl,) = read(tmp_path, data)
    assert (wl.name, wl.type, wl.legacy) == ("ip", "InnerProduct", [True])
    np.testing.assert_array_equal(wl.blobs[0], w)


@pytest.mark.parametrize("blob, why", [
    (f(5, wire.LEN, b"\x00" * 6), "packed float data of 6 bytes is not a multiple of 4"),
    (f(8, wire.LEN, b"\x00" * 12), "packed double data of 12 bytes is not a multiple of 8"),
    (f(7, wire.LEN, f(1, wire.LEN, wire.varint_bytes(3))) + f(5, wire.LEN, b"\x00" * 8),
     r"blob of shape \(3,\) holds 2 values, expected 3"),
    (f(7, wire.LEN, f(1, wire.LEN, wire.varint_bytes(-2) + wire.varint_bytes(-1))),
     "negative dimensions"),
])
def test_corrupt_blobs_are_one_bad_file_error(tmp_path, blob, why):
    with pytest.raises(BadFileError, match=why) as e:
        read(tmp_path, layer("x", "Convolution", [blob]))
    assert "m.caffemodel" in str(e.value) and "not a valid caffemodel" in str(e.value)


def test_not_a_caffemodel(tmp_path):
    with pytest.raises(BadFileError, match="is empty"):
        read(tmp_path, b"")
    with pytest.raises(BadFileError, match="is a text prototxt"):
        read(tmp_path, b'name: "x"\nlayer { name: "a" type: "ReLU" }\n')
    with pytest.raises(BadFileError, match="holds no layers"):
        read(tmp_path, pb.NetParameter(name="only a name").SerializeToString())
    with pytest.raises(BadFileError, match="unexpected field 9"):
        read(tmp_path, f(9, wire.VARINT, b"\x01") + layer("a", "ReLU", []))
    with pytest.raises(BadFileError, match="unexpected field 100"):  # a layer must be a message
        read(tmp_path, f(100, wire.VARINT, b"\x01"))


def test_read_net_checks_structure(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text('layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 } } }\n'
                 'layer { name: "d" type: "ReLU" bottom: "d" top: "r" }\n')
    with pytest.raises(BadFileError, match="duplicate layer name"):
        read_net(p)
    p.write_text('layer { name: "r" type: "ReLU" bottom: "nowhere" top: "r" }\n')
    with pytest.raises(BadFileError, match="bottom 'nowhere' is not produced"):
        read_net(p)


@pytest.mark.parametrize("header, want", [
    ('input: "a"\ninput_dim: 1\ninput_dim: 2\ninput_dim: 3\ninput_dim: 4\n', {"a": (1, 2, 3, 4)}),
    ('input: "a"\ninput: "b"\n' + "".join(f"input_dim: {d}\n" for d in (1, 2, 3, 4, 5, 6, 7, 8)),
     {"a": (1, 2, 3, 4), "b": (5, 6, 7, 8)}),
    ('input: "a"\ninput: "b"\ninput_shape { dim: 2 dim: 5 }\ninput_shape { dim: 3 }\n', {"a": (2, 5), "b": (3,)}),
    ('input: "a"\ninput_dim: 1\n', "1 input_dim values for 1 inputs"),
    ('input: "a"\ninput: "b"\ninput_shape { dim: 2 }\ninput_shape { dim: 2 }\ninput_shape { dim: 2 }\n',
     "3 input_shape entries for 2 inputs"),
    ('input_shape { dim: 2 }\n', "has input_dim/input_shape but no 'input:' name"),
    ('input_dim: 2\n', "has input_dim/input_shape but no 'input:' name"),
    ('input: "a"\n', "declares inputs without input_dim or input_shape"),
])
def test_input_header_upgrade(tmp_path, header, want):
    """Caffe's UpgradeNetInput: the deploy header becomes one Input layer first in the net."""
    p = tmp_path / "h.prototxt"
    p.write_text(header + 'layer { name: "r" type: "ReLU" bottom: "a" top: "r" }\n')
    if isinstance(want, str):
        with pytest.raises(BadFileError, match=want):
            read_net(p)
        return
    net = read_net(p)
    first = net.layers[0]
    assert (first.name, first.type, first.tops) == ("input", "Input", list(want))
    shapes = [tuple(s.dim) for s in first.param_msg("input_param").shape]
    assert dict(zip(first.tops, shapes)) == want
    assert [layer.name for layer in net.layers] == ["input", "r"]


def test_prototxt_given_as_weights_is_named_even_when_cut_mid_character(tmp_path):
    """Only the first 4096 bytes are sniffed: a UTF-8 character cut there is still text,
    a bad byte earlier is not."""
    pad = 4096 - len('name: "x"\n# ') - 1
    text = 'name: "x"\n# ' + "a" * pad + "\u00e9\u00e9\nlayer { name: \"a\" type: \"ReLU\" }\n"
    raw = text.encode("utf-8")
    assert raw[4095:4097] == "\u00e9".encode("utf-8")  # the character straddles byte 4096
    p = tmp_path / "m.caffemodel"
    p.write_bytes(raw)
    with pytest.raises(BadFileError, match="is a text prototxt"):
        read_caffemodel(p)
    p.write_bytes(b'name: "x"\n\xff\xfe' + raw[12:])
    with pytest.raises(BadFileError, match="not a valid caffemodel"):
        read_caffemodel(p)


def test_required_field_missing_names_the_layer(tmp_path):
    p = tmp_path / "c.prototxt"
    p.write_text('layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 } } }\n'
                 'layer { name: "clip" type: "Clip" bottom: "d" top: "c" clip_param { min: 0 } }\n')
    with pytest.raises(BadFileError) as e:
        read_net(p)
    assert "required field 'clip_param.max' is not set" in str(e.value)
    assert "'clip'" in str(e.value) and "Clip" in str(e.value)


def test_unknown_fields_inside_a_blob_shape_are_skipped(tmp_path):
    """Protobuf skips fields it does not know; so must the fast reader (BlobShape has only dim)."""
    shape = f(1, wire.LEN, wire.varint_bytes(2)) + f(2, wire.VARINT, wire.varint_bytes(9)) + \
        f(1, wire.VARINT, wire.varint_bytes(3))
    blob = f(7, wire.LEN, shape) + f(5, wire.LEN, np.arange(6, dtype="<f4").tobytes())
    data = layer("a", "InnerProduct", [blob])
    ours = read(tmp_path, data)
    assert_same(ours, protobuf_view(data))
    assert ours[0].blobs[0].shape == (2, 3)


def test_the_first_missing_required_field_is_named(tmp_path):
    p = tmp_path / "c.prototxt"
    p.write_text('layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 } } }\n'
                 'layer { name: "clip" type: "Clip" bottom: "d" top: "c" clip_param { } }\n')
    with pytest.raises(BadFileError, match="required field 'clip_param.min' is not set"):
        read_net(p)


def test_legacy_blobs_beyond_the_expected_count_are_refused(tmp_path):
    """A legacy (num/channels/height/width) caffemodel with a bias the prototxt turns off: Caffe's
    "Incompatible number of blobs", here one BadFileError naming the layer (not an IndexError)."""
    from lrprune_caffe.io.caffe import load_net
    (tmp_path / "n.prototxt").write_text(
        'name: "n"\ninput: "data" input_shape { dim: 1 dim: 3 }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        'inner_product_param { num_output: 2 bias_term: false } }\n')
    net = pb.NetParameter(layer=[pb.LayerParameter(name="ip", type="InnerProduct", blobs=[
        pb.BlobProto(num=1, channels=1, height=2, width=3, data=np.arange(6.0)),
        pb.BlobProto(num=1, channels=1, height=1, width=2, data=[1.0, 2.0])])])
    (tmp_path / "m.caffemodel").write_bytes(net.SerializeToString())
    with pytest.raises(BadFileError, match=r"layer 'ip' \(InnerProduct\): has 2 blobs, expected 1 of shapes "
                                           r"\[\(2, 3\)\] \(weights from .*m\.caffemodel\)"):
        load_net(tmp_path / "n.prototxt", tmp_path / "m.caffemodel")
    # the same weights without the bias: the legacy 1x1x2x3 blob takes the layer's (2, 3) shape
    del net.layer[0].blobs[1]
    (tmp_path / "m.caffemodel").write_bytes(net.SerializeToString())
    ip = load_net(tmp_path / "n.prototxt", tmp_path / "m.caffemodel").layer("ip")
    assert ip.blobs[0].shape == (2, 3) and ip.blobs[0].tolist() == [[0, 1, 2], [3, 4, 5]]
