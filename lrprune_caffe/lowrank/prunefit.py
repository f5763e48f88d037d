"""Data-aware pruning: re-solve the kept weights, and SparseGPT / OBS saliency (pure numpy / scipy).

Notation as in :mod:`.datafit`: a layer ``y = W x + b`` with W ``(N, K)`` (a
conv's weights flattened per output row, one group), calibration moments
:class:`~.datafit.Moments` of (inputs x, target outputs y). A mask is a bool
array shaped like W, ``True`` = keep. The bias is never pruned; it is refit
exactly (centering), so every objective is ``||Y - W X - c||^2`` with the best
c, i.e. the centered Hessian ``Hc = sum (x - xbar)(x - xbar)^T``, damped by
``lambda = d * mean(diag(sum x x^T))`` as in :mod:`.datafit`.

* :func:`masked_fit` - for a fixed mask, each output row's kept weights solve
  its own least-squares problem ``w_S = (Hc_SS + lambda I)^{-1} (g_S + lambda
  prior_S)`` (the rows are independent: the objective is a sum over rows).
  This is the exact optimum that OBS-style updates approximate (Hassibi &
  Stork 1993; Frantar, Singh & Alistarh 2022, "Optimal Brain Compression",
  NeurIPS, Sec. 3 "ExactOBS" solves the same per-row problems).
* :func:`obs_remove_one` - the Optimal Brain Surgeon step (Hassibi & Stork
  1993, "Second order derivatives for network pruning: Optimal Brain
  Surgeon", NIPS, Eq. 4-5) on one row: remove the weight q of least saliency
  ``w_q^2 / [H^-1]_qq`` and update the rest by ``-w_q / [H^-1]_qq H^-1 e_q``.
* :func:`sparsegpt` - Frantar & Alistarh 2023, "SparseGPT: Massive language
  models can be accurately pruned in one-shot" (ICML), Alg. 1: columns in
  order, the OBS update restricted to the not yet processed columns through
  the upper Cholesky factor U of ``H^-1`` (``[H_F^-1]`` of the remaining set
  is a trailing block of ``U^T U``), the mask chosen per block of
  ``blocksize`` columns as the ``sparsity`` share of smallest ``w^2 / U_jj^2``
  ("adaptive mask selection", Sec. 3.3). Starts from the damped dense
  least-squares fit of the target, the point where the quadratic objective's
  gradient vanishes (OBS assumes it).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla

from .datafit import DEFAULT_DAMPING, Moments, damping_of, ridge_fit
from .svd_methods import _one_blas_thread


def _hessian(m: Moments, damping: float, intercept: bool = True):
    Hc, Gc, _, _ = m.second(intercept)
    lam = damping_of(m.xx, damping)
    H = Hc.copy()
    H[np.diag_indices_from(H)] += lam
    return H, Gc, lam


def _bias(m: Moments, W, intercept: bool = True):
    if not intercept:
        return np.zeros(np.asarray(W).shape[0])
    return m.ybar - np.asarray(W, np.float64) @ m.xbar


def masked_fit(m: Moments, mask: np.ndarray, damping: float = DEFAULT_DAMPING, prior=None, intercept: bool = True):
    """Per output row, the kept weights that best reproduce the target (see the module docstring).

    ``mask`` ``(N, K)`` bool, ``True`` = keep; ``prior`` ``(N, K)`` pulls the kept
    weights toward it (default 0: ridge). Rows with the same kept set share one
    Cholesky factorization. Returns ``(W (N, K) with zeros off the mask, c (N,))``;
    ``intercept=False`` (a layer without bias): c = 0, uncentered moments.
    """
    mask = np.asarray(mask, dtype=bool)
    H, G, lam = _hessian(m, damping, intercept)
    N, K = G.shape
    if mask.shape != (N, K):
        raise ValueError(f"mask {mask.shape} does not match the layer's {N} x {K} weights")
    if prior is not None and lam:
        G = G + lam * np.asarray(prior, np.float64)
    W = np.zeros((N, K))
    keys = np.packbits(mask, axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    with _one_blas_thread():  # many small solves: one BLAS thread is faster, and does not stall on busy cores
        _solve_rows(H, G, W, mask, first, inverse)
    return W, _bias(m, W, intercept)


def _solve_rows(H, G, W, mask, first, inverse):
    for u, i0 in enumerate(first):
        rows = np.nonzero(inverse == u)[0]
        S = np.nonzero(mask[i0])[0]
        if S.size == 0:
            continue
        HS = H[np.ix_(S, S)]
        try:
            sol = sla.cho_solve(sla.cho_factor(HS, check_finite=False), G[np.ix_(rows, S)].T, check_finite=False)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(HS, G[np.ix_(rows, S)].T, rcond=None)[0]
        W[np.ix_(rows, S)] = sol.T


def obs_remove_one(w: np.ndarray, H: np.ndarray, alive=None):
    """One OBS step on a row at its optimum: ``(q, new w, increase of the objective)``.

    ``H``: the Hessian of the row's objective ``(w - w*)^T H (w - w*)`` (here the
    damped centered Gram matrix of the inputs), ``w`` = w* on the weights still
    ``alive`` (bool, default all; dead ones are zero and stay so). Removes the
    alive weight of least saliency ``w_q^2 / [H_F^-1]_qq`` (F = the alive set) and
    moves the others by ``-w_q / [H_F^-1]_qq [H_F^-1]_{:, q}``; the objective grows
    by exactly that saliency.
    """
    w = np.asarray(w, np.float64)
    alive = np.ones(w.size, bool) if alive is None else np.asarray(alive, bool)
    idx = np.nonzero(alive)[0]
    Hi = np.linalg.inv(np.asarray(H, np.float64)[np.ix_(idx, idx)])
    d = np.diag(Hi)
    sal = w[idx] ** 2 / d
    k = int(np.argmin(sal))
    new = w.copy()
    new[idx] -= w[idx][k] / d[k] * Hi[:, k]
    new[idx[k]] = 0.0
    return int(idx[k]), new, float(sal[k])


def _k_smallest(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool array, True at the k smallest scores (ties by position)."""
    flat = scores.reshape(-1)
    out = np.zeros(flat.size, bool)
    if k > 0:
        order = np.argsort(flat, kind="stable")
        out[order[:k]] = True
    return out.reshape(scores.shape)


def sparsegpt(m: Moments, sparsity: float = None, mask=None, damping: float = DEFAULT_DAMPING,
              blocksize: int = 128, start=None, intercept: bool = True):
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1) on one layer; see the module docstring.

    Either ``sparsity`` (share of weights to zero, chosen per column block by
    ``w^2 / U_jj^2``) or a fixed ``mask`` (``True`` = keep; then only the
    compensating updates run). ``start``: the weights to prune (default: the
    damped dense least-squares fit of the target). Returns
    ``(W (N, K), c (N,), mask)``.
    """
    if (sparsity is None) == (mask is None):
        raise ValueError("give either sparsity or mask")
    H, _, _ = _hessian(m, damping, intercept)
    K = H.shape[0]
    W = (ridge_fit(m, damping, intercept=intercept)[0] if start is None else np.asarray(start, np.float64)).copy()
    N = W.shape[0]
    Hinv = sla.cho_solve(sla.cho_factor(H, check_finite=False), np.eye(K), check_finite=False)
    U = sla.cholesky(0.5 * (Hinv + Hinv.T), lower=False, check_finite=False)  # H^-1 = U^T U
    prune = np.zeros((N, K), bool)
    if mask is not None:
        prune = ~np.asarray(mask, bool)
    for i1 in range(0, K, int(blocksize)):
        i2 = min(i1 + int(blocksize), K)
        W1 = W[:, i1:i2].copy()
        U1 = U[i1:i2, i1:i2]
        if mask is None:  # the block's share of round(sparsity * N K), so the total is exact
            score = W1 ** 2 / np.diag(U1)[None, :] ** 2
            k = int(round(float(sparsity) * N * i2)) - int(round(float(sparsity) * N * i1))
            prune[:, i1:i2] = _k_smallest(score, k)
        E = np.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = np.where(prune[:, i1 + i], 0.0, w)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            W1[:, i] = q
            E[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E @ U[i1:i2, i2:]
    W[prune] = 0.0
    return W, _bias(m, W, intercept), ~prune


__all__ = ["masked_fit", "obs_remove_one", "sparsegpt"]
