"""The IR: :class:`Net` / :class:`Layer` (``net.py``), the layer registry (``layers/``),
shape inference, validation and params/MACs (``analysis.py``)."""

from .net import Layer, Net  # noqa: F401
