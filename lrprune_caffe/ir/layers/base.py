"""The layer registry: one class per Caffe layer type, the one home of what we know about it.

``@register("Type")`` on a :class:`LayerSpec` subclass makes it the spec of
that type (one type per class; a shared base class carries common
behaviour). Adding a layer type means adding one class in one file under
``ir/layers/``; every pass, exporter and the torch model ask the registry.

A spec knows, for its type:

Shapes and costs
    * ``infer(layer, in_shapes)``: output shapes from input shapes (Caffe's
      ``Reshape()``), raising :class:`ShapeError` on impossible geometry;
    * ``weight_shapes(layer, in_shapes)``: the blob shapes Caffe expects, used to
      validate a caffemodel and to count parameters without one;
    * ``macs(layer, in_shapes, out_shapes)``: multiply-accumulates per forward.

ONNX (:mod:`lrprune_caffe.export.onnx`)
    * ``to_onnx(layer, ctx)``: its lowering; ``lowers()`` says whether there is
      one; ``no_lowering`` says why a registered type has none.

PyTorch (:mod:`lrprune_caffe.train.torch_model`)
    * ``to_torch(layer)``: ``fn(bottoms, blobs, training) -> list of tops``, a
      functional op computing what Caffe computes (torch is imported inside the
      method: ``ir/`` never imports torch at module import); ``has_torch()``;
    * ``trainable``: its blobs are trained parameters (else frozen buffers);
      ``torch_needs_blobs``: the torch model refuses the layer without blobs.

Compression
    * ``factorize_kind``: ``"conv"`` / ``"ip"``, the low-rank chain
      :mod:`lrprune_caffe.transforms.factorize` builds for it, or None
      (``factorizable``);
    * ``prunable``: its blob 0 (the weights) may be pruned element-wise;
    * channel shrinking (:mod:`lrprune_caffe.transforms.structured_prune`):
      ``removable_outputs(layer, in_shape)`` -> ``(number of outputs, axis of
      blob 0 indexed by output)`` for a layer whose outputs can be removed, with
      ``num_output(layer)`` / ``set_num_output(layer, n)``; ``shrink_input(layer, shape, block, in_place)``
      -> :class:`ChannelShrink`, how a reader follows the removal of channels
      of its bottom. Both raise :class:`CannotShrink` saying why not.

A type nobody registered gets :class:`UnknownSpec`: its outputs are
"unknown" (None) and so is everything computed from them; nothing crashes,
and no pass touches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_REGISTRY: dict = {}


class ShapeError(ValueError):
    """A layer's parameters do not fit its inputs (wrapped with file/layer by the caller)."""


class NoLowering(NotImplementedError):
    """The layer type has no ONNX lowering."""


class CannotShrink(Exception):
    """Channels cannot be removed here; the message says why ('' when the type alone is why)."""


@dataclass(frozen=True)
class ChannelShrink:
    """How a reader follows the removal of channels of its bottom (structured pruning).

    The channels lie on axis 1 of the bottom; once flattened, each is a block
    of ``block`` consecutive values (1 before any Flatten).

    * ``edits``: ``(blob index, axis, block)``: keep only the kept channels'
      entries of that blob along ``axis`` (``block`` entries per channel);
    * ``follow``: ``(top, block)``: the blobs that carry the channels on;
    * ``consumes``: its weights read the channels (edit 0): the path ends here;
    * ``note``: a remark for the report (e.g. the result is not exact).
    """

    edits: tuple = ()
    follow: tuple = ()
    consumes: bool = False
    note: str = ""


def register(type_name: str):
    """Class decorator: the decorated spec handles Caffe type ``type_name`` (one per class)."""
    def deco(cls):
        if type_name in _REGISTRY:
            raise ValueError(f"layer type '{type_name}' is registered twice")
        cls.type_name = type_name
        _REGISTRY[type_name] = cls()
        return cls
    return deco


def get_spec(type_name: str) -> "LayerSpec":
    return _REGISTRY.get(type_name) or _UNKNOWN


def known_types() -> list:
    return sorted(_REGISTRY)


def factorizable_types() -> tuple:
    """Types :mod:`~lrprune_caffe.transforms.factorize` replaces by low-rank chains (sorted)."""
    return tuple(t for t in known_types() if _REGISTRY[t].factorizable)


def prunable_types() -> tuple:
    """Types whose weights (blob 0) may be pruned element-wise (sorted)."""
    return tuple(t for t in known_types() if _REGISTRY[t].prunable)


def torch_types() -> tuple:
    """Types with a torch op (sorted)."""
    return tuple(t for t in known_types() if _REGISTRY[t].has_torch())


def output_removable_types() -> tuple:
    """Types whose outputs structured pruning can remove (sorted)."""
    return tuple(t for t in known_types()
                 if type(_REGISTRY[t]).removable_outputs is not LayerSpec.removable_outputs)


def prod(dims) -> int:
    return int(math.prod(int(d) for d in dims))


def canon_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ShapeError(f"axis {axis} is out of range for a {ndim}-D input")
    return axis + ndim if axis < 0 else axis


def no_torch(layer, why: str = ""):
    """The UserError for a layer the torch model cannot build (``why`` starts with a space)."""
    from lrprune_caffe.errors import UserError, layer_error
    return layer_error(UserError, layer, f"the PyTorch model does not support this layer type{why}")


def broadcast_from(t, ndim: int, axis: int):
    """View a tensor of shape bottom.shape[axis:axis+k] for broadcasting over ``ndim`` axes."""
    shape = (1,) * axis + tuple(t.shape) + (1,) * (ndim - axis - t.dim())
    return t.reshape(shape)


def follow_channels(layer, block: int, edits=(), note: str = "") -> ChannelShrink:
    """The :class:`ChannelShrink` of a layer mapping channel ``c`` to channel ``c``: its one top carries them."""
    if len(layer.tops) != 1:
        raise CannotShrink("it has several tops")
    return ChannelShrink(edits=tuple(edits), follow=((layer.tops[0], block),), note=note)


class LayerSpec:
    #: the Caffe type this spec handles (set by @register)
    type_name: str = ""
    #: number of bottoms needed for inference: None = any
    min_bottoms: int = 1
    #: why a registered type has no ONNX lowering ('' when it has one or none was tried)
    no_lowering: str = ""
    #: its blobs are trained parameters in the torch model (else frozen buffers)
    trainable: bool = False
    #: the torch model refuses a layer of this type that has no blobs
    torch_needs_blobs: bool = False
    #: "conv" / "ip": the low-rank chain factorize builds; None: not factorized
    factorize_kind = None
    #: its blob 0 (the weights) may be pruned element-wise
    prunable: bool = False

    # -- shapes and costs --
    def infer(self, layer, in_shapes):
        """Output shapes; default: every top has the first bottom's shape."""
        return [in_shapes[0]] * len(layer.tops)

    def weight_shapes(self, layer, in_shapes):
        """Expected blob shapes (list of tuples); [] when the type has no blobs."""
        return []

    def macs(self, layer, in_shapes, out_shapes) -> int:
        return 0

    # -- ONNX --
    def to_onnx(self, layer, ctx):
        why = f": {self.no_lowering}" if self.no_lowering else ""
        raise NoLowering(f"no ONNX lowering for layer type '{layer.type}'{why}")

    def lowers(self, type_name: str = "") -> bool:
        """Whether ``to_onnx`` lowers layers of this type (``type_name`` is ignored).

        True when the class overrides ``to_onnx``. A lowering may still refuse
        one layer whose parameters Caffe itself would reject (with a reason).
        """
        return type(self).to_onnx is not LayerSpec.to_onnx and not self.no_lowering

    # -- PyTorch --
    def to_torch(self, layer):
        """``fn(bottoms, blobs, training) -> list of top tensors``; raise :func:`no_torch` if unsupported."""
        raise no_torch(layer)

    def has_torch(self) -> bool:
        return type(self).to_torch is not LayerSpec.to_torch

    # -- compression --
    @property
    def factorizable(self) -> bool:
        return self.factorize_kind is not None

    def removable_outputs(self, layer, in_shape) -> tuple:
        """(number of outputs, axis of blob 0 indexed by output), or raise CannotShrink.

        Called for a layer with one bottom (of shape ``in_shape``), one top, not in place.
        """
        raise CannotShrink(f"only {' and '.join(output_removable_types())} outputs can be removed, "
                           f"not {layer.type}")

    def num_output(self, layer) -> int:
        """The number of outputs the layer's parameters declare (``set_num_output``'s counterpart)."""
        raise NotImplementedError(f"{layer.type} outputs cannot be removed")

    def set_num_output(self, layer, n: int) -> None:
        """Record in the layer's parameters that it now has ``n`` outputs."""
        raise NotImplementedError(f"{layer.type} outputs cannot be removed")

    def shrink_input(self, layer, shape, block: int, in_place: bool) -> ChannelShrink:
        """How this layer (one bottom, of ``shape``) follows the removal of channels of its bottom.

        ``block``: values per channel on axis 1 (see :class:`ChannelShrink`);
        ``in_place``: the layer writes its bottom. Default: it cannot.
        """
        raise CannotShrink()


class UnknownSpec(LayerSpec):
    min_bottoms = 0

    def infer(self, layer, in_shapes):
        return [None] * len(layer.tops)

    def weight_shapes(self, layer, in_shapes):
        return None  # cannot tell: accept whatever blobs the file has


_UNKNOWN = UnknownSpec()
