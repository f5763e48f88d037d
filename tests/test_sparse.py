"""Sparse storage: ONNX sparse initializers (onnx.checker + onnxruntime, outputs unchanged),
the break-even rule, Han et al.'s relative-index CSR byte count, and the storage report
(counts and sizes equal to the files actually written)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import golden_case, load_npz

from lrprune_caffe.api import write_net
from lrprune_caffe.io.caffe import load_net, read_caffemodel
from lrprune_caffe.export.onnx import export_model
from lrprune_caffe.transforms.prune import PruneSpec, prune_net
from lrprune_caffe.engines.runtime import ort_session
from lrprune_caffe.export.sparse import (break_even_sparsity, csr_relative_bytes, sparsify_model,
                                  storage_report)


def run(model, feed):
    sess = ort_session(model.SerializeToString(), threads=1)
    return sess.run(None, feed)


def gemm_model(w, b):
    """A hand-built Gemm model (y = x W^T + b) with dense initializers."""
    node = helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, w.shape[1]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, w.shape[0]])],
                          initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def sparse_array(rng, shape, sparsity):
    w = rng.standard_normal(shape).astype(np.float32)
    w.ravel()[rng.permutation(w.size)[:int(round(sparsity * w.size))]] = 0
    return w


# ---- sparsify_model ------------------------------------------------------------------------

def test_sparsify_hand_model_checker_and_ort():
    rng = np.random.default_rng(0)
    w = sparse_array(rng, (64, 100), 0.9)
    b = rng.standard_normal(64).astype(np.float32)
    dense = gemm_model(w, b)
    sp = sparsify_model(dense)
    assert [t.name for t in sp.graph.initializer] == ["b"]  # the dense bias stays dense
    (st,) = sp.graph.sparse_initializer
    assert st.values.name == "W" and list(st.dims) == [64, 100]
    assert st.indices.data_type == TensorProto.INT64 and list(st.indices.dims) == [np.count_nonzero(w)]
    idx = numpy_helper.to_array(st.indices)
    assert (np.diff(idx) > 0).all() and np.array_equal(idx, np.flatnonzero(w))
    onnx.checker.check_model(sp)
    assert len(dense.graph.sparse_initializer) == 0  # the input model is not modified
    x = rng.standard_normal((3, 100)).astype(np.float32)
    (y_dense,), (y_sparse,) = run(dense, {"x": x}), run(sp, {"x": x})
    assert np.abs(y_dense - y_sparse).max() <= 1e-5
    assert np.abs(y_dense - (x @ w.T + b)).max() < 1e-4


def test_break_even_and_min_sparsity():
    assert break_even_sparsity() == pytest.approx(2 / 3)
    rng = np.random.default_rng(1)
    b = np.zeros(8, np.float32) + 1
    for sparsity, expect_sparse in ((0.5, False), (0.6, False), (0.72, True), (0.95, True)):
        m = sparsify_model(gemm_model(sparse_array(rng, (8, 500), sparsity), b))
        assert (len(m.graph.sparse_initializer) == 1) == expect_sparse, sparsity
        if expect_sparse:
            onnx.checker.check_model(m)
    m = sparsify_model(gemm_model(sparse_array(rng, (8, 500), 0.9), b), min_sparsity=0.95)
    assert len(m.graph.sparse_initializer) == 0
    m = sparsify_model(gemm_model(sparse_array(rng, (8, 500), 0.9), b), min_sparsity=0.8)
    assert len(m.graph.sparse_initializer) == 1


def test_all_zero_tensor():
    w = np.zeros((4, 50), np.float32)
    m = sparsify_model(gemm_model(w, np.ones(4, np.float32)))
    onnx.checker.check_model(m)
    (y,) = run(m, {"x": np.ones((3, 50), np.float32)})
    assert np.array_equal(y, np.ones((3, 4), np.float32))


# ---- LeNet pruned to 90 % -----------------------------------------------------------------

@pytest.fixture(scope="module")
def lenet90():
    d = golden_case("lenet_mnist")
    net = load_net(d / "model.prototxt", d / "model.caffemodel")
    masks, rows = prune_net(net, PruneSpec(fraction=0.9))
    return net, masks, rows, load_npz(d / "inputs.npz")


def test_lenet_90_sparse_onnx_size_and_outputs(lenet90):
    net, _, _, inputs = lenet90
    dense = export_model(net, dynamic_batch=True)
    sp = sparsify_model(dense)
    onnx.checker.check_model(sp)
    assert {st.values.name for st in sp.graph.sparse_initializer} == {"conv1/weight", "conv2/weight",
                                                                      "ip1/weight", "ip2/weight"}
    ratio = len(sp.SerializeToString()) / len(dense.SerializeToString())
    assert ratio <= 0.35, ratio
    assert ratio >= 0.29  # values + int64 indices: the format's floor (~0.30)
    x = {"data": inputs["data"][:100]}
    (a,), (b,) = run(dense, x), run(sp, x)
    assert np.abs(a - b).max() <= 1e-5
    # unpruned LeNet: nothing is worth storing sparse
    d = golden_case("lenet_mnist")
    full = export_model(load_net(d / "model.prototxt", d / "model.caffemodel"))
    assert len(sparsify_model(full).graph.sparse_initializer) == 0


def test_storage_report_matches_written_files(lenet90, tmp_path):
    net, _, rows, _ = lenet90
    sp = sparsify_model(export_model(net))
    written = write_net(net, tmp_path / "out", extra={"model.onnx": sp.SerializeToString()})
    rep = storage_report(net, sp)
    t = rep["totals"]
    assert t["caffemodel_bytes"] == (tmp_path / "out" / "model.caffemodel").stat().st_size
    assert t["onnx_bytes"] == (tmp_path / "out" / "model.onnx").stat().st_size
    back = {wl.name: wl.blobs for wl in read_caffemodel(written["caffemodel"])}
    zeros = sum(int((b == 0).sum()) for blobs in back.values() for b in blobs)
    assert t["params"] - t["nonzero_params"] == zeros
    assert t["nonzero_params"] == sum(r["nonzero_params"] for r in rows)
    by = {r["name"]: r for r in rep["layers"]}
    assert set(by) == {name for name, blobs in back.items() if blobs}
    for name, r in by.items():
        blobs = back[name]
        assert r["nonzero_params"] == sum(int(np.count_nonzero(b)) for b in blobs)
        assert r["dense_bytes"] == 4 * r["params"]
        assert r["dense_bytes"] < r["caffemodel_bytes"] < r["dense_bytes"] + 200
        assert r["onnx_bytes"] < 0.4 * r["dense_bytes"] or r["params"] < 1000
        assert r["csr_bytes"] == sum(csr_reference_bytes(b) for b in blobs)
        assert r["csr_bytes"] < 0.2 * r["dense_bytes"] or r["params"] < 1000  # ~5 B per nonzero
    assert sum(r["caffemodel_bytes"] for r in rep["layers"]) <= t["caffemodel_bytes"]
    assert 0 < t["onnx_bytes"] - sum(r["onnx_bytes"] for r in rep["layers"]) < 2000  # graph, names


# ---- Han et al.'s relative-index CSR ------------------------------------------------------

def csr_reference_bytes(array, index_bits=8, value_bytes=4):
    """Han et al.'s relative-index CSR, element by element in plain Python (the reference
    for csr_relative_bytes; checked itself against the hand-computed layouts below)."""
    a = np.asarray(array)
    rows = a.reshape(a.shape[0] if a.ndim >= 2 else 1, -1)
    m = 2 ** index_bits - 1
    entries = 0
    for row in rows:
        last = -1  # the row's first nonzero counts from just before the row
        for pos in np.flatnonzero(row).tolist():
            gap = pos - last
            while gap > m:  # a filler zero entry spans m positions
                entries += 1
                gap -= m
            entries += 1
            last = pos
    bits = entries * (8 * value_bytes + index_bits)
    return -(-bits // 8) + 4 * (len(rows) + 1)


def _m(shape, ones, dtype=np.float32):
    a = np.zeros(shape, dtype)
    for idx in ones:
        a[idx] = 1
    return a


# (array, hand-counted entries, rows); bytes = ceil(entries * 40 / 8) + 4 * (rows + 1)
HAND_CSR = [
    # every row starts at column 0: each of those is a gap of 1 from the row's -1, one entry
    (_m((3, 8), [(0, 0), (1, 0), (1, 3), (2, 0)]), 1 + 2 + 1, 3),
    # a row whose first nonzero is at column 254 (gap 255: one entry) or 255 (gap 256: a filler)
    (_m((2, 600), [(0, 254), (1, 255)]), 1 + 2, 2),
    (_m((3, 600), [(0, 5), (1, 254), (2, 510)]), 1 + 1 + 3, 3),  # 511 = 2 * 255 + 1: 3 entries
    (_m((2, 600), [(1, 509)]), 2, 2),                               # 510 = 2 * 255: exactly 2
    # within a row: gaps 1, 511 (3 entries: 255 + 255 + 1), 510 (2 entries)
    (_m((1, 1100), [(0, 0), (0, 511), (0, 1021)]), 1 + 3 + 2, 1),
    # an empty row in the middle still has its row pointer; the next row restarts at -1
    (_m((3, 4), [(0, 1), (2, 0)]), 2, 3),
    # the previous row's last nonzero is not the next row's origin
    (_m((2, 300), [(0, 299), (1, 298)]), 2 + 2, 2),
    # 4-D conv weights: rows are filters, each flattened in C order
    (_m((2, 2, 2, 2), [(0, 1, 1, 1), (1, 0, 0, 0), (1, 1, 1, 1)]), 1 + 1 + 1, 2),
    # fully dense 2 x 3: one entry per element
    (np.ones((2, 3), np.float32), 6, 2),
    # 1-D: one row
    (_m((300,), [(0,), (299,)]), 1 + 2, 1),
]


@pytest.mark.parametrize("i", range(len(HAND_CSR)))
def test_csr_hand_computed_layouts(i):
    a, entries, rows = HAND_CSR[i]
    want = -(-entries * 40 // 8) + 4 * (rows + 1)
    assert csr_reference_bytes(a) == want
    assert csr_relative_bytes(a) == want


def test_csr_rows_across_processing_blocks():
    """Rows of 2**21 are counted two at a time: a block's first row restarts at -1 as any
    row does, and an all-zero block does not end the count."""
    a = _m((5, 1 << 21), [(0, 0), (1, 0), (2, 5), (4, 300)], np.int8)  # gaps 1, 1, 6, 301
    entries = 1 + 1 + 1 + 2
    assert csr_relative_bytes(a) == -(-entries * 40 // 8) + 4 * 6


def test_csr_random_matches_the_reference():
    rng = np.random.default_rng(3)
    for shape, sparsity in (((7, 900), 0.995), ((4, 3, 5, 5), 0.7), ((20, 40), 0.0), ((6, 1000), 0.999)):
        a = sparse_array(rng, shape, sparsity)
        for bits, vb in ((8, 4), (5, 1), (4, 2)):
            assert csr_relative_bytes(a, bits, vb) == csr_reference_bytes(a, bits, vb), (shape, bits)


def test_csr_relative_bytes_formula():
    # a dense row of 10: 10 entries x (32 + 8) bits = 50 bytes, + 2 int32 row pointers
    assert csr_relative_bytes(np.ones(10, np.float32)) == 50 + 8
    # gaps 1 and 600 (from position 0 to 600): 600 needs ceil(600/255) = 3 entries (2 fillers)
    a = np.zeros(1000, np.float32)
    a[[0, 600]] = 1
    assert csr_relative_bytes(a) == 4 * 5 + 8
    # a gap of exactly 255 fits one entry, 256 needs a filler
    a = np.zeros(600, np.float32)
    a[[254, 509]] = 1  # gaps 255 and 255
    assert csr_relative_bytes(a) == 2 * 5 + 8
    a[509], a[510] = 0, 1  # gap 256
    assert csr_relative_bytes(a) == 3 * 5 + 8
    # rows restart at their own start; 2-D: rows = shape[0]
    m = np.zeros((3, 300), np.float32)
    m[0, 0] = m[1, 299] = m[2, 10] = 1  # gaps 1, 300 (2 entries), 11
    assert csr_relative_bytes(m) == 4 * 5 + 4 * 4
    # 5-bit indices (Han et al.'s FC setting), 1-byte values (after quantization)
    v = np.zeros(100, np.float32)
    v[[0, 40, 99]] = 1  # gaps 1, 40 (2 entries at m=31), 59 (2 entries)
    assert csr_relative_bytes(v, index_bits=5, value_bytes=1) == (5 * 13 + 7) // 8 + 8
    assert csr_relative_bytes(np.zeros((4, 7), np.float32)) == 4 * 5


def test_onnx_layer_bytes_by_owner():
    """Each initializer counts for the longest layer name it is ``name`` or ``name/...`` of
    (``conv1_1/w`` is conv1_1's, not conv1's); the rest under ""."""
    from types import SimpleNamespace

    from lrprune_caffe.export.sparse import onnx_layer_bytes, to_sparse_tensor
    rng = np.random.default_rng(4)
    dense = {n: numpy_helper.from_array(rng.standard_normal(k).astype(np.float32), n)
             for n, k in (("conv1/weight", 30), ("conv1/bias", 3), ("conv1_1/weight", 50), ("shape_const", 4),
                          ("conv1", 2))}
    sp = to_sparse_tensor(numpy_helper.from_array(sparse_array(rng, (20, 20), 0.9), "conv1_1/bias"))
    fc = to_sparse_tensor(numpy_helper.from_array(sparse_array(rng, (30, 20), 0.9), "fc/weight"))
    g = helper.make_graph([], "g", [], [], initializer=list(dense.values()), sparse_initializer=[sp, fc])
    model = helper.make_model(g)
    net = SimpleNamespace(layers=[SimpleNamespace(name=n) for n in ("conv1", "conv1_1", "fc", "unused")])
    size = {n: t.ByteSize() for n, t in dense.items()}
    assert onnx_layer_bytes(model, net) == {
        "conv1": size["conv1/weight"] + size["conv1/bias"] + size["conv1"],
        "conv1_1": size["conv1_1/weight"] + sp.ByteSize(),
        "fc": fc.ByteSize(),  # sparse only
        "": size["shape_const"]}


# ---- what the mutation run (tools/mutation.py) found untested ------------------------------

def test_sparsify_a_1d_initializer_and_never_a_0d_one():
    """A 1-D tensor (a bias) mostly zeros is stored sparse too: checker and onnxruntime agree with
    numpy's x W^T + b; a 0-d tensor stays dense (no SparseTensorProto of a scalar)."""
    from lrprune_caffe.export.sparse import sparse_if_smaller
    rng = np.random.default_rng(5)
    w = rng.standard_normal((500, 10)).astype(np.float32)
    b = sparse_array(rng, (500,), 0.9)
    sp = sparsify_model(gemm_model(w, b))
    assert [t.name for t in sp.graph.initializer] == ["W"]
    (st,) = sp.graph.sparse_initializer
    assert st.values.name == "b" and list(st.dims) == [500]
    assert numpy_helper.to_array(st.indices).tolist() == np.flatnonzero(b).tolist()
    onnx.checker.check_model(sp)
    x = rng.standard_normal((3, 10)).astype(np.float32)
    (y,) = run(sp, {"x": x})
    assert np.abs(y - (x @ w.T + b)).max() < 1e-4
    for v in (0.0, 1.5):
        scalar = np.array(v, np.float32)
        assert sparse_if_smaller(scalar, numpy_helper.from_array(scalar, "s")) is None


def _runs_matrix(cols, zero_runs, dtype=np.float32):
    a = np.ones((len(zero_runs), cols), dtype)
    for r, runs in enumerate(zero_runs):
        for s, e in runs:
            a[r, s:e] = 0
    return a


def test_csr_mostly_nonzero_with_long_zero_runs():
    """More than half nonzero (the zero-walking count): a run of L zeros before a nonzero costs
    L // 255 fillers; a run ending its row costs none, and does not join the next row's run."""
    zero_runs = [
        [(100, 400), (1700, 2000)],  # 300 zeros -> gap 301: 1 filler; trailing 300: none
        [(0, 255), (500, 754)],      # 255 from the row start -> gap 256: 1 filler; 254 -> gap 255: none
        [(10, 520), (1700, 2000)],   # 510 -> gap 511: 2 fillers; trailing: none
    ]
    a = _runs_matrix(2000, zero_runs)
    nnz = 2000 * 3 - (300 + 300) - (255 + 254) - (510 + 300)
    assert int(np.count_nonzero(a)) == nnz == 4081 and 2 * nnz > a.size
    entries = nnz + 1 + 1 + 2
    want = -(-entries * 40 // 8) + 4 * (3 + 1)
    assert csr_reference_bytes(a) == want == 20441
    assert csr_relative_bytes(a) == want
    # 2-bit indices (m = 3): a run of L zeros before a nonzero costs L // 3 fillers
    b = _runs_matrix(12, [[(0, 3)], [(2, 4), (9, 12)], [(1, 8)]])  # 3 -> 1, 2 -> 0 (+ trailing), 7 -> 2
    nnz_b = 9 + 7 + 5
    assert 2 * nnz_b > b.size
    assert csr_relative_bytes(b, index_bits=2, value_bytes=1) == -(-(nnz_b + 3) * 10 // 8) + 4 * 4
    assert csr_reference_bytes(b, 2, 1) == csr_relative_bytes(b, 2, 1)


def test_storage_report_layers_absent_from_the_onnx_model_take_no_bytes(lenet90):
    """An ONNX model holding none of the net's initializers: every layer's onnx_bytes is 0 and
    the total is the (tiny) model's size."""
    net, _, _, _ = lenet90
    empty = helper.make_model(helper.make_graph([], "g", [], []))
    rep = storage_report(net, empty)
    assert rep["layers"] and all(r["onnx_bytes"] == 0 for r in rep["layers"])
    assert rep["totals"]["onnx_bytes"] == empty.ByteSize()
