"""lrprune-caffe: low-rank factorization and pruning for legacy Caffe models.

Reads Caffe prototxt/caffemodel files without Caffe, rewrites conv and FC
layers into low-rank pairs, prunes, fine-tunes, and writes Caffe files that
Caffe and OpenCV load unchanged, or ONNX for mobile runtimes.
"""

from .version import __version__  # noqa: F401

from .errors import BadFileError, LrpruneError, UserError  # noqa: E402,F401


_API = {"load_net", "inspect_net", "convert", "write_net"}


def __getattr__(name):
    # keep "import lrprune_caffe" light: the API module loads on first use
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'lrprune_caffe' has no attribute {name!r}")
