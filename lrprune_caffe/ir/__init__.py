"""The IR: :class:`Net` / :class:`Layer` (``net.py``), the layer registry (``layers/``),
shape inference, validation, params/MACs and zeros (``analysis.py``), weight masks (``masks.py``)."""

from .net import Layer, Net  # noqa: F401
