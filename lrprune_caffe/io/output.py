"""Writing a net's files: OUTDIR/model.prototxt (+ .caffemodel) and any extra files, all or nothing."""

from __future__ import annotations

from lrprune_caffe.errors import UserError
from lrprune_caffe.fileutil import OutputSet
from lrprune_caffe.ir.analysis import validate

from .caffe import PROTOBUF_LIMIT, caffemodel_chunks, net_to_prototxt


def write_net(net, outdir, name="model", with_weights=True, extra=None, check=True) -> dict:
    """Write OUTDIR/name.prototxt (+ .caffemodel) and any ``extra`` {filename: bytes|str},
    all or nothing. Returns {kind: path}. ``check=False`` skips validation (a training
    net with every phase kept has Data layers and phase twins that do not validate)."""
    if check:
        validate(net, weights=with_weights)
    text = net_to_prototxt(net)
    written = {}
    chunks = None
    if with_weights:
        chunks, total = caffemodel_chunks(net)
        if total > PROTOBUF_LIMIT:
            raise UserError(f"{outdir}: the caffemodel would be {total:,} bytes, over Caffe's 2 GB limit")
    try:
        with OutputSet(outdir) as out:
            out.write_text(f"{name}.prototxt", text)
            written["prototxt"] = str(out.final(f"{name}.prototxt"))
            if chunks is not None:
                with open(out.path(f"{name}.caffemodel"), "wb") as fh:
                    for c in chunks:
                        fh.write(c)
                written["caffemodel"] = str(out.final(f"{name}.caffemodel"))
            for fname, content in (extra or {}).items():
                if isinstance(content, str):
                    out.write_text(fname, content)
                else:
                    out.write_bytes(fname, content)
                written[fname] = str(out.final(fname))
    except OSError as e:  # disk full, no permission...: nothing is left behind (OutputSet)
        raise UserError(f"{outdir}: cannot write the output: {e.strerror or e}") from e
    return written


__all__ = ["write_net"]
