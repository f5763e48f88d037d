"""Ranks for a whole-net MAC budget (``--speedup S``): each layer's candidates, then the allocation.

Pure: a layer is its MACs as it is, its spectra (one energy array per
factor: one for the SVD schemes, two for Tucker-2) and a cost model
``macs(ranks)`` (vectorized over numpy arrays of ranks); nothing here knows
the IR. The allocation itself is :func:`lrprune_caffe.lowrank.rank.budget_allocation`
(greedy on each layer's lower convex hull; see :mod:`lrprune_caffe.lowrank.rank`
for the criterion and its source).

Candidates per layer:

* one factor (channel / spatial / FC): every rank 1..max;
* two factors (Tucker-2): the grid of (r1, r2) pairs, each axis 1..max, or
  1024 evenly spaced ranks when max is above 1024; the cost of a pair is the
  sum of the two modes' costs (the HOSVD bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import rank as rk

#: what each criterion (``rk.CRITERIA``) minimizes, in words for the report
CRITERION_TEXT = {
    "log-energy": "least -log(share of energy kept) per MAC saved, summed over layers (Zhang et al. 2015, "
                  "Eq. 14: maximize the product of the layers' kept energies), greedy on each layer's "
                  "lower convex hull",
    "energy": "least relative discarded energy (sum of discarded sigma^2 / ||W||^2) per MAC saved, greedy "
              "on each layer's lower convex hull",
}


@dataclass
class BudgetLayer:
    """One layer as the budget sees it."""

    name: str
    macs: int  # the layer as it is (left alone)
    energies: tuple  # per factor: the energies (squared singular values), descending
    max_ranks: tuple  # per factor: the largest rank
    cost: Callable  # (tuple of rank arrays) -> MACs array of the factorized layer


@dataclass
class Allocation:
    """{name: ranks tuple, or None when left alone}, the target, and per layer the least MACs
    any candidate reaches (``min_macs``: above the layer's own, no rank cuts its MACs)."""

    ranks: dict
    macs_before: int
    target_macs: float
    min_macs: dict


class Unreachable(ValueError):
    """The target cannot be met even at rank 1 everywhere; ``best_macs`` is the least reachable."""

    def __init__(self, best_macs: float):
        super().__init__(best_macs)
        self.best_macs = float(best_macs)


def rank_grid(max_rank: int, cap: int = 1024) -> np.ndarray:
    """Ranks 1..max_rank, or ``cap`` of them evenly spaced (rounded, unique) above ``cap``."""
    if max_rank <= cap:
        return np.arange(1, max_rank + 1)
    return np.unique(np.linspace(1, max_rank, cap).round().astype(np.int64))


def layer_choices(layer: BudgetLayer, criterion: str) -> rk.LayerChoices:
    """Every candidate configuration of ``layer``: MACs, cost under ``criterion``, ranks."""
    cost_fn = rk.CRITERIA[criterion]
    if len(layer.max_ranks) == 2:
        g1, g2 = rank_grid(layer.max_ranks[0]), rank_grid(layer.max_ranks[1])
        t1, t2 = cost_fn(layer.energies[0]), cost_fn(layer.energies[1])
        R1, R2 = np.meshgrid(g1, g2, indexing="ij")
        R1, R2 = R1.ravel(), R2.ravel()
        err = t1[R1 - 1] + t2[R2 - 1]
        macs = layer.cost((R1, R2))
        ranks = np.stack([R1, R2], axis=1)
    else:
        r = np.arange(1, layer.max_ranks[0] + 1)
        err = cost_fn(layer.energies[0])[:r.size]
        macs = layer.cost((r,))
        ranks = r[:, None]
    return rk.LayerChoices(layer.name, layer.macs, np.asarray(macs, np.float64), err, ranks)


def allocate(layers: list, speedup: float, criterion: str, macs_before: int, fixed_macs: int = 0) -> Allocation:
    """Ranks for ``layers`` ([BudgetLayer]) so that the selected layers' MACs fall to
    ``macs_before / speedup``; ``fixed_macs``: selected layers that cannot change (counted
    in ``macs_before``). Raises :class:`Unreachable` when even rank 1 everywhere is not enough."""
    choices = [layer_choices(layer, criterion) for layer in layers]
    target = macs_before / float(speedup)
    try:
        pick = rk.budget_allocation(choices, target, fixed_macs)
    except ValueError as e:
        raise Unreachable(float(e.args[0])) from None
    ranks = {}
    for c in choices:
        k = pick[c.name]
        ranks[c.name] = None if k is None else tuple(int(x) for x in c.ranks[k])
    return Allocation(ranks, int(macs_before), target, {c.name: float(c.macs.min()) for c in choices})


__all__ = ["BudgetLayer", "Allocation", "Unreachable", "rank_grid", "layer_choices", "allocate",
           "CRITERION_TEXT"]
