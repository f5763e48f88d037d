"""Per-type layer specs; importing this package fills the registry."""

from .base import LayerSpec, NoLowering, ShapeError, get_spec, known_types, register  # noqa: F401
from . import conv, pooling, dense, normalization, elementwise, structure, ssd  # noqa: F401,E402
