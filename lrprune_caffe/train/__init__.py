"""Fine-tuning with PyTorch (an optional extra: ``pip install 'lrprune-caffe[train]'``).

Nothing outside this package imports torch, and this ``__init__`` does not
either: the names below load their modules on first use, and every entry
point calls :func:`require_torch` first, so a missing torch is one clear
:class:`~lrprune_caffe.errors.UserError` instead of a traceback.

* :mod:`.torch_model` - ``build_torch_model(net)``: a ``torch.nn.Module`` that
  computes exactly what Caffe computes, layer by layer, from our IR.
* :mod:`.solver` - ``SolverSettings`` (from a Caffe ``solver.prototxt`` or
  flags) and Caffe's SGD / Nesterov / Adam update rules with lr policies.
* :mod:`.finetune` - ``finetune(net, train_data, ...) -> (net, history)``.
"""

from __future__ import annotations

TORCH_MISSING = ("fine-tuning needs PyTorch: pip install 'lrprune-caffe[train]' "
                 "(or pip install torch)")


def require_torch():
    """Import and return torch, or raise UserError saying how to install it."""
    from lrprune_caffe.errors import UserError
    try:
        import torch
    except ImportError:
        raise UserError(TORCH_MISSING) from None
    return torch


# torch-free modules, imported eagerly (this also binds the name ``finetune`` to the
# function, not to the submodule of the same name)
from .solver import SolverSettings, read_solver  # noqa: E402
from .finetune import finetune  # noqa: E402
from lrprune_caffe.ir.masks import check_masks, load_masks  # noqa: E402,F401  (the masks fine-tuning holds)

_LAZY = {"build_torch_model": "torch_model", "CaffeTorchNet": "torch_model", "run_torch": "torch_model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["require_torch", "TORCH_MISSING", "SolverSettings", "read_solver", "finetune", "load_masks",
           "check_masks", *_LAZY]
