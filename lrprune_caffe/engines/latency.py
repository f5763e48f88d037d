"""Per-layer latency tables on the target runtime, for a budget in milliseconds.

For each factorizable layer (its real geometry: channels, kernel, stride,
pad, dilation, group, bias, and its real input shape at the target batch)
we time, on the target runtime:

- the layer **left alone** (one Conv / Gemm);
- its **factorized chains** (the layers :mod:`lrprune_caffe.transforms.factorize`
  builds: channel = kxk conv to g*r channels then 1x1; spatial = kx1 then
  1xk; tucker2 = 1x1, kxk, 1x1; fc = two Gemms) on a coarse rank grid
  (:func:`rank_grid`: 5-8 ranks over 1..the rank where the chain's MACs reach
  the layer's, fewer for slow layers; Tucker-2: 4 x 4 or 5 x 5 (r_in, r_out)), in ascending rank,
  stopping a row after two chains no faster than the layer left alone.

Each candidate is a tiny ONNX graph (:mod:`lrprune_caffe.engines.latency_graphs`;
seeded weights of the right shapes: the time does not depend on their values)
run by onnxruntime with the target's session options (``intra_op_num_threads`` =
threads, ``inter_op_num_threads`` 1, sequential, ``ORT_ENABLE_ALL``, as the
exported net runs). Time = the lower quartile of 2 to 12 runs after warm-up,
stopping once the two fastest agree within 3% (in CPU time with one thread:
:func:`lrprune_caffe.engines.latency_graphs.cpu_clock`), minus the per-run cost
of any graph. The whole net is exported for timing with its large weights in an
external-data file (:mod:`lrprune_caffe.engines.latency_net`). VGG-16 at 224,
1 thread, an empty cache: ~100 graphs, 10 s CPU, 21-31 s wall at load 9-10 on
the shared 2-core machine (it was 19 s CPU, 28-31 s wall at load 2-3).

A layer timed alone is not the layer inside the net (hot caches, no fusion,
layout reorders around it). So by default (``timing="profile"``) the tables
are timed hot and then calibrated: the whole original net is profiled once
(:mod:`lrprune_caffe.engines.latency_net`, onnxruntime's profiler), and each
layer's row is scaled by its in-net time / its time alone
(:func:`lrprune_caffe.lowrank.latency_budget.calibrate`). The budget's fixed
part is then the net's total (the sum of its profiled parts,
:func:`lrprune_caffe.engines.latency_net.profile_total`) minus the tabled
layers' in-net times. ``timing="cold"`` (every run after a cache flush, no
calibration) and ``"hot"`` (neither) remain for comparison.

Everything measured is cached on disk (JSON; ``$LRPRUNE_CACHE/latency`` or
``~/.cache/lrprune-caffe/latency``), one file per target key (runtime and its
version, threads, batch, machine = platform.machine + CPU model + core
count, cold or not, and :data:`GRID_VERSION`), one entry per layer geometry: a second run
measures nothing.

This is measurement, not a test; unit tests replace :func:`measure_model` and :func:`time_runs`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrprune_caffe.errors import UserError
from lrprune_caffe.lowrank.latency_budget import LayerTable, calibrate
from .latency_graphs import (Flush, layer_model, measure_model, ort_options, overhead_model, session,  # noqa: F401
                             time_runs)
from .latency_graphs import break_even, cpu_clock, geometry, grid_points, rank_grid, signature  # noqa: F401
from .latency_net import (checked_speedup, in_net_ms, measured_speedup, net_runner,  # noqa: F401
                          net_signature, profile_net, profile_total)

RUNTIMES = ("onnxruntime",)
GRID_VERSION = 5  # bump when the grid or the timing method changes: old cache entries are ignored
#: how layers are timed: "profile" (hot, then scaled to their in-net time from the profiled net; the
#: default), "cold" (caches flushed before each run, no calibration), "hot" (neither)
TIMINGS = ("profile", "cold", "hot")


# ---------------------------------------------------------------------------
# target and cache key

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime
        return onnxruntime.__version__
    raise UserError(f"--engine: no latency tables for runtime '{runtime}' (choose from {', '.join(RUNTIMES)})")


@dataclass(frozen=True)
class Target:
    """Where the net will run: the runtime, its intra-op threads, the batch."""

    runtime: str = "onnxruntime"
    threads: int = 1
    batch: int = 1

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise UserError(f"--engine: no latency tables for runtime '{self.runtime}' "
                            f"(choose from {', '.join(RUNTIMES)})")
        if int(self.threads) < 1:
            raise UserError(f"--threads {self.threads} must be at least 1")
        if int(self.batch) < 1:
            raise UserError(f"--batch {self.batch} must be at least 1")

    def key(self) -> dict:
        return {"runtime": self.runtime, "version": runtime_version(self.runtime), "threads": int(self.threads),
                "batch": int(self.batch), "machine": platform.machine(), "cpu": cpu_model(),
                "cores": os.cpu_count(), "grid": GRID_VERSION, "clock": "cpu" if int(self.threads) == 1 else "wall"}

    def describe(self) -> str:
        k = self.key()
        return (f"{k['runtime']} {k['version']}, {k['threads']} thread(s), batch {k['batch']}, "
                f"{k['cpu']} ({k['cores']} cores, {k['machine']})")


def cache_dir(path=None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get("LRPRUNE_CACHE")
    if env:
        return Path(env) / "latency"
    return Path.home() / ".cache" / "lrprune-caffe" / "latency"


class Cache:
    """One JSON file per target key: {"target": key, "layers": {signature: entry}, "nets": {sig: ms}}."""

    def __init__(self, target: Target, directory=None, cold: bool = False):
        self.key = {**target.key(), "cold": bool(cold)}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = cache_dir(directory) / f"{self.key['runtime']}-t{self.key['threads']}-b{self.key['batch']}-" \
                                           f"{'cold-' if cold else ''}{digest}.json"
        self.data = self._read()
        self.hits = 0
        self.misses = 0

    def _read(self) -> dict:
        try:
            with open(self.path) as fh:
                data = json.load(fh)
            if data.get("target") == self.key:
                data.setdefault("layers", {})
                data.setdefault("nets", {})
                return data
        except (OSError, ValueError):
            pass
        return {"target": self.key, "layers": {}, "nets": {}}

    def get(self, section: str, sig: str, part: str = None):
        entry = self.data[section].get(sig)
        if entry is not None and part is not None:
            entry = entry.get(part) if isinstance(entry, dict) else None
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, section: str, sig: str, value, part: str = None):
        if part is None:
            self.data[section][sig] = value
        else:
            self.data[section].setdefault(sig, {})[part] = value

    def save(self):
        """Merge with what another process may have written meanwhile, then replace atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        disk = self._read()
        for section in ("layers", "nets"):
            for sig, entry in self.data[section].items():
                if isinstance(entry, dict) and isinstance(disk[section].get(sig), dict):
                    disk[section][sig].update(entry)
                else:
                    disk[section][sig] = entry
        self.data = disk
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(disk, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------
# tables

@dataclass
class Tables:
    """Latency tables of a net's layers on one target, and how they were obtained."""

    target: Target
    scheme: str
    tables: dict = field(default_factory=dict)  # name -> LayerTable
    total_ms: float = None  # the whole original net (timing "profile": the sum of its profiled parts)
    wall_ms: float = None  # timing "profile": the lower quartile of the profiled runs' wall times
    seconds: float = 0.0  # wall time spent here (measuring, or reading the cache)
    cpu_seconds: float = 0.0  # CPU time of this process meanwhile (~ the wall time on an idle machine)
    measured: int = 0  # graphs timed now (0 on a full cache hit)
    overhead_ms: float = 0.0  # per-run cost of any graph, subtracted from the table entries
    complete: bool = True  # False: the time budget ran out first (what was measured is cached)
    timing: str = "profile"  # one of TIMINGS
    in_net: dict = field(default_factory=dict)  # name -> the layer's ms inside the profiled net
    cache_path: str = ""
    notes: list = field(default_factory=list)


def run_overhead(cache: Cache, counter: list) -> float:
    """ms one session.run of a graph costs beyond its ops (an Identity on one value), measured once per
    target; subtracted from every table entry, since a layer inside a net does not pay it."""
    ms = cache.get("nets", "__run_overhead__")
    if ms is None:
        model, feeds = overhead_model()
        ms = measure_model(model, feeds, cache_target(cache), external=False)["ms"]
        cache.put("nets", "__run_overhead__", ms)
        counter[0] += 1
    return float(ms)


def _grid_points(axes) -> list:
    """Grid points in measuring order: ascending ranks (row by row for Tucker-2)."""
    if len(axes) == 1:
        return [(r,) for r in axes[0]]
    return [(a, b) for a in axes[0] for b in axes[1]]


def _measure_layer(geo, scheme, info, cache: Cache, counter: list, overhead: float = 0.0) -> LayerTable:
    """The layer's table (what is measured is stored before ``overhead`` is subtracted); its grid is
    :func:`rank_grid` at :func:`grid_points` of the layer left alone.

    Left alone is timed before its chains, and again after them (the faster kept)
    unless its two fastest runs agreed the first time (:data:`latency_graphs.AGREE`):
    noise only adds time, and a left-alone time inflated by a neighbour's burst
    would make every chain look like a saving. Ranks rise along each grid row;
    after two chains in a row no faster than the layer left alone, the larger
    ranks of that row (and, for Tucker-2, the rows after a row whose smallest
    chain was no faster) are not measured: NaN, never offered.
    """
    sig = signature(geo)
    target = cache_target(cache)
    cold = bool(cache.key.get("cold"))
    orig = cache.get("layers", sig, "orig")

    def timed(model_feeds, full=False):
        counter[0] += 1
        res = measure_model(*model_feeds, target, cold=cold)
        return res if full else res["ms"]

    settled = orig is not None  # cached: taken as it is
    if orig is None:
        res = timed(layer_model(geo), full=True)
        orig, settled = res["ms"], bool(res.get("agreed"))
    axes = rank_grid(info, scheme, *grid_points(orig))
    part = f"{scheme}:" + ";".join(",".join(str(r) for r in a) for a in axes)
    stored = cache.get("layers", sig, part)
    if stored is None:
        stored = []
        slow_run, dead_row, row = 0, False, None
        for ranks in _grid_points(axes):
            if len(axes) == 2 and ranks[0] != row:  # a new Tucker-2 row
                dead_row = dead_row or (row is not None and stored[-len(axes[1])] is not None
                                        and stored[-len(axes[1])] >= orig)
                row, slow_run = ranks[0], 0
            if dead_row or slow_run >= 2:
                stored.append(None)
                continue
            ms = timed(layer_model(geo, scheme, ranks))
            stored.append(ms)
            slow_run = slow_run + 1 if ms >= orig else 0
        if not settled:
            orig = min(orig, timed(layer_model(geo)))
        cache.put("layers", sig, stored, part)
    cache.put("layers", sig, orig, "orig")
    ms = np.asarray([np.nan if v is None else v for v in stored], dtype=np.float64)
    ms = ms.reshape(tuple(len(a) for a in axes))
    floor = 1e-4  # ms: a layer never costs nothing
    ms = np.maximum(ms - overhead, floor)  # NaN stays NaN
    orig = max(float(orig) - overhead, floor)
    return LayerTable("", float(orig), scheme, tuple(np.asarray(a, np.int64) for a in axes), ms)


def cache_target(cache: Cache) -> Target:
    k = cache.key
    return Target(k["runtime"], k["threads"], k["batch"])


def _calibrate(out: Tables, prof: dict):
    """Scale each table to its layer's in-net time (:mod:`lrprune_caffe.engines.latency_net`)."""
    out.in_net = in_net_ms(prof)
    missing = []
    for name, table in list(out.tables.items()):
        ms = out.in_net.get(name)
        if ms is None:
            missing.append(name)
            continue
        out.tables[name] = calibrate(table, ms)
    if missing:
        out.notes.append(f"latency tables: {len(missing)} layer(s) not found in the net's profile, left "
                         f"uncalibrated: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def layer_tables(infos: dict, scheme: str, target: Target, net=None, directory=None, progress: bool = False,
                 time_budget_s: float = None, timing: str = "profile") -> Tables:
    """Tables for ``infos`` ({name: factorize.LayerInfo}) under ``scheme``; with ``net``, also its total ms.

    ``timing``: one of :data:`TIMINGS`; "profile" needs ``net`` (without it the
    tables stay hot and uncalibrated, with a note). Stops after the layer that
    exceeds ``time_budget_s`` (``complete`` False); what was measured stays cached.
    """
    if timing not in TIMINGS:
        raise UserError(f"latency timing '{timing}' unknown (choose from {', '.join(TIMINGS)})")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    cache = Cache(target, directory, cold=timing == "cold")
    out = Tables(target, scheme, cache_path=str(cache.path), timing=timing)
    counter = [0]
    saved = 0
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(infos) + (net is not None), desc="latency tables", unit="layer", file=sys.stderr,
                   leave=False, disable=not progress)
    except ImportError:  # pragma: no cover
        bar = None
    try:
        out.overhead_ms = run_overhead(cache, counter)
        if net is not None and timing == "profile":  # one session gives the total and the layers' shares
            prof = net_profile(net, target, cache, counter)
            out.total_ms, out.wall_ms = profile_total(prof), float(prof["wall_ms"])
        elif net is not None:
            out.total_ms = net_ms(net, target, cache=cache, counter=counter)
        if net is not None:
            if bar is not None:
                bar.update(1)
        for name, info in infos.items():
            if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                out.complete = False
                out.notes.append(f"latency tables: the {time_budget_s:.0f} s budget ran out after "
                                 f"{len(out.tables)} of {len(infos)} layers (what was measured is cached)")
                break
            s = info.scheme_for(scheme)
            if not rank_grid(info, s):
                out.notes.append(f"layer {name}: no {s} rank cuts its MACs; not tabled")
            else:
                table = _measure_layer(geometry(info, target.batch), s, info, cache, counter, out.overhead_ms)
                table.name = name
                out.tables[name] = table
            if bar is not None:
                bar.update(1)
            if counter[0] != saved:
                cache.save()
                saved = counter[0]
        if timing == "profile" and out.complete:
            if net is None:
                out.notes.append("latency tables: no net to profile, so the tables are not calibrated")
            else:
                _calibrate(out, prof)
    finally:
        if bar is not None:
            bar.close()
        if counter[0] != saved:
            cache.save()
    out.measured = counter[0]
    out.seconds = time.perf_counter() - t_start
    out.cpu_seconds = time.process_time() - cpu_start
    return out


def net_infos(net, names=None) -> tuple:
    """({name: factorize.LayerInfo} of the factorizable layers among ``names`` (all when None),
    {name: why not} for the others)."""
    from lrprune_caffe.ir.analysis import infer_shapes
    from lrprune_caffe.transforms import Precondition
    from lrprune_caffe.transforms.factorize import FACTORIZABLE, layer_info
    shapes = infer_shapes(net)
    infos, skipped = {}, {}
    for layer in net.layers:
        if layer.type not in FACTORIZABLE or (names is not None and layer.name not in names):
            continue
        ins, outs = shapes.inputs.get(layer.name), shapes.outputs.get(layer.name)
        try:
            infos[layer.name] = layer_info(layer, ins[0] if ins else None, outs[0] if outs else None)
        except Precondition as e:
            skipped[layer.name] = str(e)
    return infos, skipped


# ---------------------------------------------------------------------------
# whole nets

def net_ms(net, target: Target, cache: Cache = None, directory=None, counter: list = None) -> float:
    """ms of the whole net on the target, the lower quartile of ~0.5 s of runs (cached by the net's
    structure and shapes)."""
    cache = cache or Cache(target, directory)
    sig = net_signature(net, target.batch)
    ms = cache.get("nets", sig)
    if ms is None:
        ms = time_runs(net_runner(net, target), budget_s=0.5, clock=cpu_clock(target.threads))
        ms = ms.get("low", ms["ms"])  # the statistic of the tables and the profile
        cache.put("nets", sig, ms)
        if counter is not None:
            counter[0] += 1
        else:
            cache.save()
    return float(ms)


def net_profile(net, target: Target, cache: Cache, counter: list) -> dict:
    """:func:`lrprune_caffe.engines.latency_net.profile_net` of the net, cached like :func:`net_ms`."""
    sig = net_signature(net, target.batch) + ":profile"
    prof = cache.get("nets", sig)
    if prof is None:
        prof = profile_net(net, target)
        cache.put("nets", sig, prof)
        counter[0] += 1
    return prof


__all__ = ["Target", "Cache", "Tables", "RUNTIMES", "geometry", "signature", "rank_grid", "break_even",
           "layer_model", "time_runs", "measure_model", "layer_tables", "net_ms", "net_runner",
           "measured_speedup", "checked_speedup", "cache_dir", "ort_options", "net_infos", "net_profile", "TIMINGS",
           "grid_points"]
