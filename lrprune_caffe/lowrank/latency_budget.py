"""Rank allocation under a measured-latency budget (``--speedup S`` in milliseconds).

Criterion: choose one configuration per factorizable layer (a rank, an
(r_in, r_out) pair for Tucker-2, or "left alone") minimizing the summed
per-layer error (any of :data:`lrprune_caffe.lowrank.rank.CRITERIA`, or a
data-aware error) subject to::

    fixed_ms + sum over layers of ms(configuration) <= total_ms / S

where ``total_ms`` is the whole original net measured on the target runtime,
each layer's ``ms`` comes from a per-layer latency table measured on the same
runtime with the layer's real input shape, and ``fixed_ms = total_ms - sum of
the tabled layers left alone`` is the part of the net no choice changes
(pooling, activations, concat, the layers that are not factorized). This is
NetAdapt's idea (Yang, Howard, Chen, Zhang, Go, Sandler, Sze & Adam 2018,
ECCV, "NetAdapt: platform-aware neural network adaptation for mobile
applications", Sec. 3.2-3.3: empirical per-layer latency look-up tables, a
budget in measured latency, not in MACs); the search is
:func:`lrprune_caffe.lowrank.rank.budget_allocation` (greedy on each layer's
lower convex hull, the Lagrangian relaxation of the separable knapsack) with
milliseconds in place of MACs.

Tables are measured on a coarse grid of ranks and interpolated linearly in
between (in both ranks for Tucker-2): on CPU runtimes latency is close to
piecewise linear in the rank. A configuration outside the measured grid has
no latency and is not offered; one predicted no faster than leaving the
layer alone is never bought (it is dropped before the search, and counted).

Pure: numpy only, knows nothing of the IR or of any runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import rank as rk


# ---------------------------------------------------------------------------
# a measured table and its interpolation

@dataclass
class LayerTable:
    """Measured latency of one layer: left alone, and factorized on a rank grid.

    ``axes``: one ascending int array per rank dimension (one for channel /
    spatial / fc, two for Tucker-2: r_in, r_out); ``ms``: an array of shape
    ``tuple(len(a) for a in axes)`` (NaN where not measured).
    """

    name: str
    left_alone_ms: float
    scheme: str = ""
    axes: tuple = ()
    ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: float = 1.0  # the factor :func:`calibrate` applied (in-net / alone)

    def predict(self, ranks) -> np.ndarray:
        """Interpolated ms at ``ranks`` ((n, d) ints, d = len(axes)); NaN outside the grid."""
        ranks = np.atleast_2d(np.asarray(ranks, dtype=np.float64))
        if not self.axes or np.asarray(self.ms).size == 0:
            return np.full(ranks.shape[0], np.nan)
        ms = np.asarray(self.ms, dtype=np.float64)
        if len(self.axes) == 1:
            return interp_1d(self.axes[0], ms, ranks[:, 0])
        if len(self.axes) == 2:
            return interp_2d(self.axes[0], self.axes[1], ms, ranks[:, 0], ranks[:, 1])
        raise ValueError(f"tables have 1 or 2 rank dimensions, not {len(self.axes)}")


def interp_1d(grid, values, x) -> np.ndarray:
    """Piecewise-linear interpolation on an ascending ``grid``; NaN outside it (or next to a NaN)."""
    grid = np.asarray(grid, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    out = np.full(x.shape, np.nan)
    if grid.size == 0:
        return out
    if grid.size == 1:
        out[x == grid[0]] = values[0]
        return out
    inside = (x >= grid[0]) & (x <= grid[-1])
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)
    t = (x - grid[i]) / (grid[i + 1] - grid[i])
    val = values[i] * (1 - t) + values[i + 1] * t
    exact = np.isclose(t, 0.0)
    val = np.where(exact, values[i], np.where(np.isclose(t, 1.0), values[i + 1], val))
    out[inside] = val[inside]
    return out


def interp_2d(g1, g2, values, x1, x2) -> np.ndarray:
    """Bilinear interpolation on the grid ``g1 x g2`` (``values`` shape (len(g1), len(g2)))."""
    g1, g2 = np.asarray(g1, np.float64), np.asarray(g2, np.float64)
    values = np.asarray(values, np.float64)
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    out = np.full(x1.shape, np.nan)
    if g1.size < 2 or g2.size < 2:  # degenerate axis: interpolate along the other one
        if g1.size == 1 and g2.size >= 1:
            row = interp_1d(g2, values[0], x2)
            return np.where(x1 == g1[0], row, np.nan)
        if g2.size == 1 and g1.size >= 1:
            col = interp_1d(g1, values[:, 0], x1)
            return np.where(x2 == g2[0], col, np.nan)
        return out
    inside = (x1 >= g1[0]) & (x1 <= g1[-1]) & (x2 >= g2[0]) & (x2 <= g2[-1])
    i = np.clip(np.searchsorted(g1, x1, side="right") - 1, 0, g1.size - 2)
    j = np.clip(np.searchsorted(g2, x2, side="right") - 1, 0, g2.size - 2)
    t = np.clip((x1 - g1[i]) / (g1[i + 1] - g1[i]), 0, 1)
    u = np.clip((x2 - g2[j]) / (g2[j + 1] - g2[j]), 0, 1)
    v00, v10, v01, v11 = values[i, j], values[i + 1, j], values[i, j + 1], values[i + 1, j + 1]
    # a corner that was not measured only matters where its weight is not zero
    w = [(1 - t) * (1 - u), t * (1 - u), (1 - t) * u, t * u]
    val = np.zeros(x1.shape)
    bad = np.zeros(x1.shape, bool)
    for wk, vk in zip(w, (v00, v10, v01, v11)):
        used = wk > 1e-12
        bad |= used & ~np.isfinite(vk)
        val += np.where(used, wk * np.nan_to_num(vk), 0.0)
    ok = inside & ~bad
    out[ok] = val[ok]
    return out


def calibrate(table: LayerTable, in_net_ms: float, limits=(0.25, 4.0)) -> LayerTable:
    """The table scaled to the layer's time inside the net: every entry times ``in_net_ms / left_alone_ms``.

    A layer timed alone in a loop keeps its weights cached and pays no layout changes or fusions; the
    whole net, profiled once, says what the layer left alone really costs there
    (:mod:`lrprune_caffe.engines.latency_profile`). Its chains are assumed to run in the net at the same
    ratio (the same input and output tensors, the same cache pressure from the neighbours). The factor
    is clipped to ``limits``: beyond them the profile and the table disagree about what was timed.
    """
    alone = float(table.left_alone_ms)
    if not (alone > 0 and np.isfinite(in_net_ms) and in_net_ms > 0):
        return table
    f = float(np.clip(float(in_net_ms) / alone, *limits))
    return LayerTable(table.name, alone * f, table.scheme, table.axes, np.asarray(table.ms, np.float64) * f,
                      table.scale * f)


def correct_chains(table: LayerTable, factor: float, limits=(0.5, 2.0)) -> LayerTable:
    """The table with its factorized entries times ``factor`` (clipped to ``limits``), left alone unchanged:
    the chains first chosen, profiled inside the factorized net, ran ``factor`` times as long as the
    calibrated tables predicted (a chain's two ops and its intermediate tensor need not cost in the net
    what the layer's in-net / alone ratio says)."""
    f = float(np.clip(float(factor), *limits)) if np.isfinite(factor) and factor > 0 else 1.0
    return LayerTable(table.name, table.left_alone_ms, table.scheme, table.axes,
                      np.asarray(table.ms, np.float64) * f, table.scale)


def correct_savings(table: LayerTable, factor: float, limits=(0.25, 2.0)) -> LayerTable:
    """The table with what each factorized entry saves against the layer left alone times ``factor``
    (clipped to ``limits``): ``left - factor * (left - ms)``. The net factorized as first chosen,
    measured against the original, saved ``factor`` times what the tables predicted (a chain's two ops
    and its intermediate tensor need not cost in the net what the layer's in-net / alone ratio says).
    On savings rather than ms, so it applies alike to a structured-pruning option, whose ms books the
    consumers' saving and may be negative."""
    f = float(np.clip(float(factor), *limits)) if np.isfinite(factor) and factor > 0 else 1.0
    left = float(table.left_alone_ms)
    return LayerTable(table.name, table.left_alone_ms, table.scheme, table.axes,
                      left - f * (left - np.asarray(table.ms, np.float64)), table.scale)


# ---------------------------------------------------------------------------
# options and allocation

def latency_options(table: LayerTable, ranks, err):
    """(:class:`rank.LayerChoices` in milliseconds, number dropped as no faster than left alone,
    number dropped as outside the measured grid) for one layer.

    ``ranks``: (n, d) candidate ranks; ``err``: their errors (n,).
    """
    ranks = np.atleast_2d(np.asarray(ranks, dtype=np.int64))
    err = np.asarray(err, dtype=np.float64)
    if ranks.shape[0] != err.shape[0]:
        raise ValueError(f"{table.name}: {ranks.shape[0]} ranks but {err.shape[0]} errors")
    ms = table.predict(ranks)
    known = np.isfinite(ms)
    faster = known & (ms < float(table.left_alone_ms))
    opts = rk.LayerChoices(table.name, float(table.left_alone_ms), ms[faster], err[faster], ranks[faster])
    return opts, int(np.sum(known & ~faster)), int(np.sum(~known))


def rank_candidates(spectra, table: LayerTable, criterion: str = "log-energy", points_2d: int = 64):
    """(ranks (n, d), errors (n,)) of every rank the table covers, errors from the weight spectra.

    ``spectra``: per rank dimension, a :class:`lrprune_caffe.lowrank.decompose.ModeSpectrum`
    of the layer's scheme or its energies array (for Tucker-2: input mode, then output mode; their
    costs add, as in the MAC budget). The energies are the ones the MAC budget spends by
    (:func:`lrprune_caffe.core.ranks.budget_energies`: the weights' squared singular values, or
    the response eigenvalues on calibration data), so an error means the same under either cost.
    One rank dimension: every rank 1..the grid's largest; two: ``points_2d`` values per dimension.
    """
    cost = rk.CRITERIA[criterion]
    energies = [np.asarray(getattr(m, "energies", m), dtype=np.float64) for m in spectra]
    if len(table.axes) == 1:
        r = np.arange(1, min(int(table.axes[0][-1]), energies[0].size) + 1)
        return r[:, None], cost(energies[0])[r - 1]
    top1, top2 = int(table.axes[0][-1]), int(table.axes[1][-1])
    g1 = np.unique(np.linspace(1, top1, min(top1, points_2d)).round().astype(np.int64))
    g2 = np.unique(np.linspace(1, top2, min(top2, points_2d)).round().astype(np.int64))
    R1, R2 = (x.ravel() for x in np.meshgrid(g1, g2, indexing="ij"))
    err = cost(energies[0])[R1 - 1] + cost(energies[1])[R2 - 1]
    return np.stack([R1, R2], axis=1), err


@dataclass
class Allocation:
    """What :func:`allocate` chose and what it predicts."""

    choice: dict  # name -> tuple of ranks, or None (left alone)
    total_ms: float  # the whole original net, measured
    fixed_ms: float  # the part no choice changes
    tabled_ms: float  # sum of the tabled layers left alone
    target_ms: float  # total_ms / speedup
    predicted_ms: float  # fixed_ms + sum of the chosen layers' ms
    speedup: float
    dropped_slower: dict = field(default_factory=dict)  # name -> configurations no faster than left alone

    @property
    def predicted_speedup(self) -> float:
        return self.total_ms / self.predicted_ms if self.predicted_ms > 0 else float("inf")


class Unreachable(ValueError):
    """The target cannot be met even at the fastest configuration of every layer."""

    def __init__(self, best_ms: float, target_ms: float, total_ms: float):
        super().__init__(best_ms)
        self.best_ms, self.target_ms, self.total_ms = best_ms, target_ms, total_ms

    @property
    def best_speedup(self) -> float:
        return self.total_ms / self.best_ms if self.best_ms > 0 else float("inf")


def fixed_part(total_ms: float, left_alone_ms) -> float:
    """``total_ms`` minus the tabled layers left alone, at least 0 (layers timed one by one can add up
    to more than the net, whose runtime fuses and overlaps them)."""
    return max(0.0, float(total_ms) - float(np.sum(np.asarray(list(left_alone_ms), dtype=np.float64))))


def allocate(options: list, total_ms: float, speedup: float, fixed_ms: float = None,
             dropped_slower: dict = None) -> Allocation:
    """Choose per-layer configurations so that ``fixed_ms + sum(layer ms) <= total_ms / speedup``.

    ``options``: [:class:`rank.LayerChoices`] in milliseconds (``macs_before`` = the
    layer left alone), e.g. from :func:`latency_options`; ``fixed_ms``
    defaults to :func:`fixed_part`. Raises :class:`Unreachable` when even the
    fastest configurations miss the target.
    """
    if not float(speedup) > 1:
        raise ValueError(f"speedup {speedup} must be above 1")
    tabled = float(sum(float(o.macs_before) for o in options))
    if fixed_ms is None:
        fixed_ms = fixed_part(total_ms, [o.macs_before for o in options])
    target = float(total_ms) / float(speedup)
    try:
        picked = rk.budget_allocation(options, target, fixed_ms)
    except ValueError as e:
        raise Unreachable(float(e.args[0]), target, float(total_ms)) from None
    choice, predicted = {}, float(fixed_ms)
    for o in options:
        k = picked[o.name]
        if k is None:
            choice[o.name] = None
            predicted += float(o.macs_before)
        else:
            choice[o.name] = tuple(int(x) for x in np.atleast_1d(o.ranks[k]))
            predicted += float(o.macs[k])
    return Allocation(choice, float(total_ms), float(fixed_ms), tabled, target, predicted, float(speedup),
                      dict(dropped_slower or {}))


__all__ = ["LayerTable", "calibrate", "correct_chains", "correct_savings", "interp_1d", "interp_2d", "latency_options",
           "rank_candidates", "Allocation", "Unreachable", "fixed_part", "allocate"]
