"""Rank selection: fixed, energy threshold, VBMF, and a whole-net MAC budget.

All functions work on singular values / energies (squared singular values)
and on a per-layer cost model (MACs as a function of the ranks); none touches
the IR.

Budget criterion (``--speedup``): choose per-layer ranks that minimize the sum
over layers of a per-layer cost of the discarded components, subject to
``total MACs of the selected layers <= MACs before / speedup``. The default
cost (``"log-energy"``) is ``-log(share of the layer's energy kept)``, i.e.
maximize the product over layers of the kept energy shares, Zhang, Zou, He &
Sun 2015 (TPAMI, "Accelerating very deep convolutional networks for
classification and detection", Sec. 3.5, Eq. 14), whose weight-spectrum form
we use (data-free: squared singular values of the weights). ``"energy"`` is
the plain relative discarded energy ``sum of discarded sigma^2 / ||W||^2``
(for the SVD schemes the squared relative weight error, Eckart-Young). For
Tucker-2 the two modes' costs add (the HOSVD bound). On LeNet the log form
keeps 88-96% top-1 at 3x where the plain form falls to 64-70%
(tools/sweep_lenet.py): the plain one spends the whole budget on gutting the
most expensive layer.

Every configuration of a layer (each rank; each (r1, r2) pair for Tucker-2;
and "left alone", at its original MACs and zero cost) is a point (MACs,
cost). We keep each layer's lower convex hull of those points and take hull
segments from all layers in increasing order of cost added per MAC saved
(greedy on the convex hull = the Lagrangian relaxation of this separable
knapsack, Everett 1963; Zhang et al.'s greedy "remove the component that
costs least per MAC saved", made exact where a layer's first cut must jump
from "left alone" to a rank below its break-even). The last segment is
stopped at the first point of the layer's Pareto front that meets the
target, so the budget is not overshot by a whole segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize_scalar


# ---------------------------------------------------------------------------
# single-layer rules

def energy_rank(energies, fraction: float) -> int:
    """Smallest r whose leading r energies (sigma^2, descending) reach ``fraction`` of the total."""
    e = np.asarray(energies, dtype=np.float64)
    total = float(e.sum())
    if total <= 0:
        return 1
    cum = np.cumsum(e) / total
    r = int(np.searchsorted(cum, float(fraction) - 1e-12, side="left")) + 1
    return max(1, min(r, e.size))


def _tau(x, alpha):
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def evbmf_rank(s, L: int, M: int, sigma2: float = None) -> int:
    """Rank chosen by empirical variational Bayesian matrix factorization.

    Global analytic EVB solution of Nakajima, Sugiyama, Babacan & Tomioka
    2013, "Global analytic solution of fully-observed variational Bayesian
    matrix factorization" (JMLR 14), Theorem 2 / Eq. 15-16: a component is
    kept iff its singular value exceeds the EVB threshold
    ``sqrt(M sigma^2 (1 + tau_bar)(1 + alpha / tau_bar))``, ``alpha = L/M``,
    ``tau_bar = 2.5129 sqrt(alpha)``. The noise variance sigma^2, unless given,
    minimizes the EVB free energy over its analytic bounds (Nakajima et al.
    2013 Sec. 5; the same procedure as the VBMF code Kim et al. 2016 used
    for Tucker-2 ranks). ``s``: all singular values of the L x M matrix.
    Exact zeros in ``s`` (an exactly low-rank matrix) mean no noise: every nonzero
    component is kept. A zero matrix has rank 0 (:func:`vbmf_ranks` raises it to 1).
    """
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    L, M = int(L), int(M)
    if L > M:
        L, M = M, L
    H = min(L, s.size)
    s = s[:H]
    if s.size == 0 or s[0] <= 0:
        return 0  # a zero matrix: no component carries signal
    if H <= 1:
        return H
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = 0.0  # all H = L singular values are given
    if sigma2 is None:
        eh_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
        upper = (np.sum(s ** 2) + residual) / (L * M)
        idx = min(max(eh_ub + 1, 0), H - 1)
        lower = max(s[idx] ** 2 / (M * x_bar), np.mean(s[idx:] ** 2) / M)
        # exact zeros in the tail (an exactly low-rank matrix) put the bound at 0: the free
        # energy then falls without end as sigma^2 -> 0, so search down to float precision
        lower = max(lower, upper * np.finfo(np.float64).eps)
        if not upper > lower:
            sigma2 = upper
        else:
            def free_energy(log_sig2):
                # Nakajima et al.'s free energy without its sigma^2-free terms -log(s_h^2 / M),
                # which are -inf for an exact zero s_h: x - log x = x + log sigma^2 + const
                sig2 = math.exp(log_sig2)
                x = s ** 2 / (M * sig2)
                z1 = x[x > x_bar]
                z2 = x[x <= x_bar]
                tz1 = _tau(z1, alpha)
                return (np.sum(z2) + np.sum(z1 - tz1) + np.sum(np.log(tz1 + 1)) + H * log_sig2
                        + alpha * np.sum(np.log(tz1 / alpha + 1)) + residual / (M * sig2)
                        + (L - H) * log_sig2)
            # searched in log sigma^2: weights' noise variances are 1e-8..1e-2, below the
            # absolute tolerance (1e-5) of a search in sigma^2 itself
            res = minimize_scalar(free_energy, bounds=(math.log(lower), math.log(upper)), method="bounded",
                                  options={"xatol": 1e-9})
            sigma2 = math.exp(float(res.x))
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int(np.sum(s > threshold))


def vbmf_ranks(spectra) -> tuple:
    """Per mode, the largest EVBMF rank over the groups (at least 1). ``spectra``:
    [ModeSpectrum] of :func:`lrprune_caffe.lowrank.decompose.scheme_spectra`."""
    out = []
    for mode in spectra:
        L, M = mode.shape
        out.append(max(1, max(evbmf_rank(sg, L, M) for sg in mode.s)))
    return tuple(out)


def energy_ranks(spectra, fraction: float) -> tuple:
    return tuple(energy_rank(mode.energies, fraction) for mode in spectra)


# ---------------------------------------------------------------------------
# whole-net budget

@dataclass
class LayerChoices:
    """One layer's candidate configurations for the budget.

    ``macs``/``err`` are arrays over the configurations, ``ranks`` an (n, d)
    int array; ``macs_before`` is the layer left alone (error 0). A layer that
    cannot be factorized has no configurations.
    """

    name: str
    macs_before: int
    macs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    err: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ranks: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), int))


def tail_errors(energies) -> np.ndarray:
    """Relative discarded energy at ranks 1..k: tail[r-1] = sum_{i>=r} e_i / sum e."""
    e = np.asarray(energies, dtype=np.float64)
    total = float(e.sum())
    if total <= 0:
        return np.zeros(e.size)
    tail = total - np.cumsum(e)
    return np.clip(tail / total, 0.0, None)


def log_kept_costs(energies) -> np.ndarray:
    """-log(share of the energy kept) at ranks 1..k.

    Summed over layers this is minus the log of Zhang, Zou, He & Sun 2015's
    rank-selection objective (TPAMI, "Accelerating very deep convolutional
    networks...", Eq. 14: the product over layers of the kept energies),
    which they maximize greedily under a complexity budget. Unlike the plain
    discarded share it grows without bound as a layer loses all its energy,
    so the budget is not spent by gutting the single most expensive layer.
    """
    tail = tail_errors(energies)
    return -np.log(np.clip(1.0 - tail, 1e-12, None))


CRITERIA = {"log-energy": log_kept_costs, "energy": tail_errors}


def pareto_front(macs, err, macs_before):
    """Indices of the configurations not dominated and cheaper than the original, by MACs ascending."""
    macs = np.asarray(macs, dtype=np.float64)
    err = np.asarray(err, dtype=np.float64)
    keep = np.nonzero(macs < macs_before)[0]
    if keep.size == 0:
        return keep
    order = keep[np.lexsort((err[keep], macs[keep]))]
    best = np.minimum.accumulate(err[order])
    # a point is on the front if its error is strictly below every cheaper point's
    prev = np.concatenate(([np.inf], best[:-1]))
    return order[err[order] < prev]


def lower_hull(x, y):
    """Indices (into x, y sorted by x ascending) of the lower convex hull (Andrew's monotone chain)."""
    hull = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # remove b if it lies on or above the segment a -> i
            if (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a]) <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def budget_allocation(layers: list, target_macs: float, fixed_macs: float = 0.0) -> dict:
    """Choose one configuration per layer so that total MACs <= ``target_macs``.

    ``layers``: [LayerChoices]; ``fixed_macs``: MACs of selected layers that cannot
    change (counted in the total). Returns {name: index into that layer's
    configurations, or None for "left alone"}. Raises ValueError with the best
    reachable total when the target cannot be met.
    """
    total = float(fixed_macs) + sum(float(o.macs_before) for o in layers)
    fronts = {}
    segments = []  # (slope, layer position, step, from point, to point)
    best_total = float(fixed_macs)
    for li, o in enumerate(layers):
        front = pareto_front(o.macs, o.err, o.macs_before)
        fx = np.concatenate((np.asarray(o.macs, np.float64)[front], [float(o.macs_before)]))
        fy = np.concatenate((np.asarray(o.err, np.float64)[front], [0.0]))
        fronts[o.name] = (front, fx, fy)
        best_total += float(fx[0]) if front.size else float(o.macs_before)
        if not front.size:
            continue
        hull = lower_hull(fx, fy)  # ascending MACs; last = left alone
        for step, (a, b) in enumerate(zip(reversed(hull[1:]), reversed(hull[:-1]))):
            saved = fx[a] - fx[b]
            slope = (fy[b] - fy[a]) / saved if saved > 0 else np.inf
            segments.append((slope, li, step, a, b))
    if best_total > target_macs:
        raise ValueError(best_total)
    segments.sort(key=lambda t: (t[0], t[1], t[2]))
    position = {o.name: len(fronts[o.name][1]) - 1 for o in layers}  # index into fx: "left alone"
    for slope, li, step, a, b in segments:
        if total <= target_macs:
            break
        o = layers[li]
        front, fx, fy = fronts[o.name]
        if position[o.name] != a:  # hull order within a layer is guaranteed by the sort
            continue
        new_total = total - (fx[a] - fx[b])
        if new_total <= target_macs:
            # stop early inside the segment: the most expensive front point that meets the target
            need = total - target_macs
            cands = [k for k in range(b, a) if fx[a] - fx[k] >= need]
            k = max(cands) if cands else b
            total -= fx[a] - fx[k]
            position[o.name] = k
            break
        total = new_total
        position[o.name] = b
    out = {}
    for o in layers:
        front, fx, _ = fronts[o.name]
        k = position[o.name]
        out[o.name] = None if k == len(fx) - 1 else int(front[k])
    return out


__all__ = ["energy_rank", "energy_ranks", "evbmf_rank", "vbmf_ranks", "LayerChoices", "tail_errors", "log_kept_costs",
           "CRITERIA",
           "pareto_front", "lower_hull", "budget_allocation"]
