"""The importable API. The CLI only parses arguments and calls these."""

from __future__ import annotations

from pathlib import Path

from .ir.analysis import layer_stats, totals, validate
from .io.caffe import caffemodel_chunks, load_net, net_to_prototxt, PROTOBUF_LIMIT
from .errors import UserError
from .fileutil import OutputSet


def inspect_net(prototxt, weights=None, phase="TEST", stages=(), level=0) -> dict:
    """Per-layer table (name, type, bottoms, tops, output shapes, params, MACs) and totals."""
    net = load_net(prototxt, weights, phase=phase, stages=stages, level=level)
    shapes = validate(net)
    rows = layer_stats(net, shapes)
    return {
        "net": net.name,
        "inputs": {k: list(v) if v else None for k, v in net.input_shapes().items()},
        "outputs": net.outputs(),
        "layers": [
            {"name": r.name, "type": r.type, "bottoms": r.bottoms, "tops": r.tops,
             "output_shapes": r.output_shapes, "params": r.params, "macs": r.macs}
            for r in rows
        ],
        "totals": totals(rows),
        "notes": list(net.notes),
    }


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


def convert(prototxt, weights=None, outdir="out", phase="TEST", all_phases=False, stages=(), level=0) -> dict:
    """Upgrade a net (V1, input headers) to the current format without Caffe.

    Default: the ``phase`` view (TEST = deploy), validated. ``all_phases``: every layer
    kept with its phase rules, as Caffe's upgrade_net_proto_text does for a train_val
    net (not validated: it holds Data layers); weights merge by layer name."""
    if not all_phases:
        net = load_net(prototxt, weights, phase=phase, stages=stages, level=level)
        written = write_net(net, outdir, with_weights=weights is not None)
        return {"written": written, "notes": list(net.notes)}
    from .io.caffe import merge_weights, read_caffemodel
    from .core.compress import read_train_net
    net = read_train_net(prototxt)
    if weights is not None:
        merge_weights(net, read_caffemodel(weights), path=weights, strict=False)
    written = write_net(net, outdir, with_weights=weights is not None, check=False)
    return {"written": written, "notes": list(net.notes)}


__all__ = ["inspect_net", "convert", "write_net", "load_net", "Path"]
