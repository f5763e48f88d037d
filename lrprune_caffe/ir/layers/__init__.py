"""Per-type layer specs; importing this package fills the registry (contract: :mod:`.base`)."""

from .base import (CannotShrink, ChannelShrink, LayerSpec, NoLowering, ShapeError,  # noqa: F401
                   factorizable_types, get_spec, known_types, prunable_types, register, torch_types)
from . import conv, pooling, dense, normalization, elementwise, structure, ssd  # noqa: F401,E402
