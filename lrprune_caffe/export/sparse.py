"""Sparse storage: ONNX sparse initializers and what each layout costs in bytes.

* :func:`sparse_if_smaller` (used by the exporter for ``export_model(...,
  sparse=True)``) and :func:`sparsify_model` (for an existing model) write a
  float initializer that is smaller sparse as a ``sparse_initializer`` entry (``SparseTensorProto``:
  the nonzero values + their int64 *linear* indices into the dense tensor,
  ascending - the form ``onnx.checker.check_model`` accepts; int32 indices
  load in onnxruntime but fail the checker). onnxruntime densifies them at
  load, so outputs are unchanged. Each nonzero costs 4 + 8 = 12 bytes
  against 4 per dense element: a tensor below ~67 % zeros stays dense.
  (``check_model(full_check=True)`` fails on any sparse initializer feeding
  a regular op - onnx's shape inference types it ``sparse_tensor`` - which is
  a limitation of onnx's shape inference, not of the file.)
* :func:`csr_relative_bytes`: Han et al.'s relative-index CSR (Deep Compression).
* :func:`storage_report`: per layer and in total, the params, nonzeros, and
  the bytes of the dense float32 data, the written caffemodel, the written
  ONNX file and the relative-index CSR layout.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

#: bytes per nonzero of a sparse initializer: float32 value + int64 linear index
SPARSE_BYTES_PER_NONZERO = 12
DENSE_BYTES_PER_ELEMENT = 4
#: the lowest ONNX IR version with sparse initializers
SPARSE_MIN_IR_VERSION = 6
_FLOAT_TYPES = None


def _float_types():
    global _FLOAT_TYPES
    if _FLOAT_TYPES is None:
        from onnx import TensorProto
        _FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    return _FLOAT_TYPES


def break_even_sparsity(value_bytes: int = 4, index_bytes: int = 8) -> float:
    """Sparsity above which values + linear indices take fewer bytes than dense:
    ``1 - value_bytes / (value_bytes + index_bytes)`` (2/3 for float32 + int64)."""
    return 1.0 - value_bytes / (value_bytes + index_bytes)


def to_sparse_tensor(tensor):
    """A ``SparseTensorProto`` (values + int64 linear indices, ascending) of a dense
    ``TensorProto``, with the same name, dtype and dims."""
    from onnx import numpy_helper
    return _sparse_of(numpy_helper.to_array(tensor), tensor.name)


def _sparse_of(arr, name):
    from onnx import helper, numpy_helper
    flat = arr.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(np.ascontiguousarray(flat[idx]), name)
    indices = numpy_helper.from_array(idx, f"{name}_indices")
    return helper.make_sparse_tensor(values, indices, list(arr.shape))


def sparse_if_smaller(arr, dense, min_sparsity: Optional[float] = None):
    """The ``SparseTensorProto`` of ``arr`` (whose dense ``TensorProto`` is ``dense``) when it is
    smaller than ``dense``, else None. Dense stays: non-float or 0-d tensors, tensors below
    ``min_sparsity`` zeros (when given), and any below the break-even (:func:`break_even_sparsity`)."""
    if dense.data_type not in _float_types() or arr.ndim == 0:
        return None
    size = arr.size
    nnz = int(np.count_nonzero(arr))
    sparsity = 1.0 - nnz / size if size else 0.0
    if min_sparsity is not None and sparsity < float(min_sparsity):
        return None
    itemsize = arr.dtype.itemsize
    if nnz * (itemsize + 8) >= size * itemsize:  # cheap pre-check: not smaller
        return None
    st = _sparse_of(arr, dense.name)
    return None if st.ByteSize() >= dense.ByteSize() else st


def sparsify_model(model, min_sparsity: Optional[float] = None):
    """A copy of an existing ``model`` where each floating-point initializer that is smaller as a
    ``SparseTensorProto`` becomes a ``sparse_initializer`` (see the module docstring; our own
    exporter writes them directly: ``export_model(..., sparse=True)``).

    An initializer stays dense when the sparse form is not smaller (below the
    break-even, :func:`break_even_sparsity`), when ``min_sparsity`` is given and
    its zero fraction is below it, when it is 0-d, stored externally, or also a
    graph input. The IR version is raised to 6 if lower (sparse initializers
    need it).
    """
    import onnx
    from onnx import TensorProto, numpy_helper
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    graph_inputs = {i.name for i in g.input}
    keep, sparse = [], []
    for t in g.initializer:
        st = None
        if (t.data_type in _float_types() and len(t.dims) and t.name not in graph_inputs
                and t.data_location != TensorProto.EXTERNAL):
            st = sparse_if_smaller(numpy_helper.to_array(t), t, min_sparsity)
        if st is None:
            keep.append(t)
        else:
            sparse.append(st)
    if sparse:
        del g.initializer[:]
        g.initializer.extend(keep)
        g.sparse_initializer.extend(sparse)
        if out.ir_version < SPARSE_MIN_IR_VERSION:
            out.ir_version = SPARSE_MIN_IR_VERSION
    return out


def dense_onnx_bytes(model) -> int:
    """What ``model`` would take with every initializer dense: its size minus what the sparse
    initializers take, plus their dense bytes."""
    dense_extra = 0
    for st in model.graph.sparse_initializer:
        n = 1
        for d in st.dims:
            n *= int(d)
        dense_extra += DENSE_BYTES_PER_ELEMENT * n - st.ByteSize()
    return model.ByteSize() + dense_extra


def csr_relative_bytes(array, index_bits: int = 8, value_bytes: int = 4) -> int:
    """Bytes of ``array`` in compressed sparse row form with *relative* indices.

    Han, Mao & Dally 2016, "Deep Compression: Compressing Deep Neural Networks
    with Pruning, Trained Quantization and Huffman Coding", ICLR, sec. 2 and
    fig. 2: the sparse structure is stored as CSR, each nonzero with the
    *difference* of its index from the previous nonzero encoded in
    ``index_bits`` bits (8 for conv layers, 5 for FC in the paper); "when we
    need an index difference larger than the bound, we use the zero padding
    solution": a filler zero entry is inserted every ``2**index_bits - 1``
    positions of a gap.

    Rows are ``array.shape[0]`` (output filters; a 0-d/1-d array is one row),
    each row is the rest flattened in C order. With ``gap`` = position -
    previous position in the row (the first nonzero's previous position is
    -1, so ``gap >= 1``) and ``m = 2**index_bits - 1`` the largest gap one
    entry spans::

        entries = sum over nonzeros of ceil(gap / m)      (ceil - 1 fillers each)
        bytes   = ceil(entries * (8 * value_bytes + index_bits) / 8) + 4 * (rows + 1)

    where ``4 * (rows + 1)`` are the int32 row pointers.
    """
    a = np.asarray(array)
    rows = a.shape[0] if a.ndim >= 2 else 1
    mat = a.reshape(rows, -1)
    m = (1 << int(index_bits)) - 1
    nnz = int(np.count_nonzero(mat))
    if nnz == mat.size:
        entries = mat.size  # dense: every gap is 1, one entry each
    elif 2 * nnz > mat.size:
        entries = nnz + _filler_entries(mat, m)  # mostly nonzero: walk the (few) zeros
    else:
        # rows in blocks of ~4M elements: np.nonzero's int64 indices of a VGG fc6 would be 1.6 GB
        step = max(1, (1 << 22) // max(1, mat.shape[1]))
        entries = 0
        for start in range(0, rows, step):
            r, c = np.nonzero(mat[start:start + step])  # row-major order
            if not r.size:
                continue
            prev = np.empty_like(c)
            prev[0] = -1
            prev[1:] = c[:-1]
            prev[1:][r[1:] != r[:-1]] = -1  # a new row starts at -1
            gaps = c - prev
            entries += int(((gaps + m - 1) // m).sum())
    bits = entries * (8 * int(value_bytes) + int(index_bits))
    return (bits + 7) // 8 + 4 * (rows + 1)


def _filler_entries(mat, m: int) -> int:
    """The filler entries of :func:`csr_relative_bytes` from the zeros: a nonzero after a run of
    ``L`` zeros in its row has ``gap = L + 1`` and ``ceil(gap / m) - 1 = L // m`` fillers; a run
    that ends its row precedes no nonzero and costs nothing."""
    cols = mat.shape[1]
    step = max(1, (1 << 22) // max(1, cols))
    extra = 0
    for start in range(0, mat.shape[0], step):
        z = np.flatnonzero(mat[start:start + step] == 0)  # row-major positions of the zeros
        if not z.size:
            continue
        row, col = np.divmod(z, cols)
        # runs: consecutive positions in one row
        new_run = np.ones(z.size, dtype=bool)
        new_run[1:] = (z[1:] != z[:-1] + 1) | (row[1:] != row[:-1])
        starts = np.flatnonzero(new_run)
        ends = np.append(starts[1:], z.size) - 1
        length = ends - starts + 1
        followed = col[ends] < cols - 1  # a nonzero comes after the run in its row
        extra += int((length[followed] // m).sum())
    return extra


# ---------------------------------------------------------------------------
# per-layer bytes of the written files

def caffemodel_layer_bytes(net) -> dict:
    """{layer name: bytes of its LayerParameter (with blobs) in the caffemodel}, plus
    ``""`` for the net-level fields; the values sum to the caffemodel's size exactly
    (mirrors :func:`lrprune_caffe.io.caffe.caffemodel_chunks`)."""
    from lrprune_caffe.io import wire
    out = {"": 0}
    if net.name:
        b = net.name.encode("utf-8")
        out[""] = len(wire.len_prefix(1, len(b))) + len(b)
    for layer in net.layers:
        head = layer.to_proto(with_blobs=False).ByteSize()
        blob_size = sum(wire.blob_chunks(arr, 7)[1] for arr in layer.blobs)
        out[layer.name] = len(wire.len_prefix(100, head + blob_size)) + head + blob_size
    return out


def _owner(name: str, layer_names) -> Optional[str]:
    """The layer an ONNX value belongs to: the longest layer name L with name == L or
    name starting with ``L/`` (the exporter names values ``layer/suffix``)."""
    best = None
    for ln in layer_names:
        if (name == ln or name.startswith(ln + "/")) and (best is None or len(ln) > len(best)):
            best = ln
    return best


def onnx_layer_bytes(model, net) -> dict:
    """{layer name: serialized bytes of its (sparse) initializers in ``model``};
    initializers that belong to no layer are under ``""``."""
    names = [layer.name for layer in net.layers]
    out = {}
    g = model.graph
    for t in g.initializer:
        k = _owner(t.name, names) or ""
        out[k] = out.get(k, 0) + t.ByteSize()
    for st in g.sparse_initializer:
        k = _owner(st.values.name, names) or ""
        out[k] = out.get(k, 0) + st.ByteSize()
    return out


def storage_report(net, onnx_model=None, index_bits: int = 8) -> dict:
    """Per layer with blobs and in total: ``params``, ``nonzero_params``, ``sparsity``,
    ``dense_bytes`` (4 per param), ``caffemodel_bytes`` (its share of the written
    caffemodel; the total is the file size), ``onnx_bytes`` (its initializers in
    ``onnx_model``, a ModelProto, if given; the total is the file size) and
    ``csr_bytes`` (:func:`csr_relative_bytes` with ``index_bits``, summed over blobs).
    Counts are of the zeros actually in the blobs, i.e. in the written caffemodel."""
    from lrprune_caffe.ir.analysis import sparsity_rows, sparsity_totals
    cm = caffemodel_layer_bytes(net)
    ox = onnx_layer_bytes(onnx_model, net) if onnx_model is not None else None
    rows = sparsity_rows(net)
    for row in rows:
        layer = net.layer(row["name"])
        row.update({"dense_bytes": DENSE_BYTES_PER_ELEMENT * row["params"],
                    "caffemodel_bytes": cm[layer.name],
                    "csr_bytes": sum(csr_relative_bytes(b, index_bits) for b in layer.blobs)})
        if ox is not None:
            row["onnx_bytes"] = ox.get(layer.name, 0)
    totals = {**sparsity_totals(rows), "dense_bytes": DENSE_BYTES_PER_ELEMENT * sum(r["params"] for r in rows),
              "caffemodel_bytes": sum(cm.values()), "csr_bytes": sum(r["csr_bytes"] for r in rows)}
    if onnx_model is not None:
        totals["onnx_bytes"] = onnx_model.ByteSize()
    return {"layers": rows, "totals": totals, "csr_index_bits": int(index_bits)}


__all__ = ["sparsify_model", "sparse_if_smaller", "dense_onnx_bytes", "to_sparse_tensor", "break_even_sparsity",
           "csr_relative_bytes",
           "caffemodel_layer_bytes", "onnx_layer_bytes", "storage_report",
           "SPARSE_BYTES_PER_NONZERO"]
