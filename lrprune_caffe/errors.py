"""Error types, split the way OpenVINO's old Caffe frontend split them.

* :class:`UserError` - the command line asked for something impossible
  (a rank above the layer's maximum, a layer name that does not exist).
* :class:`BadFileError` - an input file is missing, unreadable or not what
  it claims to be (syntax error, truncated caffemodel, shape mismatch).
* anything else is an internal bug and keeps its traceback.

The CLI turns the first two into one line on stderr and exit status 2.
Messages name the file, the layer and its type, and what was expected.
"""

from __future__ import annotations


class LrpruneError(Exception):
    """Base of the errors that are the user's or the file's, not ours."""


class UserError(LrpruneError):
    """The request cannot be carried out as asked."""


class BadFileError(LrpruneError):
    """An input file is missing, unreadable or malformed."""

    def __init__(self, message: str, path=None, layer=None, layer_type=None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if layer is not None:
            parts.append(f"layer '{layer}'" + (f" ({layer_type})" if layer_type else ""))
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.layer = layer
        self.layer_type = layer_type


class EngineError(LrpruneError):
    """A runtime (onnxruntime, OpenCV) refused or failed to run a net."""


def engine_message(exc) -> str:
    """The telling part of an engine's exception text (OpenCV's 'error: (-2:...) WHAT in function ...')."""
    import re
    text = " ".join(str(exc).split())
    m = re.search(r"error: \(-?\d+:[^)]*\) (.*?)(?: in function '[^']*')?$", text)
    return m.group(1) if m else text


def layer_error(cls, layer, message, path=None):
    """Build ``cls`` naming a layer (an IR Layer) and its type."""
    if cls is BadFileError:
        return BadFileError(message, path=path, layer=layer.name, layer_type=layer.type)
    where = f"{path}: " if path else ""
    return cls(f"{where}layer '{layer.name}' ({layer.type}): {message}")
