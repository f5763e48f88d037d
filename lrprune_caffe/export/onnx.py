"""ONNX export: the IR lowered layer by layer, with Caffe's semantics exactly.

Each Caffe layer type lowers itself (``LayerSpec.to_onnx(layer, ctx)`` in
:mod:`lrprune_caffe.ir.layers`); this module owns the graph being built
(:class:`OnnxContext`) and the model around it:

* the opset is pinned (default 13, any of ``MIN_OPSET`` .. the installed
  ``onnx.defs.onnx_opset_version()``) and the IR version is the lowest that
  opset needs (``onnx.helper.find_min_ir_version_for``), so older runtimes
  load the file;
* weights are initializers, never graph inputs;
* names are Caffe's: node names are layer names (``layer/suffix`` for the
  extra nodes of a multi-node lowering), values are blob names. Caffe's
  in-place blobs are renamed SSA-style: the first version of blob ``conv1``
  is ``conv1``, the one written by in-place layer ``relu1`` is
  ``conv1/relu1``. A blob the graph exposes (the net's outputs and any
  ``extra_outputs``) keeps its plain name for its *final* value, which is
  what Caffe holds after ``forward()``;
* ``dynamic_batch`` makes dim 0 of the inputs (and of everything computed
  from it) symbolic, ``"N"``. Reshape targets are then written with ``-1``
  at the one position that follows the batch (found by inferring shapes at
  two batch sizes);
* ``fold_bn`` runs the :mod:`lrprune_caffe.transforms.fold_bn` pass first, on a
  copy of the net.

A layer without a lowering stops the export with a :class:`UserError` that
names it and its type.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from lrprune_caffe.errors import BadFileError, UserError
from lrprune_caffe.fileutil import atomic_write_bytes, check_output_file

from .sparse import SPARSE_MIN_IR_VERSION, sparse_if_smaller

MIN_OPSET = 11
DEFAULT_OPSET = 13
BATCH_PARAM = "N"


def max_opset() -> int:
    import onnx
    return int(onnx.defs.onnx_opset_version())


def check_opset(opset) -> int:
    try:
        opset = int(opset)
    except (TypeError, ValueError):
        raise UserError(f"opset must be an integer, got {opset!r}") from None
    hi = max_opset()
    if not MIN_OPSET <= opset <= hi:
        raise UserError(f"opset {opset} is not supported: choose {MIN_OPSET}..{hi} "
                        f"(onnx {_onnx_version()} knows up to {hi})")
    return opset


def _onnx_version() -> str:
    import onnx
    return onnx.__version__


#: with ``external=``, weights of at least this many values are left out of the graph (see :func:`export_model`)
EXTERNAL_MIN_SIZE = 1024
#: the location an external placeholder names (no file: the caller hands the values to the runtime)
EXTERNAL_LOCATION = "lrprune-caffe-in-memory"


def external_tensor(name: str, dtype, dims, location: str, offset=None, length=None):
    """A TensorProto of ``name``, numpy ``dtype`` and ``dims`` whose values are ONNX external data at
    ``location`` (``offset`` / ``length`` in bytes when given); nothing of the values is stored in it.
    (``onnx.external_data_helper.set_external_data`` needs the values in the tensor first.)"""
    from onnx import TensorProto, helper
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                    dims=[int(d) for d in dims], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    return t


def _external_placeholder(name, arr):
    """A TensorProto of ``arr``'s name, type and dims whose data is external (nothing stored)."""
    return external_tensor(name, arr.dtype, arr.shape, EXTERNAL_LOCATION)


class InMemoryWeights(dict):
    """``export_model(external=InMemoryWeights())``: every weight of at least
    :data:`EXTERNAL_MIN_SIZE` values is kept here ({initializer name: array}, the blob itself when it
    is already contiguous float32) and the graph holds a placeholder in its place; the runtime in
    this process is handed the arrays (:func:`lrprune_caffe.engines.runtime.ort_session`)."""

    def __call__(self, name, arr):
        if arr.size < EXTERNAL_MIN_SIZE:
            return None
        self[name] = arr
        return _external_placeholder(name, arr)


class OnnxContext:
    """The graph under construction, seen from the layer being lowered.

    A lowering reads its inputs with :meth:`bottom`, names its results with
    :meth:`top`, and adds nodes with :meth:`node`, weights with
    :meth:`const`. ``in_shapes`` / ``out_shapes`` are the layer's static
    blob shapes at the net's batch size; ``in_shapes2`` / ``out_shapes2``
    the same at twice that batch when the batch is dynamic (else equal), so
    a lowering can tell which dims follow the batch.
    """

    def __init__(self, opset: int, dynamic_batch: bool, sparse: bool = False, external=None):
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.sparse = sparse  # float weights smaller as sparse tensors become sparse initializers
        self.external = external  # (name, array) -> TensorProto with external data, or None (export_model)
        self.nodes: list = []
        self.initializers: list = []
        self.sparse_initializers: list = []
        self._used_values: set = set()
        self._used_nodes: set = set()
        # per-layer state
        self.layer = None
        self.in_shapes: list = []
        self.out_shapes: list = []
        self.in_shapes2: list = []
        self.out_shapes2: list = []
        self._in_names: list = []
        self._out_names: list = []
        self._aliases: dict = {}
        self._pinned: set = set()  # tops whose name must be kept (exposed final values)
        self.top_dims: dict = {}  # blob -> dims (None: unknown) of a data-dependent top

    def set_top_dims(self, i: int, dims) -> None:
        """Declare top ``i``'s dims when Caffe's shape is data-dependent (None where unknown)."""
        self.top_dims[self.layer.tops[i]] = list(dims)

    # ---- names -------------------------------------------------------
    def unique_value(self, base: str) -> str:
        name, i = base, 1
        while name in self._used_values:
            name = f"{base}_{i}"
            i += 1
        self._used_values.add(name)
        return name

    def _unique_node(self, base: str) -> str:
        name, i = base, 1
        while name in self._used_nodes:
            name = f"{base}_{i}"
            i += 1
        self._used_nodes.add(name)
        return name

    def tmp(self, suffix: str) -> str:
        """A fresh intermediate value name, ``layer/suffix``."""
        return self.unique_value(f"{self.layer.name}/{suffix}")

    # ---- the layer's inputs and outputs -------------------------------
    def bottom(self, i: int = 0) -> str:
        return self._in_names[i]

    def top(self, i: int = 0) -> str:
        return self._out_names[i]

    @property
    def n_bottoms(self) -> int:
        return len(self._in_names)

    @property
    def n_tops(self) -> int:
        return len(self._out_names)

    def alias(self, i: int, name: str) -> None:
        """Top ``i`` is the value ``name`` itself (no node), unless its name is pinned."""
        if i in self._pinned:
            self.node("Identity", [name], self.top(i))
        else:
            self._aliases[i] = name

    # ---- graph building ----------------------------------------------
    def node(self, op: str, inputs: Iterable[str], out=None, suffix: Optional[str] = None,
             n_out: int = 1, **attrs):
        """Add a node; returns its output name (a list when ``out`` is a list or n_out > 1).

        A node without ``suffix`` is the layer's main node and is named after
        the layer (once); helper nodes, given a ``suffix``, are ``layer/suffix``.
        """
        from onnx import helper
        if suffix is None and self.layer.name not in self._used_nodes:
            name = self._unique_node(self.layer.name)
        else:
            name = self._unique_node(f"{self.layer.name}/{suffix or op.lower()}")
        if out is None:
            outs = [self.tmp(suffix or op.lower()) for _ in range(n_out)]
        elif isinstance(out, str):
            outs = [out]
        else:
            outs = list(out)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if (isinstance(out, str) or (out is None and n_out == 1)) else outs

    def const(self, suffix: str, array, dtype=np.float32) -> str:
        """An initializer named ``layer/suffix`` holding ``array`` (a sparse one when the
        context is sparse and that is smaller: :func:`lrprune_caffe.export.sparse.sparse_if_smaller`)."""
        from onnx import numpy_helper
        name = self.unique_value(f"{self.layer.name}/{suffix}")
        arr = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        tensor = self.external(name, arr) if self.external is not None and not self.sparse else None
        if tensor is not None:  # written elsewhere: no copy of the values in the graph
            self.initializers.append(tensor)
            return name
        tensor = numpy_helper.from_array(arr, name)
        st = sparse_if_smaller(arr, tensor) if self.sparse else None
        if st is None:
            self.initializers.append(tensor)
        else:
            self.sparse_initializers.append(st)
        return name

    def ints(self, suffix: str, values) -> str:
        return self.const(suffix, np.asarray(list(values), dtype=np.int64).reshape(-1), np.int64)

    def scalar(self, suffix: str, value: float) -> str:
        return self.const(suffix, np.asarray(value, dtype=np.float32))

    def shape_values(self, shape, shape2) -> list:
        """A Reshape target: static dims, ``-1`` at the one dim that follows the batch."""
        shape, shape2 = [int(d) for d in shape], [int(d) for d in shape2]
        varying = [i for i, (a, b) in enumerate(zip(shape, shape2)) if a != b]
        if len(shape) != len(shape2) or len(varying) > 1:
            raise UserError(f"layer '{self.layer.name}' ({self.layer.type}): its output shape "
                            f"{tuple(shape)} depends on the batch in more than one dimension; "
                            f"export without --dynamic-batch")
        if varying:
            shape[varying[0]] = -1
        return shape

    def reshape(self, x: str, shape, shape2=None, out=None, suffix=None) -> str:
        """Reshape ``x`` to ``shape`` (``shape2``: the same at twice the batch)."""
        target = self.shape_values(shape, shape if shape2 is None else shape2)
        const = self.ints(f"{suffix}_shape" if suffix else "shape", target)
        return self.node("Reshape", [x, const], out=out, suffix=suffix)

    def error(self, message: str) -> UserError:
        return UserError(f"layer '{self.layer.name}' ({self.layer.type}): {message}")


def _version_names(net, exposed: set) -> list:
    """ONNX names for every layer's tops (SSA renaming of in-place blobs).

    A blob that the graph exposes gets its plain name on its final version;
    any other blob on its first. Other versions are ``blob/layer``.
    """
    last_writer = {}
    for i, layer in enumerate(net.layers):
        for t in layer.tops:
            last_writer[t] = i
    seen = set()
    names = []
    for i, layer in enumerate(net.layers):
        row = []
        for t in layer.tops:
            if t in exposed:
                plain = last_writer[t] == i
            else:
                plain = t not in seen
            row.append((t, plain))
            seen.add(t)
        names.append(row)
    return names


def _value_info(name, shape, shape2, dynamic: bool, batch_sizes):
    from onnx import TensorProto, helper
    dims = []
    for a, b in zip(shape, shape2):
        if a == b:
            dims.append(int(a))
        elif dynamic and (a, b) == batch_sizes:
            dims.append(BATCH_PARAM)
        else:
            dims.append(None)
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _check_lowerings(net):
    from lrprune_caffe.ir.layers import get_spec
    for layer in net.layers:
        if layer.type == "Input":
            continue
        spec = get_spec(layer.type)
        if not spec.lowers():
            why = spec.no_lowering
            raise UserError(_where(net) + f"layer '{layer.name}' ({layer.type}): no ONNX lowering for "
                            f"layer type '{layer.type}'" + (f": {why}" if why else "")
                            + f" (lowered types: {', '.join(lowered_types())})")


def lowered_types() -> list:
    """Registered layer types the exporter lowers (``LayerSpec.lowers``), and Input."""
    from lrprune_caffe.ir.layers import known_types, get_spec
    return [t for t in known_types() if t == "Input" or get_spec(t).lowers()]


def _where(net) -> str:
    return f"{net.source}: " if net.source else ""


def _shapes(net, batch_factor: int = 1):
    from lrprune_caffe.ir.analysis import validate
    inputs = net.input_shapes()
    missing = [k for k, v in inputs.items() if v is None]
    if missing:
        raise UserError(_where(net) + f"input '{missing[0]}' has no shape; the ONNX graph needs one")
    if batch_factor == 1:
        return validate(net)
    scaled = {k: (v[0] * batch_factor, *v[1:]) for k, v in inputs.items()}
    try:
        return validate(net, input_shapes=scaled, weights=False)
    except BadFileError as e:
        raise UserError(f"cannot export with a dynamic batch: at batch x{batch_factor} {e}") from None


def build_graph(net, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, extra_outputs=(), sparse=False,
                outputs=None, external=None):
    """(GraphProto, output names) of ``net``; no folding, no model wrapper. ``sparse``: float
    weights smaller as sparse tensors are written as sparse initializers. ``outputs``: the graph
    outputs instead of the net's (then ``extra_outputs`` are added to them). ``external``:
    ``(name, array) -> TensorProto or None``, a weight written as external data (see
    :func:`export_model`)."""
    from onnx import helper
    from lrprune_caffe.ir.layers import NoLowering, ShapeError, get_spec

    _check_lowerings(net)
    shapes = _shapes(net)
    shapes2 = _shapes(net, 2) if dynamic_batch else shapes
    net_inputs = net.inputs()
    outputs = list(net.outputs()) if outputs is None else list(outputs)
    for o in extra_outputs or ():
        if o not in shapes.blobs:
            raise UserError(_where(net) + f"no blob named '{o}' in the net (asked as an output)")
        if o not in outputs and o not in net_inputs:
            outputs.append(o)
    exposed = set(outputs)

    ctx = OnnxContext(opset, dynamic_batch, sparse, external)
    # every Caffe blob name is reserved for its plain version
    for layer in net.layers:
        ctx._used_values.update(layer.tops)
    versions = _version_names(net, exposed)
    current = {}
    graph_inputs = []
    batch_pair = None
    for i, layer in enumerate(net.layers):
        ctx.layer = layer
        ctx._aliases = {}
        ctx.in_shapes = [shapes.blobs[b] for b in layer.bottoms]
        ctx.in_shapes2 = [shapes2.blobs[b] for b in layer.bottoms]
        ctx.out_shapes = list(shapes.outputs[layer.name])
        ctx.out_shapes2 = list(shapes2.outputs[layer.name])
        if layer.type == "Input":
            for t in layer.tops:
                s, s2 = shapes.blobs[t], shapes2.blobs[t]
                if batch_pair is None:
                    batch_pair = (s[0], s2[0])
                graph_inputs.append(_value_info(t, s, s2, dynamic_batch, (s[0], s2[0])))
                current[t] = t
            continue
        if any(s is None for s in ctx.in_shapes):
            raise UserError(_where(net) + f"layer '{layer.name}' ({layer.type}): input shapes unknown")
        ctx._in_names = [current[b] for b in layer.bottoms]
        ctx._out_names = []
        ctx._pinned = set()
        for j, (t, plain) in enumerate(versions[i]):
            if plain:
                ctx._out_names.append(t)
                if t in exposed:
                    ctx._pinned.add(j)
            else:
                ctx._out_names.append(ctx.unique_value(f"{t}/{layer.name}"))
        spec = get_spec(layer.type)
        try:
            spec.to_onnx(layer, ctx)
        except (NoLowering, ShapeError) as e:
            raise UserError(_where(net) + f"layer '{layer.name}' ({layer.type}): {e}") from None
        for j, t in enumerate(layer.tops):
            current[t] = ctx._aliases.get(j, ctx._out_names[j])

    # graph outputs: plain names; an aliased final value gets an Identity
    graph_outputs = []
    for o in outputs:
        if current[o] != o:  # not expected (exposed blobs are pinned), kept as a safety net
            ctx.layer = net.producer(o)
            ctx.node("Identity", [current[o]], o, suffix="output")
        if shapes.blobs[o] is None:  # data-dependent: the dims its lowering declared
            graph_outputs.append(helper.make_tensor_value_info(o, 1, ctx.top_dims.get(o)))
            continue
        graph_outputs.append(_value_info(o, shapes.blobs[o], shapes2.blobs[o], dynamic_batch,
                                         batch_pair or (None, None)))
    graph = helper.make_graph(ctx.nodes, net.name or "caffe_net", graph_inputs, graph_outputs,
                              initializer=ctx.initializers, sparse_initializer=ctx.sparse_initializers)
    return graph, outputs


def export_model(net, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, fold_bn: bool = False,
                 extra_outputs=(), report: Optional[dict] = None, sparse: bool = False, cut=None, external=None):
    """``net`` as an ``onnx.ModelProto`` (opset pinned, IR version matched to it).

    ``extra_outputs`` names intermediate Caffe blobs to expose as graph
    outputs too (their final, post-in-place values). ``fold_bn`` folds
    BatchNorm(+Scale) into the preceding convolutions first (on a copy).
    ``report``, if given, is filled with what was done (folds, counts).
    ``sparse``: weights that are smaller as ``SparseTensorProto`` (values + int64 linear
    indices) are written as sparse initializers (IR version at least 6); see
    :mod:`lrprune_caffe.export.sparse`.
    ``cut`` (blob names): export up to those blobs only (``export-onnx --cut``, for runtimes
    with their own post-processing): they become the graph outputs, and the layers they do not
    need are dropped (:meth:`lrprune_caffe.ir.net.Net.cut`).
    ``external``: ``(name, array) -> TensorProto or None``; where it returns a tensor (one whose
    data is external), that tensor is the initializer instead of a copy of the array, so that a
    VGG-sized model is not copied into protobuf several times. Two kinds: :class:`InMemoryWeights`
    (for a runtime in this process, never for a file: onnxruntime gets the arrays through
    ``SessionOptions.add_external_initializers``, see :func:`lrprune_caffe.engines.runtime.ort_session`)
    and the latency tools' side file (:mod:`lrprune_caffe.engines.latency_net`). Not with ``sparse``.
    """
    from onnx import helper
    from lrprune_caffe.version import __version__

    opset = check_opset(opset)
    folded = None
    if fold_bn:
        from lrprune_caffe.transforms import run_pass
        from lrprune_caffe.transforms import fold_bn as _fold  # noqa: F401  (registers the pass)
        net = net.copy()
        folded = run_pass("fold_bn", net)
    if cut:
        net = net.cut(cut)
    graph, outputs = build_graph(net, opset, dynamic_batch, extra_outputs, sparse=sparse,
                                 outputs=list(dict.fromkeys(cut)) if cut else None, external=external)
    opsets = [helper.make_opsetid("", opset)]
    ir_version = helper.find_min_ir_version_for(opsets)
    if len(graph.sparse_initializer):
        ir_version = max(ir_version, SPARSE_MIN_IR_VERSION)
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version,
                              producer_name="lrprune-caffe", producer_version=__version__)
    src = net.source or "a Caffe net"
    model.doc_string = f"exported from {src} by lrprune-caffe {__version__}"
    if report is not None:
        report.update({
            "opset": opset, "ir_version": int(model.ir_version), "dynamic_batch": bool(dynamic_batch),
            "nodes": len(graph.node), "initializers": len(graph.initializer),
            "params": int(sum(int(np.prod(t.dims)) for t in graph.initializer
                              if t.data_type == 1)),
            "inputs": [i.name for i in graph.input], "outputs": outputs,
        })
        if folded is not None:
            report["fold_bn"] = {"changed": folded.changed, "reason": folded.reason,
                                 "details": list(folded.details)}
    return model


def save_onnx(net, path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, fold_bn: bool = False,
              extra_outputs=(), cut=None) -> dict:
    """Export and write ``path`` atomically (nothing written on error). Returns a report."""
    check_output_file(path)
    report = {}
    model = export_model(net, opset=opset, dynamic_batch=dynamic_batch, fold_bn=fold_bn,
                         extra_outputs=extra_outputs, report=report, cut=cut)
    from .precision import consumer_notes
    report["consumer_notes"] = consumer_notes(model)
    data = model.SerializeToString()
    atomic_write_bytes(path, data)
    report["path"] = str(path)
    report["bytes"] = len(data)
    return report


def export_files(prototxt, weights, output, phase="TEST", **kw) -> dict:
    """CLI entry: load a Caffe net and write its ONNX file."""
    from lrprune_caffe.io.caffe import load_net
    if "opset" in kw:
        check_opset(kw["opset"])  # fail before reading large files
    check_output_file(output)
    net = load_net(prototxt, weights, phase=phase)
    report = save_onnx(net, output, **kw)
    report["notes"] = list(net.notes) + report["consumer_notes"]
    return report


__all__ = ["export_model", "save_onnx", "export_files", "build_graph", "OnnxContext", "check_opset",
           "max_opset", "lowered_types", "MIN_OPSET", "DEFAULT_OPSET"]
