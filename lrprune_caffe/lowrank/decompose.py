"""Low-rank decompositions of Caffe weight blobs (pure numpy / scipy).

Every function takes and returns plain arrays in Caffe's blob layout:
convolution weights ``(N, C/g, kh, kw)``, InnerProduct weights ``(N, K)``.
Grouped convolutions are factorized group by group (group ``j`` owns output
channels ``j*N/g ...`` and input channels ``j*C/g ...``); the factors are
stacked so that the new layers keep ``group: g``. Ranks are *per group*.

SVD back ends (``method``: ``"auto"``/``"gram"``, ``"exact"``, ``"randomized"``): see
:mod:`lrprune_caffe.lowrank.svd_methods`.

Sources of the schemes are cited on each function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .svd_methods import (METHODS, SVD, _energy, left_vectors, low_rank_factors,  # noqa: F401
                  randomized_svd, singular_values, svd)

SCHEMES = ("channel", "spatial", "tucker2")


# ---------------------------------------------------------------------------
# scheme matrices (one group)

def channel_matrix(Wg: np.ndarray) -> np.ndarray:
    """n x (c kh kw): output channels against input patches."""
    return Wg.reshape(Wg.shape[0], -1)


def spatial_matrix(Wg: np.ndarray) -> np.ndarray:
    """(c kh) x (kw n): M[(c, i), (j, o)] = W[o, c, i, j] (Tai et al. 2016, Eq. 4)."""
    n, c, kh, kw = Wg.shape
    return Wg.transpose(1, 2, 3, 0).reshape(c * kh, kw * n)


def mode1_matrix(Wg: np.ndarray) -> np.ndarray:
    """c x (n kh kw): the input-channel unfolding (Tucker mode 1)."""
    return Wg.transpose(1, 0, 2, 3).reshape(Wg.shape[1], -1)


def _groups(W: np.ndarray, group: int):
    n = W.shape[0] // group
    return [W[j * n:(j + 1) * n] for j in range(group)]


@dataclass
class ModeSpectrum:
    """Singular values of one unfolding, per group: ``shape`` is one group's matrix (L, M)."""

    shape: tuple
    s: list  # [np.ndarray] per group, descending, all min(L, M) values
    total_energy: float

    @property
    def energies(self) -> np.ndarray:
        """Energy removed by cutting component i from every group (equal ranks per group)."""
        return np.sum([x.astype(np.float64) ** 2 for x in self.s], axis=0)


def scheme_matrices(W: np.ndarray, scheme: str, group: int = 1):
    """Per mode, per group, the matrices a scheme factorizes: [(name, [M_g...]), ...].

    ``fc`` (InnerProduct, W of shape (N, K)): one mode, the matrix itself.
    ``tucker2``: the output mode (``mode0``, as channel) and the input mode (``mode1``).
    """
    if scheme == "fc":
        return [("fc", [np.asarray(W)])]
    gs = _groups(W, group)
    if scheme == "channel":
        return [("channel", [channel_matrix(g) for g in gs])]
    if scheme == "spatial":
        return [("spatial", [spatial_matrix(g) for g in gs])]
    if scheme == "tucker2":
        # order: input mode (r1) then output mode (r2), as the layers are built
        return [("mode1", [mode1_matrix(g) for g in gs]), ("mode0", [channel_matrix(g) for g in gs])]
    raise ValueError(f"unknown scheme {scheme!r}")


def scheme_spectra(W: np.ndarray, scheme: str, group: int = 1, method: str = "auto",
                   cache: dict = None) -> list:
    """[ModeSpectrum] of a scheme, for rank selection. Results go into ``cache`` so the
    decomposition that follows reuses them (``method`` "randomized" falls back to "gram")."""
    method = "gram" if method == "randomized" else method
    out = []
    side = "left" if scheme == "tucker2" else "auto"
    for mode, mats in scheme_matrices(W, scheme, group):
        svals = []
        total = 0.0
        for j, M in enumerate(mats):
            res = svd(M, method=method, side=side, cache=cache, key=(mode, j, side), vectors=False)
            svals.append(res.s)
            total += res.total_energy
        out.append(ModeSpectrum(tuple(mats[0].shape), svals, total))
    return out


# ---------------------------------------------------------------------------
# schemes

def _cached_svd(M, method, rank, seed, cache, key, side="auto"):
    """The SVD of ``M`` (through ``cache`` under ``key``: rank selection computed it already)."""
    return svd(M, method=method, rank=rank, seed=seed, side=side, cache=cache, key=key)


def channel_decompose(W: np.ndarray, rank: int, group: int = 1, method: str = "auto", seed: int = 0,
                      cache: dict = None):
    """KxK conv C->N  =>  KxK conv C->r (no bias), then 1x1 conv r->N (carries the bias).

    Truncated SVD of W reshaped to N x (C kh kw), per group. Zhang, Zou, He &
    Sun 2015, "Accelerating very deep convolutional networks for classification
    and detection" (TPAMI; the linear, data-free case of their Eq. 2), which is
    Jaderberg, Vedaldi & Zisserman 2014 "Speeding up convolutional neural
    networks with low rank expansions", scheme 2 in its channel form.

    Returns ``(W1, W2, info)``: W1 ``(g r, C/g, kh, kw)``, W2 ``(N, r, 1, 1)``;
    ``info["energy_kept"]`` = sum of kept sigma^2 / sum of all sigma^2.
    """
    W = np.asarray(W)
    n = W.shape[0] // group
    firsts, seconds, kept = [], [], 0.0
    for j, Wg in enumerate(_groups(W, group)):
        M = channel_matrix(Wg)
        res = _cached_svd(M, method, rank, seed, cache, ("channel", j, "auto"))
        A, B = low_rank_factors(M, rank, res)
        firsts.append(B.reshape(rank, *Wg.shape[1:]))
        seconds.append(A.reshape(n, rank, 1, 1))
        kept += float(np.sum(res.s[:rank] ** 2))
    total = _energy(W)
    return (np.concatenate(firsts).astype(np.float32), np.concatenate(seconds).astype(np.float32),
            {"energy_kept": kept / total if total else 1.0})


def spatial_decompose(W: np.ndarray, rank: int, group: int = 1, method: str = "auto", seed: int = 0,
                      cache: dict = None):
    """kh x kw conv C->N  =>  kh x 1 conv C->r (no bias), then 1 x kw conv r->N (bias).

    SVD of W rearranged to (C kh) x (kw N), per group: Jaderberg, Vedaldi &
    Zisserman 2014, scheme 2 (vertical then horizontal filters), solved in
    closed form as in Tai, Xiao, Zhang, Wang & E 2016, "Convolutional neural
    networks with low-rank regularization" (ICLR), Theorem 1. The vertical
    stride / pad / dilation go on the first layer, the horizontal ones on the
    second (the caller builds the layers).

    Returns ``(W1, W2, info)``: W1 ``(g r, C/g, kh, 1)``, W2 ``(N, r, 1, kw)``.
    """
    W = np.asarray(W)
    n, c, kh, kw = W.shape[0] // group, W.shape[1], W.shape[2], W.shape[3]
    firsts, seconds, kept = [], [], 0.0
    for j, Wg in enumerate(_groups(W, group)):
        M = spatial_matrix(Wg)
        res = _cached_svd(M, method, rank, seed, cache, ("spatial", j, "auto"))
        A, B = low_rank_factors(M, rank, res)  # A: (c kh) x r, B: r x (kw n)
        firsts.append(A.T.reshape(rank, c, kh, 1))
        seconds.append(B.reshape(rank, kw, n).transpose(2, 0, 1).reshape(n, rank, 1, kw))
        kept += float(np.sum(res.s[:rank] ** 2))
    total = _energy(W)
    return (np.concatenate(firsts).astype(np.float32), np.concatenate(seconds).astype(np.float32),
            {"energy_kept": kept / total if total else 1.0})


def tucker2_decompose(W: np.ndarray, ranks, group: int = 1, hooi_iters: int = 0, method: str = "auto",
                      seed: int = 0, cache: dict = None):
    """kh x kw conv C->N  =>  1x1 C->r1, kh x kw r1->r2 (the core), 1x1 r2->N (bias).

    Tucker-2 on the output and input modes by HOSVD (De Lathauwer, De Moor &
    Vandewalle 2000, "A multilinear singular value decomposition"), as Kim,
    Park, Yoo, Choi, Yang & Shin 2016 "Compression of deep convolutional neural
    networks for fast and low power mobile applications" (ICLR; arXiv 2015)
    do; ``hooi_iters`` > 0 refines the factors by that many HOOI sweeps (De
    Lathauwer, De Moor & Vandewalle 2000, "On the best rank-1 and rank-(R1, R2,
    ..., RN) approximation of higher-order tensors", Alg. 4.2). Per group.

    ``ranks`` = (r1, r2): input-mode then output-mode rank. Returns
    ``(W1, W2, W3, info)``: W1 ``(g r1, C/g, 1, 1)``, W2 ``(g r2, r1, kh, kw)``,
    W3 ``(N, r2, 1, 1)``; ``info["energy_kept"]`` = ||core||^2 / ||W||^2
    (exact for orthonormal factors: ||W - W^||^2 = ||W||^2 - ||core||^2).
    """
    r1, r2 = (int(ranks), int(ranks)) if np.isscalar(ranks) else (int(ranks[0]), int(ranks[1]))
    W = np.asarray(W)
    n, c = W.shape[0] // group, W.shape[1]
    w1s, w2s, w3s, kept = [], [], [], 0.0
    for j, Wg in enumerate(_groups(W, group)):
        Wd = np.asarray(Wg, dtype=np.float64)
        U_out = left_vectors(channel_matrix(Wd), r2,
                             _cached_svd(channel_matrix(Wg), method, r2, seed, cache, ("mode0", j, "left"), "left"))
        U_in = left_vectors(mode1_matrix(Wd), r1,
                            _cached_svd(mode1_matrix(Wg), method, r1, seed, cache, ("mode1", j, "left"), "left"))
        U_out, U_in = np.asarray(U_out, np.float64), np.asarray(U_in, np.float64)
        for _ in range(int(hooi_iters)):
            Y = np.einsum("ocij,cs->osij", Wd, U_in, optimize=True)  # W x_1 U_in^T
            U_out = left_vectors(Y.reshape(n, -1), r2, svd(Y.reshape(n, -1), side="left"))
            Z = np.einsum("ocij,or->crij", Wd, U_out, optimize=True)  # W x_0 U_out^T
            U_in = left_vectors(Z.reshape(c, -1), r1, svd(Z.reshape(c, -1), side="left"))
        core = np.einsum("ocij,or,cs->rsij", Wd, U_out, U_in, optimize=True)  # (r2, r1, kh, kw)
        w1s.append(U_in.T.reshape(r1, c, 1, 1))
        w2s.append(core)
        w3s.append(U_out.reshape(n, r2, 1, 1))
        kept += float(np.sum(core ** 2))
    total = _energy(W)
    return (np.concatenate(w1s).astype(np.float32), np.concatenate(w2s).astype(np.float32),
            np.concatenate(w3s).astype(np.float32), {"energy_kept": kept / total if total else 1.0})


def fc_decompose(W: np.ndarray, rank: int, method: str = "auto", seed: int = 0, cache: dict = None):
    """InnerProduct K->N (W: N x K)  =>  K->r (no bias), then r->N (bias).

    Truncated SVD of the weight matrix: Denton, Zaremba, Bruna, LeCun & Fergus
    2014, "Exploiting linear structure within convolutional networks for
    efficient evaluation" (NIPS), Sec. 3; Xue, Li & Gong 2013 (SVD
    restructuring of DNN layers). Returns ``(W1 (r, K), W2 (N, r), info)``.
    """
    M = np.asarray(W)
    res = _cached_svd(M, method, rank, seed, cache, ("fc", 0, "auto"))
    A, B = low_rank_factors(M, rank, res)
    total = res.total_energy
    kept = float(np.sum(res.s[:rank] ** 2))
    return B.astype(np.float32), A.astype(np.float32), {"energy_kept": kept / total if total else 1.0}


def reconstruct(scheme: str, factors, group: int = 1) -> np.ndarray:
    """The weight blob the factor blobs compute, in the original layout (float64)."""
    if scheme == "fc":
        W1, W2 = factors
        return np.asarray(W2, np.float64) @ np.asarray(W1, np.float64)
    out = []
    if scheme == "channel":
        W1, W2 = factors
        for A, B in zip(_groups(W2, group), _groups(W1, group)):  # A (n, r,1,1), B (r, c, kh, kw)
            Bm = np.asarray(B, np.float64).reshape(B.shape[0], -1)
            out.append((np.asarray(A, np.float64).reshape(A.shape[0], -1) @ Bm).reshape(A.shape[0], *B.shape[1:]))
    elif scheme == "spatial":
        W1, W2 = factors
        for V, H in zip(_groups(W2, group), _groups(W1, group)):  # V (n, r, 1, kw), H (r, c, kh, 1)
            out.append(np.einsum("orj,rci->ocij", np.asarray(V, np.float64)[:, :, 0, :],
                                 np.asarray(H, np.float64)[:, :, :, 0], optimize=True))
    elif scheme == "tucker2":
        W1, W2, W3 = factors
        for Uo, G, Ui in zip(_groups(W3, group), _groups(W2, group), _groups(W1, group)):
            out.append(np.einsum("or,rsij,sc->ocij", np.asarray(Uo, np.float64)[:, :, 0, 0],
                                 np.asarray(G, np.float64), np.asarray(Ui, np.float64)[:, :, 0, 0],
                                 optimize=True))
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return np.concatenate(out)


def relative_error(W: np.ndarray, W_hat: np.ndarray) -> float:
    """||W - W_hat||_F / ||W||_F, accumulated in float64 block-wise."""
    W = np.asarray(W).reshape(-1)
    Wh = np.asarray(W_hat).reshape(-1)
    num = den = 0.0
    step = 1 << 22
    for i in range(0, W.size, step):
        a = W[i:i + step].astype(np.float64)
        d = a - Wh[i:i + step].astype(np.float64)
        num += float(d @ d)
        den += float(a @ a)
    return float(np.sqrt(num / den)) if den else 0.0


__all__ = ["SCHEMES", "METHODS", "SVD", "ModeSpectrum", "svd", "randomized_svd", "singular_values",
           "low_rank_factors", "left_vectors", "channel_matrix", "spatial_matrix", "mode1_matrix",
           "scheme_matrices", "scheme_spectra", "channel_decompose", "spatial_decompose",
           "tucker2_decompose", "fc_decompose", "reconstruct", "relative_error"]
