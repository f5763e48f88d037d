"""The layer registry: one class per Caffe layer type, in one place.

Each :class:`LayerSpec` subclass knows, for its type(s):

* ``infer(layer, in_shapes)``: output shapes from input shapes (Caffe's
  ``Reshape()``), raising :class:`ShapeError` on impossible geometry;
* ``weight_shapes(layer, in_shapes)``: the blob shapes Caffe expects, used to
  validate a caffemodel and to count parameters without one;
* ``macs(layer, in_shapes, out_shapes)``: multiply-accumulates per forward;
* ``to_onnx(layer, ctx)``: its ONNX lowering (see :mod:`lrprune_caffe.export.onnx`).

A type nobody registered gets :class:`UnknownSpec`: its outputs are
"unknown" (None) and so is everything computed from them; nothing crashes.
"""

from __future__ import annotations

import math

_REGISTRY: dict = {}


class ShapeError(ValueError):
    """A layer's parameters do not fit its inputs (wrapped with file/layer by the caller)."""


class NoLowering(NotImplementedError):
    """The layer type has no ONNX lowering."""


def register(*type_names):
    def deco(cls):
        inst = cls()
        for t in type_names:
            _REGISTRY[t] = inst
        cls.type_names = type_names
        return cls
    return deco


def get_spec(type_name: str) -> "LayerSpec":
    return _REGISTRY.get(type_name) or _UNKNOWN


def known_types() -> list:
    return sorted(_REGISTRY)


def prod(dims) -> int:
    return int(math.prod(int(d) for d in dims))


def canon_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ShapeError(f"axis {axis} is out of range for a {ndim}-D input")
    return axis + ndim if axis < 0 else axis


class LayerSpec:
    #: Caffe type names this spec handles (set by @register)
    type_names: tuple = ()
    #: number of bottoms needed for inference: None = any
    min_bottoms: int = 1
    #: registered types that ``to_onnx`` does not lower: {type: why}
    unlowered_types: dict = {}

    def infer(self, layer, in_shapes):
        """Output shapes; default: every top has the first bottom's shape."""
        return [in_shapes[0]] * len(layer.tops)

    def weight_shapes(self, layer, in_shapes):
        """Expected blob shapes (list of tuples); [] when the type has no blobs."""
        return []

    def macs(self, layer, in_shapes, out_shapes) -> int:
        return 0

    def to_onnx(self, layer, ctx):
        raise NoLowering(f"no ONNX lowering for layer type '{layer.type}'")

    def lowers(self, type_name: str) -> bool:
        """Whether ``to_onnx`` lowers layers of ``type_name`` (one of this spec's types).

        True when the class overrides ``to_onnx`` and does not list the type in
        ``unlowered_types``. A lowering may still refuse one layer whose
        parameters Caffe itself would reject (with a reason).
        """
        return type(self).to_onnx is not LayerSpec.to_onnx and type_name not in self.unlowered_types


class UnknownSpec(LayerSpec):
    min_bottoms = 0

    def infer(self, layer, in_shapes):
        return [None] * len(layer.tops)

    def weight_shapes(self, layer, in_shapes):
        return None  # cannot tell: accept whatever blobs the file has


_UNKNOWN = UnknownSpec()
