"""What :func:`~lrprune_caffe.core.pipeline.run_pipeline` hands between processes and keeps in its checkpoint.

* **Nets as plain values** (:func:`pack_net` / :func:`unpack_net`): the protobuf messages as
  bytes, the blobs as arrays; rank 0 sends each round's net this way, and the checkpoint
  holds it this way.
* **The checkpoint** (one file, :class:`lrprune_caffe.train.loop.RunCheckpoint`), written by
  rank 0: after each round's compression step, after every fine-tuning epoch (finetune's own
  state: parameters, solver history, iteration, epoch, torch RNG, its epoch log) and at the end
  of each round. Its ``run`` part (:func:`run_state`): the round and its phase (``"training"``:
  the step is done, ``net`` is the net after the step; ``"done"``: ``net`` is the round's
  fine-tuned net), the masks, the rounds recorded so far, the original net's accuracy, the
  factorization summary, the rewritten train_val. The resumed run takes the same steps as an
  unkilled one from there: every step and every fine-tuning is a function of its inputs and seeds.
* **The fingerprint** (:func:`fingerprint`): the run a checkpoint belongs to: the net's layers
  and weights (a digest), the data (sources, sizes), every option that changes what is computed,
  the number of processes. A checkpoint of another run is refused (one line naming what differs).
"""

from __future__ import annotations

import hashlib

import numpy as np


def pack_net(net) -> tuple:
    """``net`` as plain values (its protobuf messages as bytes), to hand to other processes or save."""
    return (net.name, net.header.SerializeToString(), net.source, net.weights_source, list(net.notes),
            [(la.name, la.type, la.bottoms, la.tops, la.msg.SerializeToString(), la.blobs) for la in net.layers])


def unpack_net(packed):
    from lrprune_caffe.ir.net import Layer, Net
    from lrprune_caffe.schema.proto import pb
    name, header, source, weights_source, notes, layers = packed
    out = []
    for lname, ltype, bottoms, tops, msg, blobs in layers:
        lp = pb.LayerParameter()
        lp.ParseFromString(msg)
        out.append(Layer(lname, ltype, list(bottoms), list(tops), lp, list(blobs)))
    hp = pb.NetParameter()
    hp.ParseFromString(header)
    return Net(name, out, hp, source, weights_source, list(notes))


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype.str, p.shape)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


def net_digests(net) -> tuple:
    """(layers digest, weights digest) of ``net``."""
    layers = _digest((la.name, la.type, la.bottoms, la.tops, la.msg.SerializeToString()) for la in net.layers)
    weights = _digest(b for la in net.layers for b in la.blobs)
    return layers, weights


def fingerprint(net, train, val, opts, solver, processes: int) -> dict:
    """The settings a pipeline checkpoint must share with the run that resumes it."""
    from lrprune_caffe.train.loop import run_key
    layers, weights = net_digests(net)
    calib = None
    if opts.calib is not None:
        calib = _digest(np.asarray(opts.calib[k]) for k in sorted(opts.calib))
    return run_key(net=net.name, layers=layers, weights=weights, schedule=opts.schedule,
                   prune_steps=[float(s) for s in opts.prune_steps], prune_scope=opts.prune_scope,
                   speedup=float(opts.speedup) if opts.schedule != "han" else None,
                   scheme=opts.scheme if opts.schedule != "han" else None, criterion=opts.criterion,
                   tolerance=float(opts.tolerance), max_epochs=int(opts.max_epochs),
                   batch_size=int(opts.batch_size), seed=int(opts.seed),
                   **{f"solver {k}": v for k, v in solver.as_dict().items() if k not in ("notes", "source")},
                   engine=opts.engine, calib=calib, distill=bool(opts.distill),
                   temperature=float(opts.temperature) if opts.distill else None,
                   distill_weight=float(opts.distill_weight) if opts.distill else None,
                   train=getattr(train, "source", None), n_train=len(train),
                   val=getattr(val, "source", None), n_val=len(val), processes=int(processes),
                   train_val=None if opts.train_net is None else net_digests(opts.train_net)[0])


def run_state(round_, phase, net, masks, what, before, rounds, base_acc, factorize, train_net) -> dict:
    """The pipeline's part of a checkpoint (see the module doc)."""
    return {"round": int(round_), "phase": phase, "net": pack_net(net), "masks": dict(masks), "what": what,
            "top1_after_step": before, "rounds": [dict(r) for r in rounds], "base_acc": base_acc,
            "factorize": factorize, "train_net": None if train_net is None else pack_net(train_net)}


def finished_training(net, masks, ft_state):
    """``(trained net, history)`` of a fine-tuning whose checkpoint is its last epoch (killed after
    writing it, before the round ended): the checkpoint's parameters written back into a masked
    copy of ``net``, as finetune writes its model back."""
    from lrprune_caffe.ir.masks import apply_masks
    from lrprune_caffe.train import require_torch
    from lrprune_caffe.train.torch_model import build_torch_model
    torch = require_torch()
    out = net.copy()
    apply_masks(out, masks)
    model = build_torch_model(out)
    with torch.no_grad():
        for p, v in zip(model.params, ft_state["params"]):
            p.copy_(v)
    model.write_back(out)
    hist = dict(ft_state["log"])
    hist["iterations"] = int(ft_state["iteration"])
    return out, hist


__all__ = ["pack_net", "unpack_net", "net_digests", "fingerprint", "run_state", "finished_training"]
