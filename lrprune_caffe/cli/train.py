"""``finetune`` and ``pipeline`` sub-commands (registered by :mod:`lrprune_caffe.cli.main`; never imports it).

This module must stay importable without torch: torch is imported only when
``finetune`` runs (through :mod:`lrprune_caffe.train`).
"""

from __future__ import annotations

import json
import sys

from lrprune_caffe.errors import UserError
from .common import _add_net_args, add_output
from .evaluate import (_add_data_args, _inputs_with_labels, _load_eval_data, _log, _net_input_shape,  # noqa: F401
                       _preprocess, _uses_data_layer)


def _load_train_data(args, net):
    from lrprune_caffe.data.datasets import load_mnist_split
    from lrprune_caffe.data.stream import open_data
    if bool(args.data) == bool(args.data_split):
        raise UserError("give the training data with exactly one of --data TRAIN or --data-split SPLIT.npz "
                        "(or a train_val NET with data layers)")
    shape = _net_input_shape(net)
    if args.data_split:
        train, test = load_mnist_split(args.data_split)
        val = test
        if args.val:
            val = open_data(args.val, input_shape=shape, pre=_preprocess(args))
        return train, val
    train = _unlabeled_npz(args) or open_data(args.data, input_shape=shape, pre=_preprocess(args))
    val = open_data(args.val, input_shape=shape, pre=_preprocess(args)) if args.val else None
    return train, val


def _unlabeled_npz(args):
    """With --teacher, an .npz holding x and no y: samples without labels (-1)."""
    if not getattr(args, "teacher", None) or not str(args.data).lower().endswith(".npz"):
        return None
    import numpy as np
    from lrprune_caffe.data.datasets import make_dataset
    from lrprune_caffe.fileutil import read_npz
    from lrprune_caffe.train.finetune import UNLABELED
    z = read_npz(args.data, "an .npz with arrays 'x' (and 'y')")
    if "y" in z or "x" not in z:
        return None
    x = z["x"]
    return make_dataset(x, np.full(len(x), UNLABELED, np.int64), str(args.data))


def _train_val_given(args) -> bool:
    """No --data/--data-split and the net has a data layer in TRAIN or TEST: it is a train_val."""
    from lrprune_caffe.engines.model import is_onnx
    if args.data or args.data_split or is_onnx(args.net):
        return False
    from lrprune_caffe.io.caffe import read_net
    from lrprune_caffe.data.trainval import has_data_layer
    return any(has_data_layer(read_net(args.net, phase=ph)) for ph in ("TRAIN", "TEST"))


def _net_and_data(args, default_batch=64):
    """(deploy net, train, val, batch size, notes): from a train_val's data layers, or from the flags."""
    from lrprune_caffe.io.caffe import load_net
    if _train_val_given(args):
        from lrprune_caffe.data.stream import open_data
        from lrprune_caffe.data.trainval import load_train_val
        tv = load_train_val(args.net, args.weights, seed=args.seed or 0)
        if tv.train is None:
            raise UserError(f"{args.net}: no data layer in the TRAIN phase to train on (give --data)")
        val = tv.val.dataset if tv.val is not None else None
        if args.val:
            val = open_data(args.val, input_shape=_net_input_shape(tv.net), pre=_preprocess(args))
        if getattr(args, "output_blob", "") is None and tv.scores:
            args.output_blob = tv.scores
        return tv.net, tv.train.dataset, val, args.batch_size or tv.train.batch_size, tv.notes
    net = load_net(args.net, args.weights, phase=args.phase)
    train, val = _load_train_data(args, net)
    return net, train, val, args.batch_size or default_batch, []


def _spawn_processes(args) -> int:
    """--nproc-per-node N: run this command in N processes set up as torchrun sets them up."""
    argv = list(sys.argv[1:])
    if args.command not in argv:
        raise UserError("--nproc-per-node needs the lrprune-caffe command line; or start the processes "
                        "yourself: torchrun --nproc-per-node N -m lrprune_caffe ...")
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        out.append(a)
    from lrprune_caffe.train.loop import launch_local
    return launch_local(out, int(args.nproc_per_node))


def _checkpoint_path(args):
    import os
    if args.checkpoint:
        return args.checkpoint
    # beside OUTDIR, not in it: OUTDIR appears only complete, with this run's outputs (fileutil)
    out = os.path.abspath(args.output)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.checkpoint.pt")


def solver_from_args(args, finetune=False):
    """Flags over --solver, else over the defaults: finetune's (``finetune_solver``) or the plain fields."""
    from lrprune_caffe.train.solver import SolverSettings, finetune_solver, read_solver
    base = read_solver(args.solver) if args.solver else \
        finetune_solver(lr_policy=args.lr_policy, power=args.power) if finetune else SolverSettings()
    return base.with_overrides(base_lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                               lr_policy=args.lr_policy, gamma=args.gamma, power=args.power,
                               stepsize=args.stepsize, max_iter=args.max_iter, type=args.solver_type,
                               clip_gradients=args.clip_gradients)


def cmd_finetune(args):
    from lrprune_caffe.train import require_torch
    require_torch()  # say how to install it before reading anything
    from lrprune_caffe.api import load_net, write_net
    from lrprune_caffe.engines.evaluate import evaluate
    from lrprune_caffe.ir.masks import load_masks, masks_npz
    from lrprune_caffe.train.finetune import finetune
    import os

    solver = solver_from_args(args, finetune=True)
    for note in solver.notes:
        _log(f"note: {note}")
    from lrprune_caffe.train.loop import check_device, process_rank
    check_device(args.device)  # once, before any process starts
    if args.nproc_per_node and args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _spawn_processes(args)
    main = process_rank() == 0
    from lrprune_caffe.train.finetune import DEFAULT_BATCH_SIZE
    net, train, val, batch_size, notes = _net_and_data(args, default_batch=DEFAULT_BATCH_SIZE)
    for note in notes:
        if main:
            _log(f"note: {note}")
    masks = None
    if args.masks:
        masks = load_masks(args.masks, net)
    seed = args.seed if args.seed is not None else (solver.random_seed if solver.random_seed is not None else 0)
    ckpt = _checkpoint_path(args)
    teacher = None
    if args.teacher:
        teacher = load_net(args.teacher[0], args.teacher[1], phase=args.phase)
    elif args.unlabeled:
        raise UserError("--unlabeled needs --teacher NET WEIGHTS: without labels the teacher gives the targets")
    trained, history = finetune(net, train, val, masks=masks, solver=solver, epochs=args.epochs,
                                batch_size=batch_size, seed=seed, output=args.output_blob,
                                threads=args.threads, progress=None if not args.quiet else False,
                                log=None if (args.quiet or args.json) else _log,
                                workers=args.workers, device=args.device, checkpoint=ckpt, resume=args.resume,
                                teacher=teacher, temperature=args.temperature, distill_weight=args.distill_weight,
                                use_labels=not args.unlabeled, label_smoothing=args.label_smoothing)
    if not main:
        return 0  # only rank 0 writes
    if val is not None and not args.no_final_eval:
        # the written model, on an independent engine
        try:
            res = evaluate(trained, val, output=args.output_blob, threads=args.threads, progress=False)
            history["final_eval"] = {k: res[k] for k in ("engine", "top1", "top5", "n") if k in res}
        except Exception as e:  # never lose a finished training to an engine problem
            history["final_eval"] = {"error": f"{type(e).__name__}: {e}"}
            _log(f"note: could not evaluate the trained net with onnxruntime/OpenCV: {e}")
    history["net_file"], history["weights_file"] = args.net, args.weights
    history["masks_file"] = args.masks
    extra = {"history.json": json.dumps(history, indent=2) + "\n", **_train_val_file(args, trained)}
    if masks:
        extra["masks.npz"] = masks_npz(masks)
    written = write_net(trained, args.output, extra=extra)
    if not args.checkpoint and os.path.exists(ckpt):
        os.remove(ckpt)  # the run is written: its default checkpoint has served
    if args.json:
        print(json.dumps({"written": written, "history": history}, indent=2))
        return 0
    for path in written.values():
        print(f"wrote {path}")
    fin = history.get("final", {})
    msg = f"trained {history['iterations']} iterations, final loss {fin.get('loss', float('nan')):.4f}"
    if "top1" in history.get("final_eval", {}):
        fe = history["final_eval"]
        msg += f", val top-1 {fe['top1']:.4f} ({fe['engine']})"
    print(msg)
    return 0


def _train_val_file(args, written_net) -> dict:
    """{"train_val.prototxt": text} when NET is a train_val (trained on its data layers): written
    beside the deploy net, every phase kept, rewritten as the deploy net was (io.train_net)."""
    if not _train_val_given(args):
        return {}
    from lrprune_caffe.io.train_net import read_train_net, train_net_text
    return {"train_val.prototxt": train_net_text(read_train_net(args.net), written_net)}


# ---- pipeline -------------------------------------------------------------------

def cmd_pipeline(args):
    from lrprune_caffe.train import require_torch
    require_torch()
    from lrprune_caffe.core.pipeline import pipeline_files, parse_steps
    steps = parse_steps(args.prune_steps, args.sparsity)
    if args.speedup is not None and args.speedup <= 1:
        raise UserError(f"--speedup {args.speedup} must be above 1 (a MAC reduction factor)")
    if args.schedule == "han" and (args.speedup is not None or args.scheme != "channel"):
        raise UserError("--speedup and --scheme choose the factorization of --schedule lowrank-prune; "
                        "the han schedule only prunes")
    solver = solver_from_args(args)
    if solver.max_iter is not None:  # rounds run by epochs, until the tolerance is met
        _log(f"note: the pipeline ignores max_iter ({solver.max_iter}) of the solver settings: each round "
             f"trains at most --max-epochs epochs")
        import dataclasses
        solver = dataclasses.replace(solver, max_iter=None)
    if args.lr is None and not args.solver:
        solver = solver.with_overrides(base_lr=0.005)
    import os
    from lrprune_caffe.train.loop import check_device, process_rank
    check_device(args.device)  # once, before any process starts
    if args.nproc_per_node and args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        return _spawn_processes(args)
    main = process_rank() == 0  # only rank 0 logs, prints and writes
    net, train, val, batch_size, notes = _net_and_data(args)
    for note in notes if main else ():
        _log(f"note: {note}")
    train_net = None
    if _train_val_given(args):  # trained on its data layers: OUTDIR/train_val.prototxt, rewritten as the net
        from lrprune_caffe.io.train_net import read_train_net
        train_net = read_train_net(args.net)
    ckpt = _checkpoint_path(args)
    report, _ = pipeline_files(args.net, args.weights, train, val, args.output, onnx=args.onnx, net=net,
                               log=None if (args.quiet or args.json or not main) else _log,
                               workers=args.workers, device=args.device, train_net=train_net,
                               schedule=args.schedule, prune_steps=steps, speedup=args.speedup or 2.0,
                               scheme=args.scheme, prune_scope=args.prune_scope, tolerance=args.tolerance,
                               max_epochs=args.max_epochs,
                               batch_size=batch_size, seed=args.seed or 0, threads=args.threads,
                               progress=False if (args.quiet or args.json) else None, solver=solver,
                               calib=args.calib, calib_n=args.calib_n, preprocess=_preprocess(args),
                               distill=args.distill, temperature=args.temperature,
                               distill_weight=args.distill_weight, checkpoint=ckpt, resume=args.resume)
    if not main:
        return 0
    if not args.checkpoint and os.path.exists(ckpt):
        os.remove(ckpt)  # the run is written: its default checkpoint has served
    if args.json:
        from lrprune_caffe.engines.compare import json_safe
        print(json.dumps(json_safe(report), indent=2))
        return 0
    from lrprune_caffe.core.pipeline import pipeline_markdown
    print(pipeline_markdown(report))
    for path in report.get("written", {}).values():
        print(f"wrote {path}")
    return 0


def _add_solver_args(p, default_lr, solver_help, max_iter_help, policy="fixed", clip=-1.0):
    """The solver flags of finetune and pipeline (read by :func:`solver_from_args`);
    ``max_iter_help=None`` hides --max-iter (the pipeline ignores it)."""
    import argparse
    p.add_argument("--solver", metavar="solver.prototxt", help=solver_help)
    p.add_argument("--lr", type=float, default=None, help=f"base learning rate (default {default_lr})")
    p.add_argument("--momentum", type=float, default=None, help="momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 0.0005)")
    p.add_argument("--lr-policy", choices=["fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid"],
                   default=None, help=f"Caffe lr policy (default {policy})")
    p.add_argument("--gamma", type=float, default=None, help="lr policy gamma")
    p.add_argument("--power", type=float, default=None,
                   help="lr policy power" + (" (default 1 with poly, 0.75 otherwise)" if policy != "fixed" else ""))
    p.add_argument("--stepsize", type=int, default=None, help="lr policy stepsize")
    p.add_argument("--max-iter", type=int, default=None, help=max_iter_help or argparse.SUPPRESS)
    p.add_argument("--solver-type", choices=["SGD", "Nesterov", "Adam"], default=None,
                   help="update rule (default SGD)")
    p.add_argument("--clip-gradients", type=float, default=None, metavar="N",
                   help=f"scale the gradients down to a global L2 norm of N when above it, as Caffe's "
                        f"clip_gradients (-1: off; default {clip:g})")


def _add_teacher_args(p, pipeline=False):
    """Distillation flags of finetune and pipeline (Hinton et al. 2015)."""
    from lrprune_caffe.train.finetune import DEFAULT_DISTILL_WEIGHT, DEFAULT_TEMPERATURE
    if pipeline:
        g = p.add_argument_group("distillation")
        g.add_argument("--distill", action="store_true",
                       help="fine-tune each round from the original net's soft targets (--temperature), "
                            "mixed with the labels' cross-entropy by --distill-weight")
    else:
        g = p.add_argument_group("distillation (labels become optional)")
        g.add_argument("--teacher", nargs=2, metavar=("NET", "WEIGHTS"),
                       help="distill from this net's class scores (the original, uncompressed net): soft "
                            "targets at --temperature, mixed with the labels' cross-entropy by --distill-weight")
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
                   help=f"softmax temperature of the soft targets (default {DEFAULT_TEMPERATURE:g})")
    g.add_argument("--distill-weight", type=float, default=DEFAULT_DISTILL_WEIGHT, metavar="W",
                   help=f"loss = W x T^2 x KL(teacher || net) + (1 - W) x cross-entropy on the labels "
                        f"(default {DEFAULT_DISTILL_WEIGHT:g}; 1: the teacher alone)")
    if pipeline:
        return
    g.add_argument("--unlabeled", action="store_true",
                   help="with --teacher: ignore the training data's labels (train on the teacher's outputs "
                        "alone). An .npz with only x needs no flag")


def _add_run_args(p, pipeline=False):
    """Data loading, devices, processes and checkpoints of finetune and pipeline (``pipeline``: its help)."""
    g = p.add_argument_group("processes and checkpoints")
    g.add_argument("--workers", type=int, default=0, metavar="N",
                   help="DataLoader worker processes decoding the training data (default 0: in the trainer)")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="train on cpu (default) or cuda")
    g.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="train in N processes with DistributedDataParallel (gloo on CPU, NCCL on CUDA), "
                        "started for you as 'torchrun --standalone' starts them; --batch-size is per process. "
                        f"'torchrun --nproc-per-node N -m lrprune_caffe {p.prog.split()[-1]} ...' works too")
    if pipeline:
        g.add_argument("--checkpoint", metavar="FILE",
                       help="checkpoint written after each round's step, every fine-tuning epoch and each round "
                            "(default .OUTDIR.checkpoint.pt beside OUTDIR, removed once the model is written)")
        g.add_argument("--resume", action="store_true",
                       help="continue a killed run from its checkpoint, where it stopped (same net, weights, data, "
                            "options and processes; another run's checkpoint is refused)")
        return
    g.add_argument("--checkpoint", metavar="FILE",
                   help="checkpoint written after every epoch (default .OUTDIR.checkpoint.pt beside OUTDIR, "
                        "removed once the model is written)")
    g.add_argument("--resume", action="store_true",
                   help="continue a killed run from its checkpoint (same data, batch size, seed, processes)")


def register(sub):
    from lrprune_caffe.train.finetune import DEFAULT_LABEL_SMOOTHING

    p = sub.add_parser("finetune", help="train the net with PyTorch (pruning masks held at zero)")
    _add_net_args(p, weights_required=True)
    _add_data_args(p, "training data")
    p.add_argument("--val", metavar="VAL", help="validation data (npz or image folder), accuracy per epoch")
    add_output(p, "dir", "OUTDIR", "folder for model.prototxt, model.caffemodel and history.json")
    p.add_argument("--masks", metavar="MASKS.npz",
                   help="pruning masks (bool, True = keep, keys '<layer>/<blob idx>'): masked weights stay 0")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training data (default 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per iteration and process (default 8; a train_val's TRAIN data layer "
                        "gives its own)")
    _add_run_args(p)
    _add_solver_args(p, default_lr=0.02, clip=10.0,
                     solver_help="Caffe solver settings (base_lr, momentum, weight_decay, lr_policy, "
                                 "max_iter...); flags below override it; max_iter overrides --epochs",
                     max_iter_help="iterations (batches); overrides --epochs",
                     policy="poly, power 1: the rate falls linearly to 0 over the run")
    p.add_argument("--label-smoothing", type=float, default=DEFAULT_LABEL_SMOOTHING, metavar="E",
                   help="cross-entropy target (1 - E) on the label + E / classes on each class "
                        f"(default {DEFAULT_LABEL_SMOOTHING:g})")
    p.add_argument("--seed", type=int, default=None, help="shuffling / dropout seed (default 0)")
    p.add_argument("--output-blob", metavar="BLOB", help="blob holding the class scores (default: the net's output)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-final-eval", action="store_true",
                   help="skip evaluating the trained net on --val with onnxruntime/OpenCV")
    _add_teacher_args(p)
    p.add_argument("--json", action="store_true", help="print what was written and the history as JSON")
    p.set_defaults(func=cmd_finetune)

    from lrprune_caffe.core.options import SCHEMES
    p = sub.add_parser(
        "pipeline", help="compress and fine-tune in rounds (schedules han, lowrank-prune); count the rounds",
        description="Run a compression schedule with fine-tuning (PyTorch) after each step. han: prune "
                    "to each --prune-steps sparsity in turn (magnitude, per layer or with --prune-scope "
                    "global over the net), fine-tuning after each; "
                    "lowrank-prune: factorize first (--scheme, --speedup), fine-tune, then the same pruning "
                    "rounds. Each round fine-tunes until validation top-1 is within --tolerance of the "
                    "original's, at most --max-epochs epochs. Writes OUTDIR/model.prototxt, model.caffemodel, "
                    "masks.npz, report.json, report.md (+ train_val.prototxt, rewritten as the net, when NET "
                    "is a train_val: trained on its TRAIN data layer, validated on its TEST one). Runs under "
                    "torchrun (--nproc-per-node): rank 0 compresses and writes, every process trains. A checkpoint "
                    "after each step, fine-tuning epoch and round; --resume continues a killed run where it "
                    "stopped, to the result an unkilled run gives.")
    _add_net_args(p, weights_required=True)
    _add_data_args(p, "training data")
    p.add_argument("--val", metavar="VAL", help="validation data (npz or image folder); default with "
                   "--data-split: its test digits")
    add_output(p, "dir", "OUTDIR", "output folder")
    p.add_argument("--schedule", choices=["han", "lowrank-prune"], default="lowrank-prune",
                   help="han: iterative magnitude pruning (Han et al. 2015); lowrank-prune: factorize, "
                        "then prune (default)")
    p.add_argument("--sparsity", type=float, default=None, metavar="S",
                   help="final sparsity of every conv/FC layer (default 0.9); the steps are 0.5, 0.7, "
                        "0.8, 0.9 cut at S")
    p.add_argument("--prune-steps", metavar="S1,S2,...", help="explicit increasing sparsity steps")
    p.add_argument("--prune-scope", choices=["layer", "global"], default="layer",
                   help="layer: each conv/FC layer to the step's sparsity (default); global: one magnitude "
                        "threshold over all of them")
    p.add_argument("--speedup", type=float, default=None, help="lowrank-prune: whole-net MAC reduction of "
                   "the factorization (default 2)")
    p.add_argument("--scheme", choices=SCHEMES, default="channel", help="lowrank-prune: conv scheme")
    p.add_argument("--calib", metavar="SRC",
                   help="unlabeled calibration data, as compress --calib takes it (an .npz, image folder with the "
                        "preprocessing flags, Caffe data source or train_val): each round's factorization / "
                        "pruning is fit to the original net's outputs before fine-tuning")
    p.add_argument("--calib-n", type=int, default=512, metavar="N", help="samples of --calib (default 512)")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="a round ends once val top-1 >= original - TOL (default 0.005 = 0.5 points)")
    p.add_argument("--max-epochs", type=int, default=5, help="epochs at most per round (default 5)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per iteration (default 64; a train_val's TRAIN data layer gives its own)")
    _add_solver_args(p, default_lr=0.005, solver_help="Caffe solver settings (flags override; its max_iter "
                     "is ignored: rounds run by epochs)", max_iter_help=None)
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch / engine threads")
    p.add_argument("--onnx", action="store_true", help="also write OUTDIR/model.onnx")
    _add_run_args(p, pipeline=True)
    _add_teacher_args(p, pipeline=True)
    p.add_argument("--json", action="store_true", help="print report.json")
    p.set_defaults(func=cmd_pipeline)

