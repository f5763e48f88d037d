"""API: ``pipeline``: compress and fine-tune in rounds, and count what it took.

Two schedules (``schedule=``):

``han``
    Iterative magnitude pruning after Han, Pool, Tran & Dally 2015 ("Learning
    both Weights and Connections for Efficient Neural Networks", NIPS, sec. 3.3:
    "iterative pruning ... prune, retrain, repeat"). For each sparsity step
    s_1 < s_2 < ... < s_k (``prune_steps``; s_k is the target) one round:
    zero the ``round(s_i x size)`` smallest-magnitude weights of every conv/FC
    layer (per layer; a weight pruned in an earlier round is zero, hence among
    the smallest, so masks only grow), then fine-tune with the masks held.

``lowrank-prune``
    The method of the 2018 paper the project follows (low-rank approximation
    concentrates a layer's information in few weights; pruning then removes
    the rest): round 1 factorizes every conv/FC layer for a whole-net MAC
    reduction (``speedup``, ``scheme``; see :func:`lrprune_caffe.core.compress.compress`)
    and fine-tunes; then the same pruning rounds as ``han``, on the factorized
    net's layers.

Options beyond the paper's protocol: ``calib`` (calibration inputs, no
labels) makes every step data-aware: the factorization is fit to the original
net's outputs (:func:`lrprune_caffe.transforms.calibrate.calibrate_factorized`)
and each pruning step re-solves the kept weights to match the original net's
outputs (inner factors: their dense version's,
:func:`~lrprune_caffe.transforms.calibrate.calibrate_pruned`);
``distill`` fine-tunes from the original net's soft targets (Hinton et al.
2015, :mod:`lrprune_caffe.train.finetune`) mixed with the labels.

Fine-tuning in a round stops as soon as validation top-1 is back within
``tolerance`` of the original net's (measured on the same validation data
with onnxruntime before anything changes), or after ``max_epochs``. A round
whose compression step leaves accuracy within tolerance needs no epoch at
all; a *fine-tuning round* is a round that needed at least one epoch. The
report records, per round: the step, sparsity, params, nonzero params, MACs,
accuracy right after the step and after fine-tuning, epochs, iterations and
whether the tolerance was reached.

Accuracy in the report is measured on the written net by onnxruntime (or
OpenCV), not by the torch model that was trained.

Several processes (``torchrun``, WORLD_SIZE > 1; :mod:`lrprune_caffe.train.loop`): rank 0
alone computes each round's compression step (factorization, pruning masks, calibration)
and hands the net and masks to the others; every process fine-tunes its part of each
batch (DistributedDataParallel, ``batch_size`` per process), evaluates its contiguous
part of the validation data, and the counts are summed, so every process takes the same
decisions (stop a round, the next step) from the same numbers. Only rank 0 logs and
writes files. ``train_net`` (a train_val, every phase) is rewritten as the factorization
rewrites the deploy net (:func:`lrprune_caffe.transforms.factorize.rewrite_train_net`).

Checkpoints (``checkpoint``, ``resume``; :mod:`lrprune_caffe.core.pipeline_state`): rank 0
writes one file after each round's step, after every fine-tuning epoch and at the end of each
round; a resumed run continues where the killed one stopped and ends as an unkilled run would
(the same rounds, masks and weights). A checkpoint of another run (net, weights, data,
options, processes) is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from lrprune_caffe.version import __version__
from lrprune_caffe.ir.analysis import layer_stats, sparsity_rows, sparsity_totals, totals, validate
from lrprune_caffe.ir.masks import apply_masks, grow_masks, masks_npz
from lrprune_caffe.io.caffe import load_net
from lrprune_caffe.io.output import write_net
from lrprune_caffe.engines.compare import json_safe
from lrprune_caffe.errors import UserError
from lrprune_caffe.fileutil import check_outdir
from lrprune_caffe.transforms.prune import PruneSpec, prune_net

from .compress import CompressData, CompressOptions, compress
from .pipeline_state import finished_training, fingerprint, pack_net, run_state, unpack_net

SCHEDULES = ("han", "lowrank-prune")
DEFAULT_PRUNE_STEPS = (0.5, 0.7, 0.8, 0.9)


def parse_steps(text, target=None) -> tuple:
    """Sparsity steps from '0.5,0.7,0.9' (increasing, each in [0, 1)); with ``target`` and no
    text, the default steps below the target followed by the target itself."""
    if text is None or text == "":
        if target is None:
            return DEFAULT_PRUNE_STEPS
        t = float(target)
        if not 0 < t < 1:
            raise UserError(f"--sparsity {target} must be in (0, 1)")
        return tuple(s for s in DEFAULT_PRUNE_STEPS if s < t) + (t,)
    if isinstance(text, (list, tuple)):
        items = [float(v) for v in text]
    else:
        try:
            items = [float(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--prune-steps: '{text}' is not a comma-separated list of fractions") from None
    if not items:
        raise UserError("--prune-steps: no step given")
    for v in items:
        if not 0 <= v < 1:
            raise UserError(f"--prune-steps: {v} is outside [0, 1)")
    if any(b <= a for a, b in zip(items, items[1:])):
        raise UserError(f"--prune-steps: {text} must increase")
    if target is not None and abs(items[-1] - float(target)) > 1e-12:
        raise UserError(f"--prune-steps ends at {items[-1]}, but --sparsity is {target}")
    return tuple(items)


@dataclass
class PipelineOptions:
    schedule: str = "lowrank-prune"
    prune_steps: tuple = DEFAULT_PRUNE_STEPS
    speedup: float = 2.0
    scheme: str = "channel"
    criterion: str = "log-energy"
    prune_scope: str = "layer"  # "global": one magnitude threshold over all conv/FC layers
    tolerance: float = 0.005
    max_epochs: int = 5
    batch_size: int = 64
    seed: int = 0
    threads: int = None
    engine: str = "onnxruntime"
    progress: object = None
    solver: object = None  # train.SolverSettings
    calib: dict = None  # unlabeled calibration inputs {input: array}: every round's compression step is fit to
    #                     the original net's outputs before fine-tuning (lrprune_caffe.core.calib)
    distill: bool = False  # fine-tune with the original net as the teacher
    temperature: float = 4.0
    distill_weight: float = 0.9
    workers: int = 0  # DataLoader worker processes decoding the training data
    device: str = "cpu"  # cpu or cuda (under torchrun: gloo or NCCL)
    train_net: object = None  # a train_val Net (every phase) rewritten as the deploy net is factorized
    checkpoint: str = None  # a file written after each step, every fine-tuning epoch and each round (rank 0)
    resume: bool = False  # continue from ``checkpoint`` (a killed run of the same settings)


def net_numbers(net) -> dict:
    """params, nonzero_params, sparsity (over every blob) and MACs of ``net``."""
    return {**sparsity_totals(sparsity_rows(net)), "macs": int(totals(layer_stats(net))["macs"])}


def run_pipeline(net, train, val, opts: PipelineOptions, log=None):
    """Run ``opts.schedule`` on ``net`` (an IR net with weights; not modified).

    ``train`` / ``val``: Datasets (see :mod:`lrprune_caffe.data.datasets`). Returns ``(final_net,
    masks, report)``; masks = {"layer/blob": keep bool array} held at the end.
    """
    from lrprune_caffe.engines.evaluate import evaluate
    from lrprune_caffe.train import loop, require_torch
    from lrprune_caffe.train.finetune import finetune
    from lrprune_caffe.train.solver import SolverSettings

    require_torch()
    if opts.schedule not in SCHEDULES:
        raise UserError(f"--schedule: unknown schedule '{opts.schedule}' (choose from {', '.join(SCHEDULES)})")
    if not 0 <= float(opts.tolerance) < 1:
        raise UserError(f"--tolerance {opts.tolerance} must be in [0, 1) (a top-1 fraction, e.g. 0.005)")
    if int(opts.max_epochs) < 1:
        raise UserError(f"--max-epochs {opts.max_epochs} must be >= 1")
    if val is None:
        raise UserError("the pipeline needs validation data (--val, or --data-split) to know when a round "
                        "has won accuracy back")
    solver = opts.solver or SolverSettings(base_lr=0.005)
    dist = loop.dist_context(opts.device)
    say = (log if dist.main else None) or (lambda m: None)
    progress = opts.progress if dist.main else False
    if dist.world > 1:
        from lrprune_caffe.data.stream import as_stream
        val_part = as_stream(val, "validation data").shard(dist.rank, dist.world)

    def acc(n):
        if dist.world == 1:
            return evaluate(n, val, engine=opts.engine, threads=opts.threads, progress=False)["top1"]
        c1 = count = 0
        if len(val_part):  # this process's part; the counts summed: every process gets the same number
            r = evaluate(n, val_part, engine=opts.engine, threads=opts.threads, progress=False)
            c1, count = r["correct_top1"], r["n"]
        c1, count = dist.all_sum([c1, count])
        return c1 / count

    t_start = time.perf_counter()
    ck, state = _open_checkpoint(net, train, val, opts, solver, dist)
    steps = [("factorize", None)] if opts.schedule == "lowrank-prune" else []
    steps += [("prune", s) for s in opts.prune_steps]
    rounds, masks, cur, factorize_summary, start = [], {}, net.copy(), None, 1
    if state is not None:
        base_acc, rounds, masks, factorize_summary = (state["base_acc"], state["rounds"], state["masks"],
                                                      state["factorize"])
        cur = unpack_net(state["net"])
        if opts.train_net is not None and state["train_net"] is not None:
            opts.train_net.layers[:] = unpack_net(state["train_net"]).layers
        start = state["round"] + (state["phase"] == "done")
        ft = (ck.loaded or {}).get("finetune")
        say(f"resumed from {ck}: round {state['round']} " + ("done" if state["phase"] == "done" else
            f"after its step, {ft['epoch'] if ft else 0} epoch(s) trained"))
    else:
        base_acc = acc(net)
    goal = base_acc - float(opts.tolerance)
    say(f"original: val top-1 {base_acc:.4f}; each round fine-tunes until >= {goal:.4f} "
        f"(at most {opts.max_epochs} epochs)")

    def keep(i, phase, what, before):  # rank 0 writes the checkpoint
        if ck is not None and dist.main:
            ck.run = run_state(i, phase, cur, masks, what, before, rounds, base_acc, factorize_summary,
                               opts.train_net)
            ck.save()

    for i, (kind, s) in enumerate(steps, 1):
        if i < start:
            continue
        ft_state = None
        if state is not None and i == state["round"]:  # resumed after this round's step
            what, before = state["what"], state["top1_after_step"]
            ck.run, ft_state = state, ck.loaded.get("finetune")
        else:
            cur, masks, what, factorize_summary = _step(net, cur, masks, kind, s, opts, dist, factorize_summary)
            validate(cur)
            before = acc(cur)
            keep(i, "training", what, before)
        rec = {"round": i, "step": what, **net_numbers(cur), "top1_after_step": before, "epochs": 0,
               "iterations": 0}
        say(f"round {i}: {what}: val top-1 {before:.4f}")
        if before < goal:
            def stop(r):
                return r.get("val_top1", 0.0) >= goal
            if ft_state is not None and stop(ft_state["log"]["epochs"][-1]):  # killed as the round ended
                trained, hist = finished_training(cur, masks, ft_state)
            else:
                trained, hist = finetune(cur, train, val, masks=masks, solver=solver, epochs=int(opts.max_epochs),
                                         batch_size=opts.batch_size, seed=opts.seed + i, threads=opts.threads,
                                         progress=progress, log=None, check=(i == 1), workers=int(opts.workers),
                                         device=opts.device, stop=stop, checkpoint=ck, resume=ft_state is not None,
                                         teacher=net if opts.distill else None, temperature=opts.temperature,
                                         distill_weight=opts.distill_weight, label_smoothing=0.0)
            cur = trained
            rec["epochs"] = len(hist["epochs"])
            rec["iterations"] = int(hist["iterations"])
            rec["train_time_s"] = hist.get("time_s")
            rec["val_top1_per_epoch"] = [e.get("val_top1") for e in hist["epochs"]]
        rec["top1"] = acc(cur) if rec["epochs"] else before
        rec["reached"] = rec["top1"] >= goal
        rounds.append(rec)
        keep(i, "done", what, before)
        say(f"round {i}: {rec['epochs']} epoch(s) -> val top-1 {rec['top1']:.4f}"
            + ("" if rec["reached"] else f" (tolerance NOT reached after {opts.max_epochs} epochs)"))

    final = net_numbers(cur)
    report = {
        "tool": f"lrprune-caffe {__version__}",
        "net": net.name,
        "schedule": opts.schedule,
        "options": {"prune_steps": list(opts.prune_steps), "prune_scope": opts.prune_scope,
                    "speedup": opts.speedup if opts.schedule != "han" else None,
                    "scheme": opts.scheme if opts.schedule != "han" else None,
                    "tolerance": opts.tolerance, "max_epochs": opts.max_epochs, "batch_size": opts.batch_size,
                    "seed": opts.seed, "solver": solver.as_dict(), "engine": opts.engine, "threads": opts.threads,
                    "workers": int(opts.workers), "device": dist.device, "processes": dist.world,
                    "calib_samples": None if opts.calib is None else len(next(iter(opts.calib.values()))),
                    "distill": ({"temperature": opts.temperature, "distill_weight": opts.distill_weight}
                                if opts.distill else None)},
        "original": {"top1": base_acc, **net_numbers(net)},
        "goal_top1": goal,
        "rounds": rounds,
        "final": {"top1": rounds[-1]["top1"] if rounds else base_acc, **final,
                  "reached": bool(rounds[-1]["reached"]) if rounds else True},
        "summary": {"rounds": len(rounds),
                    "finetune_rounds": sum(1 for r in rounds if r["epochs"] > 0),
                    "epochs": sum(r["epochs"] for r in rounds),
                    "iterations": sum(r["iterations"] for r in rounds),
                    "all_reached": all(r["reached"] for r in rounds)},
        "time_s": round(time.perf_counter() - t_start, 2),
        "val": getattr(val, "source", None), "train": getattr(train, "source", None),
    }
    if factorize_summary is not None:
        report["factorize"] = factorize_summary
    if state is not None:
        ft = ck.loaded.get("finetune")
        report["resumed"] = {"from": str(ck), "round": state["round"], "phase": state["phase"],
                             "epoch": ft["epoch"] if ft else 0}
    return cur, masks, report


def _open_checkpoint(net, train, val, opts, solver, dist):
    """``(RunCheckpoint or None, the run state to resume from or None)``. Rank 0 reads and checks
    the file and hands it to the others (a refusal is raised on every process)."""
    from lrprune_caffe.errors import BadFileError
    from lrprune_caffe.train import loop
    if not opts.checkpoint:
        if opts.resume:
            raise UserError("--resume needs a checkpoint file (--checkpoint FILE)")
        return None, None
    ck = loop.RunCheckpoint(opts.checkpoint, fingerprint(net, train, val, opts, solver, dist.world)
                            if dist.main else None)
    if not opts.resume:
        return ck, None
    got = None
    if dist.main:
        try:
            got = ("ok", ck.load())
        except (UserError, BadFileError) as e:
            got = (type(e).__name__, str(e))
    got = dist.share(got)
    if got[0] != "ok":  # refused on every process, which leave the group together
        dist.close()
        raise (BadFileError if got[0] == "BadFileError" else UserError)(got[1])
    ck.loaded = got[1]
    return ck, (got[1] or {}).get("run")


def _step(original, cur, masks, kind, s, opts, dist, factorize_summary):
    """Round ``kind``'s compression step, on rank 0 alone; the others take its net and masks.
    Returns ``(net, masks, what, factorize summary)``."""
    if dist.main:
        if kind == "factorize":
            rep, cur = _factorize(cur, opts)
            factorize_summary = {"layers": [{k: r.get(k) for k in ("name", "action", "scheme", "rank", "reason")}
                                            for r in rep["layers"]], "totals": rep["totals"]}
            what = f"factorize ({opts.scheme}, {opts.speedup:g}x MACs)"
        else:
            pruned = cur.copy()
            new_masks, _ = prune_net(pruned, PruneSpec(fraction=float(s), scope=opts.prune_scope))
            masks = grow_masks(masks, new_masks)
            apply_masks(pruned, masks)
            if opts.calib is not None:
                _calibrate_pruned(original, pruned, cur, masks, opts)
            cur = pruned
            what = f"prune to {s:.0%} " + ("per layer" if opts.prune_scope == "layer" else "over the net")
        if opts.calib is not None:
            what += " + calibrate"
    if dist.world > 1:
        packed, masks, what, factorize_summary = dist.share(
            (pack_net(cur), masks, what, factorize_summary) if dist.main else None)
        cur = cur if dist.main else unpack_net(packed)
    return cur, masks, what, factorize_summary


def _factorize(net, opts):
    """The factorization round: ``compress`` on the net itself, MAC budget, no check (fit to
    the calibration data when there is some; ``opts.train_net`` rewritten the same way, in place)."""
    result = compress(net, CompressOptions(scheme=opts.scheme, speedup=float(opts.speedup), verify=False,
                                           criterion=opts.criterion, seed=opts.seed, cost="macs",
                                           measure_rounds=0),
                      CompressData(calib=opts.calib, calib_desc="the pipeline's calibration data",
                                   train_net=opts.train_net))
    return result.report, result.net


def _calibrate_pruned(original, pruned, dense, masks, opts):
    """A pruning round with calibration data: the kept weights re-solved to the original's outputs."""
    from lrprune_caffe.transforms import run_pass
    from lrprune_caffe.transforms.calibrate import calibrate_pruned
    run_pass(calibrate_pruned, pruned, original=original, masks=masks, calib_inputs=opts.calib, dense=dense,
             seed=opts.seed)
    apply_masks(pruned, masks)


def _inside(path, folder) -> bool:
    import os
    p, f = os.path.realpath(str(path)), os.path.realpath(str(folder))
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def pipeline_markdown(report: dict) -> str:
    o = report["original"]
    lines = [f"# Pipeline `{report['schedule']}` on {report.get('net') or 'the net'}", "",
             f"- tool: {report['tool']}; validation: {report.get('val')}; training: {report.get('train')}"
             + (f" in {report['options']['processes']} processes"
                if report["options"].get("processes", 1) > 1 else ""),
             f"- original top-1 {o['top1']:.4f}; goal per round: >= {report['goal_top1']:.4f} "
             f"(tolerance {report['options']['tolerance']}), at most {report['options']['max_epochs']} "
             f"epochs per round", "",
             "| round | step | params | nonzero | sparsity | MACs | top-1 after step | epochs | top-1 | reached |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rounds"]:
        lines.append(f"| {r['round']} | {r['step']} | {r['params']:,} | {r['nonzero_params']:,} | "
                     f"{r['sparsity']:.1%} | {r['macs']:,} | {r['top1_after_step']:.4f} | {r['epochs']} | "
                     f"{r['top1']:.4f} | {'yes' if r['reached'] else 'NO'} |")
    s = report["summary"]
    lines += ["", f"{s['rounds']} rounds, {s['finetune_rounds']} needed fine-tuning, {s['epochs']} epochs "
                  f"({s['iterations']} iterations) in all; {report['time_s']} s."]
    if report.get("plot"):
        lines += ["", f"![top-1 per step with its epochs; size and speed at the end]({report['plot']})"]
    for n in report.get("notes", []):
        lines.append(f"\nnote: {n}")
    return "\n".join(lines) + "\n"


def pipeline_files(prototxt, weights, train, val, outdir=None, *, onnx=False, log=None, net=None, calib=None,
                   calib_n=512, preprocess=None, **kw):
    """Load, run :func:`run_pipeline`, and (with ``outdir``) write model.prototxt,
    model.caffemodel, masks.npz, report.json, report.md (+ model.onnx; rounds.png, embedded in
    report.md, when matplotlib is installed), all or nothing.
    ``net``: the net already loaded (a train_val's deploy view) instead of reading ``prototxt``.
    ``calib``: calibration data as compress takes it (``calib_n`` samples;
    :func:`lrprune_caffe.data.calib.load_calib`), or a dict {input: array}.
    ``train_net``: a train_val Net (every phase, :func:`lrprune_caffe.io.train_net.read_train_net`):
    also written, as OUTDIR/train_val.prototxt, rewritten as the deploy net is.
    ``checkpoint`` / ``resume`` (see :mod:`lrprune_caffe.core.pipeline_state`): a file beside (not in)
    ``outdir`` written after each step, fine-tuning epoch and round; continue a killed run from it.
    Under torchrun only rank 0 reads the calibration data and writes."""
    from lrprune_caffe.train.loop import process_rank
    main = process_rank() == 0
    net = net if net is not None else load_net(prototxt, weights)
    if not main:
        calib = None  # rank 0 alone compresses
    if calib is not None and not isinstance(calib, dict):
        from lrprune_caffe.data.calib import load_calib
        shapes = net.input_shapes()
        cs = load_calib(calib, net.inputs(), shapes.get(net.inputs()[0]) if len(shapes) == 1 else None,
                        n=calib_n, pre=preprocess, seed=int(kw.get("seed") or 0))
        calib = cs.arrays
    opts = PipelineOptions(calib=calib, **kw)
    if outdir is not None:
        check_outdir(outdir)  # before the training, not after
        if opts.checkpoint and _inside(opts.checkpoint, outdir):
            raise UserError(f"--checkpoint {opts.checkpoint} is inside the output folder {outdir}, which appears "
                            f"only complete, with this run's outputs: put the checkpoint beside it")
    final, masks, report = run_pipeline(net, train, val, opts, log=log)
    report["source"] = {"prototxt": str(prototxt), "weights": str(weights)}
    if outdir is not None and main:
        from . import plots
        extra = {}
        if plots.available():
            extra["rounds.png"] = plots.rounds_png(json_safe(report))
            report["plot"] = "rounds.png"
        else:
            report.setdefault("notes", []).append("rounds.png not drawn: matplotlib is not installed "
                                                  "(pip install 'lrprune-caffe[plot]')")
        extra.update({"report.json": json.dumps(json_safe(report), indent=2) + "\n",
                      "report.md": pipeline_markdown(report)})
        if masks:
            extra["masks.npz"] = masks_npz(masks)
        if opts.train_net is not None:
            from lrprune_caffe.io.train_net import train_net_text
            extra["train_val.prototxt"] = train_net_text(opts.train_net, final)
        if onnx:
            from lrprune_caffe.export.onnx import export_model
            extra["model.onnx"] = export_model(final).SerializeToString()
        report["written"] = write_net(final, outdir, extra=extra)
    return report, final


__all__ = ["run_pipeline", "pipeline_files", "PipelineOptions", "SCHEDULES", "parse_steps", "pipeline_markdown",
           "net_numbers", "DEFAULT_PRUNE_STEPS"]
