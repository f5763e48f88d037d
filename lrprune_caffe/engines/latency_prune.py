"""Latency table entries for structured pruning: a layer keeping ``k`` of its ``n`` outputs, and the
consumers that shrink with it, timed on the target runtime next to the layer's factorized chains.

For each layer :mod:`lrprune_caffe.transforms.structured_prune` could shrink (its outputs reach only
layers that can drop input channels: convolutions, InnerProducts, through BatchNorm / Scale / ReLU /
pooling / Flatten), we time the layer itself with ``k`` outputs and each weighted consumer with ``k``
input channels (``k * H * W`` inputs for an InnerProduct reading a flattened blob), ``k`` at
:data:`PRUNE_SHARES` of ``n`` (multiples of 8 above 16). Timed within what is left of the tables'
time budget (``--table-time``); layers after it ran out get no pruning option (a note says so).
Each graph is a left-alone layer of another geometry, so it is cached like any table's left-alone
entry (by its geometry's signature: a second run measures nothing) and the per-run overhead is
subtracted the same way.

The option's in-net ms is what the layer left alone costs in the net minus what keeping ``k`` saves::

    ms(k) = in_net(L) - f_L * (T_L(n) - T_L(k)) - sum over consumers C of f_C * (T_C(n) - T_C(k))

with ``T`` the hot times alone and ``f`` each layer's in-net / alone calibration (the consumer's own
when it is tabled, else the layer's): the consumers' saving is booked on the layer that causes it.
Linear between the measured ``k`` (and ``k = n``, no saving); ``k`` below the smallest share is not
offered. Separable like the rest of the budget: a consumer that is itself cut is timed as if it were
not (the profiled refinement corrects the total).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lrprune_caffe.errors import EngineError

#: shares of a layer's outputs kept by the timed structured-pruning options. One share: latency is close
#: to linear in the channel count, and every share costs a graph per layer and per consumer (on VGG-16 at
#: 224, two shares took 28.5 s wall / 9.1 s CPU at load 12, next to the tables' 60 s budget)
PRUNE_SHARES = (0.5,)


@dataclass
class PruneTable:
    """A layer's structured-pruning options: keep ``ks[i]`` outputs at in-net ``ms[i]``; filter energies."""

    name: str
    n: int
    ks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    energies: np.ndarray = field(default_factory=lambda: np.zeros(0))  # ||W_i||^2, descending
    consumers: tuple = ()

    def options(self):
        """(keep counts (every k from the smallest measured to n - 1), their interpolated in-net ms)."""
        if self.ks.size == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        k = np.arange(int(self.ks.min()), self.n)
        return k, np.interp(k, self.ks.astype(np.float64), self.ms)


def keep_points(n: int, shares=None) -> list:
    """The outputs kept by the timed options of an ``n``-output layer (``shares`` None: :data:`PRUNE_SHARES`)."""
    out = set()
    for s in (PRUNE_SHARES if shares is None else shares):
        k = int(round(n * s))
        if k > 16:
            k = max(8, int(round(k / 8.0)) * 8)
        if 1 <= k < n:
            out.add(k)
    return sorted(out)


def filter_energies(layer, out_axis: int) -> np.ndarray:
    w = np.moveaxis(np.asarray(layer.blobs[0], dtype=np.float64), out_axis, 0)
    return np.sort((w.reshape(w.shape[0], -1) ** 2).sum(axis=1))[::-1]


def _geo(layer, shapes, batch):
    from lrprune_caffe.transforms.factorize import layer_info
    from .latency_graphs import geometry
    return geometry(layer_info(layer, shapes.inputs[layer.name][0], shapes.outputs[layer.name][0]), batch)


def prune_tables(net, names, tables, target, deadline=None) -> tuple:
    """({name: PruneTable}, notes) for the layers ``names`` of ``net``; ``tables``: the layers'
    calibrated :class:`lrprune_caffe.lowrank.latency_budget.LayerTable` (for in-net ms and
    calibration factors). Stops (with a note) once ``time.perf_counter()`` passes ``deadline``."""
    import time

    from lrprune_caffe.ir.analysis import infer_shapes
    from lrprune_caffe.ir.layers import CannotShrink
    from lrprune_caffe.transforms import Precondition
    from lrprune_caffe.transforms.structured_prune import _plan
    from . import latency as L
    from .latency_graphs import layer_model, measure_model, signature

    shapes = infer_shapes(net)
    cache, counter = L.Cache(target), [0]
    overhead = L.run_overhead(cache, counter)
    out, notes, skipped = {}, [], {}

    def timed(geo):
        sig = signature(geo)
        ms = cache.get("layers", sig, "orig")
        if ms is None:
            ms = measure_model(*layer_model(geo), target)["ms"]
            cache.put("layers", sig, ms, "orig")
            counter[0] += 1
        return max(float(ms) - overhead, 1e-4)

    try:
        for name in names:
            table = tables.get(name)
            if table is None:
                continue
            if deadline is not None and time.perf_counter() > deadline:
                notes.append(f"latency tables: structured-pruning options not timed for {name} and after "
                             f"(the time budget ran out)")
                break
            i = net.index(name)
            layer = net.layers[i]
            try:
                plan = _plan(net, i, shapes)
            except (CannotShrink, Precondition) as e:
                skipped[name] = str(e)
                continue
            if plan["pair"] is not None:  # scored as a rank component, not by its filter energy
                continue
            consumers = [(c, block) for c, j, _axis, block in plan["edits"]
                         if j == 0 and c.type in ("Convolution", "InnerProduct")]
            try:
                geo_l = _geo(layer, shapes, target.batch)
                geo_c = [(c, _geo(c, shapes, target.batch), block) for c, block in consumers]
            except (Precondition, KeyError, TypeError, ValueError) as e:
                skipped[name] = f"its geometry could not be tabled ({e})"
                continue
            n = int(plan["n_out"])
            ks = keep_points(n)
            if not ks:
                continue
            base_l = timed(geo_l)
            f_l = float(table.scale)
            ms = []
            for k in ks:
                saving = f_l * (base_l - timed({**geo_l, "n": k}))
                for c, geo, block in geo_c:
                    f_c = float(tables[c.name].scale) if c.name in tables else f_l
                    key = "k" if geo["kind"] == "fc" else "c"
                    smaller = {**geo, key: k * (block if geo["kind"] == "fc" else 1)}
                    saving += f_c * (timed(geo) - timed(smaller))
                ms.append(float(table.left_alone_ms) - saving)
            out[name] = PruneTable(name, n, np.asarray(ks + [n], np.int64), np.asarray(ms + [table.left_alone_ms]),
                                   filter_energies(layer, plan["out_axis"]), tuple(c.name for c, _ in consumers))
    except EngineError as e:
        notes.append(f"latency tables: structured-pruning options not timed ({e})")
    finally:
        if counter[0]:
            cache.save()
    return out, notes


__all__ = ["PRUNE_SHARES", "PruneTable", "keep_points", "filter_energies", "prune_tables"]
