"""ir/masks.py on hand-made values: keys, the checks against a net, masks.npz as numpy reads
it, exact zeros, and the union of pruned sets."""

from __future__ import annotations

import io

import numpy as np
import pytest

from lrprune_caffe.errors import BadFileError
from lrprune_caffe.ir.masks import (apply_masks, check_masks, grow_masks, load_masks, mask_key, masks_npz,
                                    split_key)
from lrprune_caffe.ir.net import Layer, Net


def _net():
    """Two layers, names with a slash: conv/a (2 blobs: 2x3 weights, 2 biases), ip (1 blob 4)."""
    w = np.array([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]], np.float32)
    return Net(name="n", layers=[Layer("conv/a", "Convolution", blobs=[w, np.array([7.0, -8.0], np.float32)]),
                                 Layer("ip", "InnerProduct", blobs=[np.arange(4, dtype=np.float32)])])


@pytest.mark.parametrize("key, want", [("conv1/0", ("conv1", 0)), ("a/b/12", ("a/b", 12)),
                                       (("x/y", "3"), ("x/y", 3)), ("l//1", ("l/", 1))])
def test_split_key(key, want):
    assert split_key(key) == want
    assert split_key(mask_key(*want)) == want


@pytest.mark.parametrize("key", ["conv1", "/0", "conv1/", "conv1/x", "conv1/-1", "a/1.0", ("a",), ("a", 1, 2)])
def test_split_key_refuses(key):
    with pytest.raises(ValueError, match="is not '<layer>/<blob index>'"):
        split_key(key)


def test_mask_key():
    assert mask_key("a/b") == "a/b/0" and mask_key("c", 2) == "c/2" and mask_key("c", np.int64(1)) == "c/1"


def test_check_masks_keeps_fitting_masks_as_bool():
    net = _net()
    m = check_masks(net, {("conv/a", 1): np.array([1, 0]), "ip/0": np.array([True, False, True, True]),
                          "conv/a/0": np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])})
    assert sorted(m) == ["conv/a/0", "conv/a/1", "ip/0"]
    assert all(v.dtype == np.bool_ for v in m.values())
    assert m["conv/a/1"].tolist() == [True, False]
    assert m["conv/a/0"].tolist() == [[False, True, True], [True, True, False]]
    assert check_masks(net, {}) == {} and check_masks(net, None) == {}


@pytest.mark.parametrize("masks, message", [
    ({"conv/a/2": np.ones(2, bool)}, r"layer conv/a \(Convolution\) has 2 blobs, the mask is for blob 2"),
    ({"ip/1": np.ones(4, bool)}, r"layer ip \(InnerProduct\) has 1 blobs, the mask is for blob 1"),
    ({"nope/0": np.ones(4, bool)}, r"no layer 'nope' in the net \(mask 'nope/0'; expected keys like "
                                   r"conv/a/0, conv/a/1, ip/0\.\.\.\)"),
    ({"ip/0": np.ones(3, bool)}, r"layer ip blob 0 shape \(3,\) vs \(4,\)"),
    ({"ip/0": np.ones((4, 1), bool)}, r"layer ip blob 0 shape \(4, 1\) vs \(4,\)"),
    ({"ip": np.ones(4, bool)}, "mask key 'ip' is not"),
    ({"ip/0": np.array([0, 1, 2, 1])}, "mask 'ip/0' holds int64 values, expected bool"),
    ({"ip/0": np.array([0.0, 0.5, 1.0, 1.0])}, "mask 'ip/0' holds float64 values, expected bool"),
    ({"ip/0": np.array(["a", "b", "c", "d"])}, "holds <U1 values"),
])
def test_check_masks_refuses_with_the_file(masks, message):
    with pytest.raises(BadFileError, match=message) as e:
        check_masks(_net(), masks, source="m.npz")
    assert str(e.value).startswith("m.npz: ")


def test_masks_npz_is_what_numpy_reads(tmp_path):
    m = {("conv/a", 0): np.array([[1, 0, 1], [0, 1, 1]]), "ip/0": np.array([True, False, False, True])}
    data = masks_npz(m)
    with np.load(io.BytesIO(data)) as z:  # numpy's own reader: keys and bool values
        assert sorted(z.files) == ["conv/a/0", "ip/0"]
        assert z["conv/a/0"].dtype == np.bool_ and z["conv/a/0"].tolist() == [[True, False, True],
                                                                               [False, True, True]]
        assert z["ip/0"].tolist() == [True, False, False, True]
    assert data[:2] == b"PK"  # a zip (np.savez_compressed)
    p = tmp_path / "m.npz"
    p.write_bytes(data)
    free = load_masks(p)  # no net: keys and values checked only
    assert sorted(free) == ["conv/a/0", "ip/0"] and free["ip/0"].dtype == np.bool_
    fitted = load_masks(p, _net())
    assert {k: v.tolist() for k, v in fitted.items()} == {k: v.tolist() for k, v in free.items()}


def test_load_masks_without_a_net_refuses_bad_keys_and_values(tmp_path):
    p = tmp_path / "k.npz"
    np.savez(p, **{"conv1": np.ones(3, bool)})
    with pytest.raises(BadFileError, match=r"k\.npz: mask key 'conv1' is not"):
        load_masks(p)
    np.savez(p, **{"conv1/0": np.array([0.25, 1.0])})
    with pytest.raises(BadFileError, match=r"k\.npz: mask 'conv1/0' holds float64 values"):
        load_masks(p)
    np.savez(p, **{"conv1/0": np.array([0, 1], np.uint8)})
    assert load_masks(p)["conv1/0"].tolist() == [False, True]


def test_apply_masks_zeros_exactly_and_only_the_masked():
    net = _net()
    apply_masks(net, {"conv/a/0": np.array([[True, False, True], [False, True, False]]),
                      ("conv/a", 1): np.array([0, 1])})
    w, b = net.layers[0].blobs
    assert w.tolist() == [[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]] and b.tolist() == [0.0, -8.0]
    assert not np.signbit(w[w == 0]).any() and not np.signbit(b[b == 0]).any()  # -2, -4, -6, 7: +0.0
    assert w.dtype == np.float32 and b.dtype == np.float32
    assert net.layers[1].blobs[0].tolist() == [0.0, 1.0, 2.0, 3.0]  # no mask: untouched
    apply_masks(net, {})
    assert w.tolist() == [[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]]


def test_apply_masks_refuses_a_misfit():
    net = _net()
    with pytest.raises(ValueError, match=r"mask for layer 'ip' blob 0 has shape \(3,\), the blob \(4,\)"):
        apply_masks(net, {"ip/0": np.ones(3, bool)})
    assert net.layers[1].blobs[0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_grow_masks_is_the_union_of_pruned_sets():
    t, f = True, False
    old = {"a/0": np.array([t, t, f, f]), "b/0": np.array([f, t])}
    new = {"a/0": np.array([t, f, t, f]), "c/0": np.array([t, f])}
    g = grow_masks(old, new)
    assert sorted(g) == ["a/0", "b/0", "c/0"]
    assert g["a/0"].tolist() == [t, f, f, f]  # pruned in either -> pruned
    assert g["b/0"].tolist() == [f, t] and g["c/0"].tolist() == [t, f]
    assert new["a/0"].tolist() == [t, f, t, f]  # inputs not changed
    assert grow_masks({}, {}) == {}
