"""Fine-tune a net with PyTorch: ``finetune(net, train_data, ...) -> (net, history)``.

Before training, the torch model's forward is checked against an independent
engine (OpenCV's Caffe reader, else onnxruntime via our exporter) on a few
training samples; a mismatch is an internal error and nothing is trained.

Loss: softmax cross-entropy on the class scores. When the score blob is a
Softmax output, the loss is taken on the Softmax's bottom (the logits) with
log_softmax, as Caffe's SoftmaxWithLoss does; otherwise on the blob itself.
The mean over the batch (Caffe's VALID normalization without ignore_label).

Distillation (``teacher=``, Hinton, Vinyals & Dean 2015, "Distilling the
Knowledge in a Neural Network", sec. 2): the teacher (the original net) runs
in eval mode beside the student, and the loss becomes

    w * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - w) * CE(s, y)

with ``t``, ``s`` the teacher's and the student's logits, ``T`` the
``temperature`` and ``w`` the ``distill_weight`` (T^2 keeps the soft term's
gradients on the scale of the hard one's as T changes, sec. 2.1). Labels are
then optional: a label of -1 (:data:`UNLABELED`) marks a sample without one;
the hard term averages over the labelled samples of the batch and a batch
without any is trained on the soft term alone.

Masks (``{"<layer>/<blob idx>": bool array, True = keep}``,
:mod:`lrprune_caffe.ir.masks`, as written by pruning in masks.npz) hold pruned weights at exactly zero: they are zeroed
first, their gradients are zeroed after each backward, and the mask is
applied again after each update (momentum and weight decay would otherwise
bring them back).

Solver: :class:`~lrprune_caffe.train.solver.SolverSettings` (Caffe's update
rule, lr policy, per-blob ``lr_mult`` / ``decay_mult`` from the layers'
ParamSpecs). ``max_iter`` in the settings overrides ``epochs`` (iterations =
batches; data is reshuffled each pass). BatchNorm statistics stay frozen.

Runs are reproducible for a given seed, torch version and thread count.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

from . import require_torch
from lrprune_caffe.ir.analysis import validate
from lrprune_caffe.data.datasets import as_dataset, check_against_net
from lrprune_caffe.errors import BadFileError, UserError
from lrprune_caffe.ir.masks import apply_masks, check_masks, split_key
from .solver import CaffeOptimizer, SolverSettings, finetune_solver

UNLABELED = -1  # the label of a sample without one (training with a teacher only)
DEFAULT_TEMPERATURE = 4.0
DEFAULT_DISTILL_WEIGHT = 0.9
#: samples per iteration: issue 10, chosen with the rate (train/solver.py FINETUNE_DEFAULTS): 3 epochs of a
#: few thousand samples are 189 iterations at 64, 1,500 at 8; 64 and 16 recovered less (examples/lenet/FINETUNE.md)
DEFAULT_BATCH_SIZE = 8
#: the cross-entropy's label smoothing (finetune's, not the pipeline's: it passes 0). Issue 10, on the
#: validation digits of examples/lenet/FINETUNE.md (lr 0.02, batch 8, clip 10): 93.2% without, 95.4% with 0.1
DEFAULT_LABEL_SMOOTHING = 0.1


# ---- pre-flight: torch vs an independent engine --------------------------------

def preflight(net, model, x, blob, tol=1e-4):
    """Compare the torch forward of ``blob`` with OpenCV's (else onnxruntime's) on ``x``."""
    torch = require_torch()
    model.eval()
    with torch.no_grad():
        ours = model(torch.from_numpy(x), outputs=[blob])[blob].numpy()
    ref, engine, why = None, None, []
    for eng in ("opencv", "onnxruntime"):
        try:
            from lrprune_caffe.engines.runtime import run_net
            ref = run_net(net, {net.inputs()[0]: x}, outputs=[blob], engine=eng)[blob]
            engine = eng
            break
        except Exception as e:  # engine missing or unable to run this net: try the next one
            why.append(f"{eng}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if ref is None:
        return {"engine": None, "skipped": "; ".join(why)}
    ref = np.asarray(ref).reshape(ours.shape)
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(ours - ref).max()) / scale
    if not err <= tol:
        raise RuntimeError(f"internal error: the PyTorch model of {net.source or net.name} differs from "
                           f"{engine} on blob '{blob}' by {err:.2e} (relative to max |{engine}|); "
                           f"not training")
    return {"engine": engine, "blob": blob, "samples": int(x.shape[0]), "max_rel_err": err}


# ---- training ------------------------------------------------------------------

def _progress(total, desc, progress):
    from tqdm import tqdm
    disable = (not progress) if progress is not None else not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="img", disable=disable, leave=False, file=sys.stderr)


def _accuracy(model, logits_blob, ds, axis, batch_size=256, dist=None, device="cpu"):
    """Top-1 / top-5 of the torch model in eval mode (for the training log), streamed; with
    several processes each takes every world-th batch and the counts are summed."""
    torch = require_torch()
    from lrprune_caffe.engines.evaluate import class_scores, topk_correct
    model.eval()
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    c1 = c5 = n = 0
    with torch.no_grad():
        for b, (xb, yb) in enumerate(ds.batches(batch_size)):
            if b % world != rank:
                continue
            out = model(torch.from_numpy(xb).to(device), outputs=[logits_blob])[logits_blob]
            sc = class_scores(out.cpu().numpy(), axis)
            c1 += int(topk_correct(sc, yb, 1).sum())
            c5 += int(topk_correct(sc, yb, 5).sum())
            n += len(yb)
    if world > 1:
        c1, c5, n = dist.all_sum([c1, c5, n])
    return c1 / n, c5 / n


def _as_training_stream(data, what, sb, unlabeled_ok=False):
    """A StreamDataset checked against the net (in-memory data is checked whole first);
    ``unlabeled_ok``: labels may be -1 (a teacher gives the targets)."""
    from lrprune_caffe.data.datasets import Dataset
    from lrprune_caffe.data.sources import ArraySource
    from lrprune_caffe.data.stream import StreamDataset, as_stream
    from lrprune_caffe.engines.evaluate import _check_stream
    if isinstance(data, StreamDataset) and isinstance(data.records, ArraySource):
        check_against_net(Dataset(data.records.x, data.records.y, data.source), sb.input_shape,
                          None if unlabeled_ok else sb.classes, sb.input)
        return data
    if isinstance(data, StreamDataset):
        _check_stream(data, sb.input_shape, sb.input)
        return data
    ds = as_dataset(data, what)
    check_against_net(ds, sb.input_shape, None if unlabeled_ok else sb.classes, sb.input)
    return as_stream(ds)


def _check_batch_labels(yb, classes, teacher, source):
    if not len(yb):
        return
    lo, hi = int(yb.min()), int(yb.max())
    if hi >= classes or lo < (UNLABELED if teacher else 0):
        raise BadFileError(f"a label out of range ({lo}..{hi}): the net has {classes} classes"
                           + (" (-1: no label)" if teacher else ""), path=source)


def _teacher_model(teacher, output, sb, device):
    """(torch model, score blob) of the teacher net, eval mode, no gradients."""
    from lrprune_caffe.engines.evaluate import resolve_scores
    from .torch_model import build_torch_model
    validate(teacher)
    tsb = resolve_scores(teacher, output)
    if tsb.classes != sb.classes or tuple(tsb.input_shape or ())[1:] != tuple(sb.input_shape or ())[1:]:
        raise UserError(f"the teacher {teacher.source or teacher.name} has {tsb.classes} classes and input "
                        f"{tsb.input_shape}; the net has {sb.classes} and {sb.input_shape}")
    model = build_torch_model(teacher)
    model.eval()
    for p in model.params:
        p.requires_grad_(False)
    return model.to(device), tsb


def distill_loss(logits, yb, teacher_logits, temperature, weight, label_smoothing=0.0):
    """Hinton et al. 2015: ``weight * T^2 * KL(p_t^T || p_s^T) + (1 - weight) * CE`` over the
    labelled samples (labels -1 have none); the soft term alone when no sample has a label.
    ``label_smoothing`` applies to the CE term (see :func:`finetune`)."""
    torch = require_torch()
    F = torch.nn.functional
    T = float(temperature)
    soft = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(teacher_logits / T, 1), log_target=True,
                    reduction="batchmean") * (T * T)
    has = yb >= 0
    if weight >= 1.0 or not bool(has.any()):
        return soft
    hard = F.cross_entropy(logits[has], yb[has], label_smoothing=float(label_smoothing))
    return weight * soft + (1.0 - weight) * hard


def finetune(net, train_data, val_data=None, masks=None, solver: SolverSettings = None, epochs: int = 1,
             batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, output: str = None, threads: int = None,
             progress=None, log=None, check: bool = True, stop=None, workers: int = 0, device: str = "cpu",
             checkpoint=None, resume: bool = False, val_batch_size: int = 256, teacher=None,
             temperature: float = DEFAULT_TEMPERATURE, distill_weight: float = DEFAULT_DISTILL_WEIGHT,
             use_labels: bool = True, label_smoothing: float = DEFAULT_LABEL_SMOOTHING):
    """Train ``net`` (a copy; the argument is untouched) and return ``(trained_net, history)``.

    * ``train_data`` / ``val_data``: a :class:`~lrprune_caffe.data.stream.StreamDataset`
      (streamed), a Dataset, (x, y) or {'x', 'y'}; x N x C x H x W float32.
    * ``masks``: {"<layer>/<blob idx>": bool (keep=True)} or None.
    * ``solver``: SolverSettings (default :func:`~lrprune_caffe.train.solver.finetune_solver`: SGD, lr 0.02
      decayed linearly to 0 over the run (Caffe's poly, power 1), momentum 0.9, weight decay 5e-4, gradients
      clipped to a global L2 norm of 10);
      its ``max_iter`` overrides ``epochs``; its ``random_seed`` is used when ``seed`` is None.
    * ``output``: the class-score blob (default: the net's single output).
    * ``log``: callable(str) for one line per epoch (default: none).
    * ``check``: compare the torch forward with OpenCV/onnxruntime first (see :func:`preflight`).
    * ``stop``: callable(epoch record) -> bool, asked after each epoch; True ends training
      early (the pipeline stops a round once validation accuracy is back within tolerance).
    * ``workers``: DataLoader worker processes decoding batches (0: this process).
    * ``device``: cpu or cuda. Under torchrun (WORLD_SIZE > 1) the processes train one model with
      DistributedDataParallel, ``batch_size`` per process (see :mod:`lrprune_caffe.train.loop`).
    * ``checkpoint``: a file written after every epoch (by rank 0); ``resume``: continue from it.
    * ``teacher``: a net (the original, uncompressed one) to distill from, with ``temperature`` T
      and ``distill_weight`` w (see the module doc); labels may then be -1 (none), and
      ``use_labels=False`` ignores them all (the teacher alone).
    * ``label_smoothing`` e (Szegedy et al. 2016, sec. 7): the cross-entropy's target is (1 - e) on the
      label plus e / K on each of the K classes (torch's ``cross_entropy(label_smoothing=e)``).

    history: {"epochs": [{"epoch", "iterations", "lr", "loss", "train_top1", "val_top1"?, ...}],
    "initial": {...}, "iterations", "solver", "batch_size", "seed", "torch", "threads", ...}.
    """
    torch = require_torch()
    from lrprune_caffe.engines.evaluate import resolve_scores
    from . import loop
    from .torch_model import build_torch_model

    solver = solver or finetune_solver()
    if seed is None:
        seed = solver.random_seed if solver.random_seed is not None else 0
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    if solver.max_iter is None and epochs < 1:
        raise UserError(f"epochs must be >= 1, got {epochs}")
    if resume and not checkpoint:
        raise UserError("resume needs a checkpoint file")
    sb = resolve_scores(net, output)
    if teacher is not None:
        if not (float(temperature) > 0 and math.isfinite(float(temperature))):
            raise UserError(f"the temperature must be a positive number, got {temperature}")
        if not 0.0 <= float(distill_weight) <= 1.0:
            raise UserError(f"the distillation weight must be in [0, 1], got {distill_weight}")
    elif not use_labels:
        raise UserError("training without labels needs a teacher (--teacher NET WEIGHTS)")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise UserError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    train = _as_training_stream(train_data, "training data", sb, unlabeled_ok=teacher is not None)
    val = _as_training_stream(val_data, "validation data", sb) if val_data is not None else None
    masks = check_masks(net, masks or {}, "masks")

    net = net.copy()
    apply_masks(net, masks)
    validate(net)

    dist = loop.dist_context(device)
    if not dist.main:
        log, progress = None, False
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(seed)
        model = build_torch_model(net)
        history = {"net": net.name, "score_blob": sb.blob, "loss_blob": sb.logits,
                   "loss": f"softmax cross-entropy on '{sb.logits}'" if teacher is None else
                           f"{float(distill_weight):g} x T^2 KL(teacher || net) at T {float(temperature):g} + "
                           f"{1 - float(distill_weight):g} x cross-entropy on '{sb.logits}'",
                   "classes": sb.classes, "label_smoothing": float(label_smoothing),
                   "train": train.source, "n_train": len(train),
                   "val": val.source if val is not None else None, "n_val": len(val) if val is not None else 0,
                   "batch_size": int(batch_size), "seed": int(seed), "solver": solver.as_dict(),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "workers": int(workers), "device": dist.device, "processes": dist.world,
                   "masks": {"blobs": len(masks), "masked": int(sum(int((~m).sum()) for m in masks.values()))},
                   "epochs": []}
        if check and dist.main:
            x8 = next(train.batches(8))[0]
            history["preflight"] = preflight(net, model, x8, sb.logits)
            if log and history["preflight"].get("engine") is None:
                log(f"pre-flight check skipped: {history['preflight']['skipped']}")
        tmodel = None
        if teacher is not None:
            tmodel, tsb = _teacher_model(teacher, output, sb, "cpu")
            history["teacher"] = {"net": teacher.name, "source": teacher.source, "score_blob": tsb.logits,
                                  "temperature": float(temperature), "distill_weight": float(distill_weight),
                                  "labels": bool(use_labels)}
            if check and dist.main:
                history["teacher"]["preflight"] = preflight(teacher, tmodel, x8, tsb.logits)
            tmodel.to(dist.device)
        model.to(dist.device)
        trainer = loop.wrap_ddp(model, dist)

        # parameters, their ParamSpecs, and masks on the Parameters
        params = [(p, *model.specs[i]) for i, p in enumerate(model.params)]
        pmask = {}
        for key, m in masks.items():
            pi = model.blob_param.get(key)
            if pi is not None:
                pmask[pi] = torch.from_numpy(m).to(dist.device)
        sampler = loop.EpochBatches(len(train), batch_size, seed, dist.rank, dist.world)
        per_epoch = len(sampler)
        total = solver.max_iter or per_epoch * int(epochs)
        opt = CaffeOptimizer(params, solver, total_iters=total)
        extra_key = {} if teacher is None else {"teacher": teacher.name, "temperature": float(temperature),
                                                "distill_weight": float(distill_weight)}
        key = loop.run_key(n_train=len(train), batch_size=int(batch_size), seed=int(seed), processes=dist.world,
                           total_iterations=int(total), net=net.name, **extra_key)

        it, epoch = 0, 0
        if resume and os.path.exists(str(checkpoint)):
            state = loop.load_checkpoint(checkpoint, key)
            loop.restore(state, model, opt)
            it, epoch = state["iteration"], state["epoch"]
            history["epochs"] = list(state["log"].get("epochs", []))
            if "initial" in state["log"]:
                history["initial"] = state["log"]["initial"]
            history["resumed"] = {"from": str(checkpoint), "epoch": epoch, "iteration": it}
            if log:
                log(f"resumed from {checkpoint}: epoch {epoch}, iteration {it}")
        elif val is not None:
            v1, v5 = _accuracy(model, sb.logits, val, sb.axis, val_batch_size, dist, dist.device)
            history["initial"] = {"val_top1": v1, **({"val_top5": v5} if sb.classes > 5 else {})}
            if log:
                log(f"epoch 0: val top-1 {v1:.4f}")
        loader = loop.train_loader(train, sampler, workers)
        t0 = time.perf_counter()
        F = torch.nn.functional
        while it < total:
            epoch += 1
            sampler.set_epoch(epoch)
            train.set_epoch(epoch)
            n_it = min(per_epoch, total - it)
            bar = _progress(n_it * batch_size * dist.world, f"epoch {epoch}", progress)
            model.train()
            loss_sum, correct, seen, labelled, agree = 0.0, 0, 0, 0, 0
            lr = solver.lr_at(it, total)
            for b, (xb, yb) in enumerate(loader):
                if b >= n_it:
                    break
                if not use_labels:
                    yb = torch.full_like(yb, UNLABELED)
                _check_batch_labels(yb, sb.classes, teacher is not None, train.source)
                xb, yb = xb.to(dist.device), yb.to(dist.device)
                out = trainer(xb, outputs=[sb.logits])[sb.logits]
                logits = torch.movedim(out, sb.axis, 1).reshape(out.shape[0], -1)
                if tmodel is None:
                    loss = F.cross_entropy(logits, yb, label_smoothing=float(label_smoothing))
                else:
                    with torch.no_grad():
                        tout = tmodel(xb, outputs=[tsb.logits])[tsb.logits]
                        tlogits = torch.movedim(tout, tsb.axis, 1).reshape(tout.shape[0], -1)
                    loss = distill_loss(logits, yb, tlogits, temperature, float(distill_weight),
                                        label_smoothing)
                    agree += int((logits.detach().argmax(1) == tlogits.argmax(1)).sum())
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise UserError(f"training diverged at iteration {it} (loss {lv}); "
                                    f"lower the learning rate (now {lr:g})")
                opt.zero_grad()
                loss.backward()
                with torch.no_grad():
                    for pi, m in pmask.items():
                        g = model.params[pi].grad
                        if g is not None:
                            g.masked_fill_(~m, 0.0)
                lr = opt.step(it)
                with torch.no_grad():
                    for pi, m in pmask.items():
                        model.params[pi].masked_fill_(~m, 0.0)
                it += 1
                loss_sum += lv * len(yb)
                correct += int((logits.detach().argmax(1) == yb).sum())
                labelled += int((yb >= 0).sum())
                seen += len(yb)
                bar.update(len(yb) * dist.world)
                bar.set_postfix(loss=f"{lv:.4f}", lr=f"{lr:.3g}")
            bar.close()
            loss_sum, correct, seen, labelled, agree = dist.all_sum([loss_sum, correct, seen, labelled, agree])
            rec = {"epoch": epoch, "iterations": it, "lr": lr, "loss": loss_sum / seen,
                   "train_top1": correct / labelled if labelled else None,
                   "time_s": round(time.perf_counter() - t0, 3)}
            if tmodel is not None:
                rec["train_teacher_agree"] = agree / seen
            if val is not None:
                v1, v5 = _accuracy(model, sb.logits, val, sb.axis, val_batch_size, dist, dist.device)
                rec["val_top1"] = v1
                if sb.classes > 5:
                    rec["val_top5"] = v5
            history["epochs"].append(rec)
            if checkpoint and dist.main:
                loop.save_checkpoint(checkpoint, model, opt, it, epoch, history, key)
            if log:
                log(f"epoch {epoch}: {it} iterations, lr {lr:.3g}, loss {rec['loss']:.4f}, "
                    + (f"train top-1 {rec['train_top1']:.4f}" if rec["train_top1"] is not None else
                       f"agreement with the teacher {rec['train_teacher_agree']:.4f}")
                    + (f", val top-1 {rec['val_top1']:.4f}" if "val_top1" in rec else ""))
            if stop is not None and stop(rec):
                history["stopped_early"] = True
                break
        history["iterations"] = it
        history["time_s"] = round(time.perf_counter() - t0, 3)
        model.to("cpu")
        model.write_back(net)
    finally:
        torch.set_num_threads(old_threads)
    for key_, m in masks.items():  # the promise: masked entries are exactly zero
        lname, idx = split_key(key_)
        assert not np.any(net.layer(lname).blobs[idx][~m]), key_
    validate(net)
    if history["epochs"]:
        history["final"] = {k: v for k, v in history["epochs"][-1].items()
                            if k in ("loss", "train_top1", "val_top1", "val_top5")}
    return net, history


__all__ = ["finetune", "preflight", "distill_loss", "UNLABELED", "DEFAULT_TEMPERATURE", "DEFAULT_DISTILL_WEIGHT",
           "DEFAULT_BATCH_SIZE"]
