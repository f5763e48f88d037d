"""``compress --speedup S --cost latency``: the budget in measured milliseconds on the target runtime, and
the measured end-to-end speed-up of the written net.

Options (fields of :class:`lrprune_caffe.core.options.CompressOptions`; the target runtime is
``engine`` and ``threads``: the engine the check runs on is the one the net is meant for):

- ``cost``: ``"latency"`` (per-layer latency tables of :mod:`lrprune_caffe.engines.latency`, allocated by
  :mod:`lrprune_caffe.lowrank.latency_budget`), ``"macs"`` (the MAC budget, :mod:`lrprune_caffe.lowrank.budget`),
  or None (the default, :data:`DEFAULT_COST`): latency when its tables can be had within ``table_time``
  seconds (60; a cached table costs nothing), the net takes at least :data:`MIN_NET_MS` on the target
  and the tables say the target can be reached; macs otherwise, with a note saying why (an engine
  without tables, the time ran out, a net too fast to budget by its layers' microseconds, a target
  the tables say cannot be reached). Either cost spends by the same per-layer error
  (:func:`lrprune_caffe.core.ranks.budget_energies`: response eigenvalues with ``--calib``, else
  the weights' energy); they differ only in what a cut saves. An explicit ``"latency"`` waits for its
  tables (or ``table_time`` when given) and refuses what it cannot do.
- ``threads`` (None: 1) and ``batch`` (1): the target's intra-op threads and batch.
- ``measure_rounds`` (20; 0: skip): after factorizing, the original and the written net run
  interleaved (ABBA rounds) on the target and the report gives the measured speed-up (median of the
  per-round wall-time ratios, 10th-90th percentiles; with one thread also in CPU time) next to the
  requested one; the outcome line says plainly when the target was missed.

The allocation never buys a configuration slower than leaving a layer alone
(:func:`lrprune_caffe.lowrank.latency_budget.latency_options` drops them).
"""

from __future__ import annotations

import time

import numpy as np

from lrprune_caffe.engines import latency as L, latency_prune as LP
from lrprune_caffe.errors import EngineError, UserError
from lrprune_caffe.lowrank import latency_budget as lb
from lrprune_caffe.transforms.factorize import LayerPlan

from .latency_check import Checker, factorized_net, prune_spec  # noqa: F401

COSTS = ("latency", "macs")
TABLE_TIME_S = 60.0
MEASURE_ROUNDS = 20


#: the cost when compress is given none: None = latency where its tables can be had (in ``table_time``,
#: on a net slow enough to time by layers, at a reachable target), else macs with a note saying why
DEFAULT_COST = None
#: the default uses latency only on nets at least this slow on the target (ms). Below it the layers take
#: microseconds, close to the runtime's per-op overhead and the timer's noise: the example LeNet (0.15 ms,
#: layers of 5-50 us) got tables whose chains' ms were not even monotone in the rank, and spending
#: README's --speedup 2 by them cut 6x the MACs (2.85x measured, 37% top-1; macs keeps 95.4%)
MIN_NET_MS = 1.0
#: the net factorized as chosen is measured against the original (interleaved) at most this many times to
#: correct the tables' savings (NetAdapt's measure-and-adjust loop), and not again once a check measured
#: between S and S * (1 + REFINE_TOL); of the checked choices the least-error one measured at S or more is kept
#: (else the fastest)
REFINE_STEPS = 5
REFINE_TOL = 0.05
#: once bracketed, the refinement aims this far past S (a check's median still wavers by a few percent)
REFINE_AIM = 0.02
#: no further check is started once the refinement has taken this long (s; VGG-16 at 224: ~15 s a check)
REFINE_TIME_S = 60.0
#: the refinement's correction of the tables' savings is kept within these factors
SAVING_LIMITS = (0.25, 2.0)


def cost_of(o):
    """The cost asked for: "latency", "macs", or None (latency if it can be had)."""
    return o.cost or DEFAULT_COST


class NoLatency(Exception):
    """Why the latency cost is not used (with cost None, compress falls back to macs and notes it)."""


def check_options(o):
    """Refuse what cannot work or would have no effect (the flags' names in the messages)."""
    cost, batch, table_time, rounds = o.cost, o.batch, o.table_time, o.measure_rounds
    speedup, engine = o.speedup, o.engine
    if cost is not None and cost not in COSTS:
        raise UserError(f"--cost: unknown cost '{cost}' (choose from {', '.join(COSTS)})")
    given = [f for f, v in (("--cost", cost), ("--batch", batch), ("--table-time", table_time),
                            ("--measure-rounds", rounds)) if v is not None]
    if given and speedup is None:
        raise UserError(f"{given[0]} sets the --speedup budget's target; it has no effect without --speedup S")
    if batch is not None and int(batch) < 1:
        raise UserError(f"--batch {batch} must be at least 1")
    if table_time is not None and not float(table_time) > 0:
        raise UserError(f"--table-time {table_time} must be above 0 seconds")
    if rounds is not None and int(rounds) < 0:
        raise UserError(f"--measure-rounds {rounds} must be >= 0 (0: do not measure)")
    if cost == "latency" and engine not in L.RUNTIMES:
        raise UserError(f"--cost latency: no latency tables for engine '{engine}' (they exist for "
                        f"{', '.join(L.RUNTIMES)}); use --engine onnxruntime or --cost macs")
    if cost == "macs" and table_time is not None:
        raise UserError("--table-time bounds the latency tables' measurement; it has no effect with "
                        "--cost macs")


def target_of(engine: str, threads, batch) -> L.Target:
    if engine not in L.RUNTIMES:
        raise NoLatency(f"no latency tables for engine '{engine}' (only {', '.join(L.RUNTIMES)})")
    return L.Target(engine, int(threads or 1), int(batch or 1))


def plan(net, infos: dict, energies: dict, *, speedup: float, scheme: str, criterion: str, target: L.Target,
         time_budget_s=None, progress: bool = False, refine=None, min_net_ms=None, prunable=()) -> dict:
    """The latency allocation: {"choice": {name: ranks or None}, "reasons": {name: why left alone},
    "section": the report's budget section, "notes": [...]}. Raises :class:`NoLatency` (tables not
    complete within ``time_budget_s``, or the net faster than ``min_net_ms``) or
    :class:`lrprune_caffe.lowrank.latency_budget.Unreachable`.

    ``energies``: {name: per rank dimension, what the budget spends by}
    (:func:`lrprune_caffe.core.ranks.budget_energies`, as the MAC budget does: a cut's error is the
    same number under either cost; only what it saves is counted in ms instead of MACs).

    ``refine(choice, prune)``: the measured speed-up of the whole net factorized at ``choice`` over the
    original (:class:`Checker`: interleaved rounds, both warmed up alike, the median ratio, as the
    report measures it), or None. Read as ms on the tables' scale (total / speed-up), it corrects what
    every option saves against its layer left alone by one factor, the measured saving / the predicted
    one (:func:`lrprune_caffe.lowrank.latency_budget.correct_savings`, on the structured options too),
    and the allocation is made again: NetAdapt's measure-and-adjust loop, at most :data:`REFINE_STEPS`
    checks, stopping once one measured between S and S * (1 + :data:`REFINE_TOL`) (or after
    :data:`REFINE_TIME_S`); once a check met S and one cutting less did not, the factor is interpolated
    between them. The choice kept
    is the least-error checked one whose measured speed-up is at least S (no tolerance; else the fastest
    checked), never an unchecked re-allocation, and its measured speed-up is the section's
    ``predicted_speedup`` (the tables' own is ``tables_speedup``). One factor from whole-net totals, not
    one per layer, because onnxruntime fuses differently around a chain (ResNet's residual Add joins the
    original conv but may stay apart from a chain), so per-layer attributions do not compare. (Before,
    the factorized net was profiled alone, at another time than the original's cached profile, and its
    lower quartile compared with the original's: ResNet-50 at 112 "met" 1.5x and measured 1.24x.)

    ``prunable``: layers that may also be structurally pruned (keep ``k`` of ``n`` outputs and shrink
    the consumers, :mod:`lrprune_caffe.engines.latency_prune`) instead of factorized. Their error is
    the same criterion on the filters' energies ||W_i||^2, the relative weight error of removing them,
    as an SVD rank's is of its discarded components (so at equal error SVD always keeps more, and
    pruning is bought only where the table says it is faster for it). ``refine(choice, prune)``;
    the result's "prune" is {name: outputs kept}."""
    try:
        if min_net_ms is not None:
            _check_net_ms(net, infos, target, min_net_ms)
        tables = L.layer_tables(infos, scheme, target, net=net, progress=progress, time_budget_s=time_budget_s)
    except (EngineError, UserError) as e:  # UserError: a layer with no ONNX lowering (a train_val's Data layer)
        raise NoLatency(f"the net could not be timed on {target.runtime} ({e})") from None
    if not tables.complete:
        raise NoLatency(f"its tables were not measured within {time_budget_s:.0f} s ({len(tables.tables)} of "
                        f"{len(infos)} layers; what was measured is cached, so a rerun goes further; "
                        f"--cost latency without --table-time waits for all)")
    prune_tabs = {}
    names_p = [n for n in infos if n in set(prunable) and n in tables.tables and len(tables.tables[n].axes) == 1]
    if names_p:
        deadline = None if time_budget_s is None else time.perf_counter() + max(0.0, time_budget_s - tables.seconds)
        t0 = time.perf_counter()
        prune_tabs, more = LP.prune_tables(net, names_p, tables.tables, target, deadline)
        tables.notes.extend(more)
        tables.seconds += time.perf_counter() - t0  # the structured options are part of the tables' time
    base = dict(tables.tables)
    options, dropped, reasons = _allocate(tables, infos, energies, criterion, prune_tabs)
    alloc = lb.allocate(options, tables.total_ms, speedup, dropped_slower=dropped)
    correction, steps, tried = 1.0, [], []
    rounds, started = (REFINE_STEPS if refine is not None else 0), time.perf_counter()
    for step in range(rounds):
        choice, pruned = _split(alloc.choice)
        if not choice and not pruned:
            break
        t0 = time.perf_counter()
        measured = refine(choice, pruned)
        if not measured:
            break
        spent = time.perf_counter() - t0
        # the measured speed-up read as the net's ms on the tables' scale (the original's profiled total)
        observed = alloc.total_ms / float(measured)
        steps.append({"predicted_ms": alloc.predicted_ms, "observed_ms": float(observed),
                      "measured_speedup": float(measured), "saving_correction": correction})
        tried.append((float(observed), _total_error(options, alloc), alloc, options, dropped, reasons, tables.tables))
        saving = alloc.total_ms - alloc.predicted_ms  # what the tables say the choice saves
        close = speedup <= float(measured) <= speedup * (1 + REFINE_TOL)
        if (not saving > 0 or close or step == rounds - 1  # no re-allocation that no measurement would check
                or time.perf_counter() - started + spent > REFINE_TIME_S):
            break
        correction = _next_correction(steps, correction, saving, alloc.total_ms, speedup)
        tables.tables = {n: lb.correct_savings(t, correction, SAVING_LIMITS) for n, t in base.items()}
        options, dropped, reasons = _allocate(tables, infos, energies, criterion,
                                              _corrected_prune(prune_tabs, base, correction))
        try:
            alloc = lb.allocate(options, tables.total_ms, speedup, dropped_slower=dropped)
        except lb.Unreachable as e:  # corrected, S is out of the tables' reach: measure the nearest they reach
            alloc = lb.allocate(options, tables.total_ms, 0.999 * e.best_speedup, dropped_slower=dropped)
        if any(alloc.choice == t[2].choice for t in tried):
            break  # measured already
    if tried:  # of the profiled choices, the least error among those that met the target, else the fastest
        met = [t for t in tried if t[0] <= tables.total_ms / speedup * (1 + 1e-9)]  # measured >= S, no tolerance
        best = min(met, key=lambda t: t[1]) if met else min(tried, key=lambda t: t[0])
        _, _, alloc, options, dropped, reasons, tables.tables = best
        chosen = tried.index(best)
        correction = steps[chosen]["saving_correction"]
    choice, pruned = _split(alloc.choice)
    for o in options:
        if alloc.choice[o.name] is None:
            reasons[o.name] = ("no factorized configuration measured faster than the layer left alone"
                               if len(o.macs) == 0 else
                               "left alone: the latency budget was met at less error in other layers")
    err = {o.name: (0.0 if alloc.choice[o.name] is None else
                    float(o.err[_row(o.ranks, alloc.choice[o.name])])) for o in options}
    ms_of = {o.name: (None if alloc.choice[o.name] is None else
                      float(o.macs[_row(o.ranks, alloc.choice[o.name])])) for o in options}
    layers = {n: {"left_alone_ms": t.left_alone_ms, "calibration": t.scale, "ms": ms_of.get(n),
                  "error": err.get(n), "dropped_slower": dropped.get(n, 0)} for n, t in tables.tables.items()}
    for n, k in pruned.items():
        layers[n]["structured"] = {"outputs_kept": int(k), "outputs": int(prune_tabs[n].n),
                                   "shrinks": list(prune_tabs[n].consumers)}
    section = {"cost": "latency", "speedup": float(speedup), "target": target.describe(),
               "timing": tables.timing, "total_ms": alloc.total_ms, "fixed_ms": alloc.fixed_ms,
               "target_ms": alloc.target_ms, "predicted_ms": alloc.predicted_ms,
               "predicted_speedup": (alloc.predicted_speedup if not steps else steps[chosen]["measured_speedup"]),
               "tables_speedup": alloc.predicted_speedup, "criterion": criterion,
               "error": float(sum(err.values())),
               "tables": {"seconds": tables.seconds, "cpu_seconds": tables.cpu_seconds,
                          "graphs_timed": tables.measured, "cache": tables.cache_path,
                          "wall_ms": tables.wall_ms},
               "refined": None if not steps else {"saving_correction": correction, "first": steps[0],
                                                  "steps": steps, "chosen_step": chosen},
               "structured_options": sorted(prune_tabs), "layers": layers}
    return {"choice": {**choice, **{n: None for n in pruned}, **{n: None for n, r in alloc.choice.items()
                                                               if r is None}},
            "prune": pruned, "reasons": reasons, "section": section, "notes": list(tables.notes)}


def _next_correction(steps: list, correction: float, saving: float, total_ms: float, speedup: float) -> float:
    """The next savings factor: once one checked choice met S and one with a larger factor (less cut)
    did not, the factor interpolated between them (linear in the measured ms) at S * (1 + REFINE_AIM);
    else the last one times the measured saving / the predicted one."""
    aim = total_ms / (speedup * (1 + REFINE_AIM))
    g = [s["saving_correction"] for s in steps]
    met = [i for i, s in enumerate(steps) if s["measured_speedup"] >= speedup]
    lo = max(met, key=lambda i: g[i], default=None)
    hi = None if lo is None else min((i for i, s in enumerate(steps) if s["measured_speedup"] < speedup
                                      and g[i] > g[lo]), key=lambda i: g[i], default=None)
    if hi is not None:
        a, b = steps[lo]["observed_ms"], steps[hi]["observed_ms"]
        t = 0.5 if not b > a else float(np.clip((aim - a) / (b - a), 0.1, 0.9))
        return g[lo] + t * (g[hi] - g[lo])
    return float(np.clip(correction * (total_ms - steps[-1]["observed_ms"]) / saving, *SAVING_LIMITS))


def _corrected_prune(prune_tabs: dict, base: dict, factor: float) -> dict:
    """The structured options with their savings against the layer left alone times ``factor``."""
    import dataclasses
    out = {}
    for n, pt in prune_tabs.items():
        left = float(base[n].left_alone_ms)
        out[n] = dataclasses.replace(pt, ms=left - factor * (left - np.asarray(pt.ms, np.float64)))
    return out


def _total_error(options, alloc) -> float:
    return float(sum(0.0 if alloc.choice[o.name] is None else float(o.err[_row(o.ranks, alloc.choice[o.name])])
                     for o in options))


def _split(choice: dict) -> tuple:
    """({name: ranks} factorized, {name: outputs kept} structurally pruned) of an allocation's choice
    (a pruning option's "ranks" are (-k,): see :func:`_allocate`)."""
    fac = {n: r for n, r in choice.items() if r is not None and r[0] > 0}
    pruned = {n: -int(r[0]) for n, r in choice.items() if r is not None and r[0] < 0}
    return fac, pruned


def _check_net_ms(net, infos, target: L.Target, min_net_ms: float):
    """Raise :class:`NoLatency` when the whole net, profiled once on the target (cached; the tables
    reuse it), takes under ``min_net_ms``: checked before any layer is tabled."""
    cache, counter = L.Cache(target), [0]
    prof = L.net_profile(net, target, cache, counter)
    if counter[0]:
        cache.save()
    total = L.profile_total(prof)
    if total >= min_net_ms:
        return
    layers = [1e3 * float(ms) for name, ms in prof.get("layers", {}).items() if name in infos]
    span = f" (its factorizable layers {min(layers):.0f}-{max(layers):.0f} us)" if layers else ""
    raise NoLatency(f"the net runs in {total:.3f} ms on {target.runtime}{span}, under {min_net_ms:g} ms: layer "
                    f"times that close to the runtime's per-op overhead and the timer's noise are no budget to "
                    f"spend cuts by (--cost latency uses them anyway)")


def _row(ranks, chosen) -> int:
    hit = np.nonzero(np.all(np.atleast_2d(ranks) == np.asarray(chosen)[None, :], axis=1))[0]
    return int(hit[0])


def _allocate(tables, infos, energies, criterion, prune_tabs=None) -> tuple:
    """Each layer's options in ms: its factorized ranks, and (``prune_tabs``) its structured-pruning
    options, encoded as ranks (-k,) for "keep k outputs"."""
    options, dropped, reasons = [], {}, {}
    for name in infos:
        table = tables.tables.get(name)
        if table is None:
            reasons[name] = "no rank cuts its MACs, so no factorized configuration was timed"
            continue
        ranks, err = lb.rank_candidates(energies[name], table, criterion)
        opts, slower, _ = lb.latency_options(table, ranks, err)
        pt = (prune_tabs or {}).get(name)
        if pt is not None:
            k, ms = pt.options()
            e = lb.rk.CRITERIA[criterion](pt.energies)[k - 1] if k.size else np.zeros(0)
            faster = ms < float(table.left_alone_ms)
            slower += int(np.sum(~faster))
            opts = lb.rk.LayerChoices(name, opts.macs_before, np.concatenate([opts.macs, ms[faster]]),
                                      np.concatenate([opts.err, e[faster]]),
                                      np.concatenate([opts.ranks, -k[faster][:, None]]).astype(np.int64))
        options.append(opts)
        dropped[name] = slower
    return options, dropped, reasons


def budget_latency(net, rp, infos: dict, names: list, energies: dict, o, prunable=()) -> bool:
    """The rank step under the latency cost: fills ``rp.plan``, the rows' reasons, ``rp.budget`` and
    ``rp.notes`` and returns True; False (with a note) when the cost is None and latency cannot be used.
    ``energies``: {name: what the budget spends by} (:func:`lrprune_caffe.core.ranks.budget_energies`)."""
    explicit = cost_of(o) == "latency"
    try:
        target = target_of(o.engine, o.threads, o.batch)
        budget = float(o.table_time) if o.table_time is not None else (None if explicit else TABLE_TIME_S)
        res = plan(net, {n: infos[n] for n in names}, energies, speedup=float(o.speedup), scheme=o.scheme,
                   criterion=o.criterion, target=target, time_budget_s=budget, progress=o.progress,
                   refine=(checker := Checker(net, infos, target, o, rp.caches)),
                   min_net_ms=None if explicit else MIN_NET_MS, prunable=prunable)
    except NoLatency as e:
        if explicit:
            raise UserError(f"--cost latency: {e}") from None
        rp.notes.append(f"--speedup counts multiply-adds (--cost macs): the latency cost was not used, {e}")
        return False
    except lb.Unreachable as e:
        msg = (f"--speedup {o.speedup} cannot be reached on {target.describe()}: the latency tables predict at "
               f"most {e.best_speedup:.2f}x even with every layer at its fastest measured configuration")
        if explicit:
            raise UserError(msg + " (--cost macs counts multiply-adds instead)") from None
        rp.notes.append(f"--speedup counts multiply-adds (--cost macs): {msg}")
        return False
    rp.notes.extend(res["notes"])
    if res["section"].get("refined"):
        res["section"]["refined"].update(seconds=checker.seconds, readings=checker.readings)
    for name, ranks in res["choice"].items():
        if ranks is not None:
            info = infos[name]
            rp.plan[name] = LayerPlan(info.scheme_for(o.scheme), tuple(int(r) for r in ranks), info)
    for name, why in res["reasons"].items():
        rp.rows[name].reason = why
    for name, k in res["prune"].items():
        rp.structured[name] = int(k)
        rp.rows[name].reason = (f"structurally pruned to {k} outputs: the latency table has it faster than any "
                                f"rank at that error")
    rp.budget = res["section"]
    return True


# ---------------------------------------------------------------------------
# the measured end-to-end speed-up

def measure(net_a, net_b, engine: str, threads, batch, rounds: int) -> dict:
    """Interleaved runs of both nets on the target: the median of the per-round ratios and its spread."""
    if engine in L.RUNTIMES:
        t = L.Target(engine, int(threads or 1), int(batch or 1))
        m = L.measured_speedup(net_a, net_b, t, rounds=rounds)
        out = {"engine": t.describe(), "speedup": m["paired_median"], "p10": m["paired_p10"],
               "p90": m["paired_p90"], "orig_ms": m["a_ms"], "new_ms": m["b_ms"], "rounds": rounds}
        if "cpu_paired_median" in m:  # one thread: CPU time too, which other jobs on the machine do not inflate
            out.update({"cpu_speedup": m["cpu_paired_median"], "cpu_p10": m["cpu_paired_p10"],
                        "cpu_p90": m["cpu_paired_p90"]})
        return out
    from lrprune_caffe.engines.bench import bench_nets
    if batch not in (None, 1):
        raise EngineError(f"{engine} is timed at batch 1 only")
    r = bench_nets([net_a, net_b], runtime=engine, threads=int(threads or 1), runs=rounds, warmup=2, progress=False)
    return {"engine": f"{engine}, {int(threads or 1)} thread(s), batch 1", "speedup": 1.0 / r["paired_ratio"],
            "p10": None, "p90": None, "orig_ms": r["nets"][0]["median_ms"], "new_ms": r["nets"][1]["median_ms"],
            "rounds": rounds}


def report_speed(net, new, o, report: dict) -> None:
    """With --speedup: measure the written net against the original on the target, put it in
    ``report["speed"]`` and say in the outcome line whether the requested speed-up was met."""
    rounds = MEASURE_ROUNDS if o.measure_rounds is None else int(o.measure_rounds)
    if o.speedup is None or rounds == 0:
        return
    budget = report.get("budget") or {}
    try:
        m = measure(net, new, o.engine, o.threads, o.batch, rounds)
    except (EngineError, UserError) as e:  # UserError: the net cannot be exported to time it (no lowering)
        report.setdefault("notes", []).append(f"speed-up not measured: {e}")
        return
    requested = float(o.speedup)
    met = m["speedup"] >= requested
    m.update({"requested": requested, "cost": budget.get("cost", "macs"), "met": met,
              "predicted": budget.get("predicted_speedup")})
    lowered = "int8" if o.quantize else ("fp16" if o.precision not in (None, "fp32") else None)
    if lowered:  # what was timed is the written net in fp32, not model.onnx
        m["measured_net"] = f"fp32 (model.onnx is {lowered} and was not timed)"
    report["speed"] = m
    spread = f"p10-p90 {m['p10']:.2f}-{m['p90']:.2f}x, " if m.get("p10") is not None else ""
    what = f" of the fp32 net (model.onnx is {lowered}, not timed)" if lowered else ""
    line = (f"speed-up {'met' if met else 'MISSED'}: {m['speedup']:.2f}x measured{what} ({spread}{rounds} "
            f"interleaved rounds on {m['engine']}) against {requested:.2f}x requested ({m['cost']} budget"
            + (f", {m['predicted']:.2f}x predicted" if m.get("predicted") else "") + ")"
            + (f"; in CPU time {m['cpu_speedup']:.2f}x" if m.get("cpu_speedup") else ""))
    out = report.get("outcome")
    if out:
        out["summary"] = line + "; " + out["summary"]
        out["speed_met"] = met
    else:
        report["outcome"] = {"summary": line, "speed_met": met}


__all__ = ["COSTS", "DEFAULT_COST", "MIN_NET_MS", "REFINE_STEPS", "cost_of", "TABLE_TIME_S", "MEASURE_ROUNDS",
           "NoLatency", "check_options",
           "target_of", "plan", "budget_latency", "measure", "report_speed"]
