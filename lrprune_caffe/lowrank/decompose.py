"""Low-rank decompositions of Caffe weight blobs (pure numpy / scipy).

Every function takes and returns plain arrays in Caffe's blob layout:
convolution weights ``(N, C/g, kh, kw)``, InnerProduct weights ``(N, K)``.
Grouped convolutions are factorized group by group (group ``j`` owns output
channels ``j*N/g ...`` and input channels ``j*C/g ...``); the factors are
stacked so that the new layers keep ``group: g``. Ranks are *per group*.

SVD back ends (``method``):

* ``"gram"`` (the default, ``"auto"``): eigendecomposition of the smaller Gram
  matrix ``M M^T`` (or ``M^T M``), then the other factor by one product with M.
  It costs ``m^2 n + m^3`` for ``m <= n`` instead of the ``m n min(m,n)`` of
  a full SVD with a large constant: fc6 of VGG-16 (4096 x 25088) takes
  seconds, not minutes. In float64 (accumulated block-wise, never a float64
  copy of a large M) while the small side is <= 2048, in float32 beyond that
  (singular values below ~1e-3 * s_max then carry float32 noise, which does
  not change a truncation that keeps the large ones). No division by small
  singular values: the truncated product is the projection ``U_r U_r^T M``,
  which is the Eckart-Young optimum.
* ``"exact"``: LAPACK gesdd in float64 (``scipy.linalg.svd``).
* ``"randomized"``: Halko, Martinsson & Tropp 2011, "Finding structure with
  randomness", Alg. 4.4 (randomized range finder with ``n_iter`` power
  iterations, re-orthonormalized), seeded; only for a known rank.

Sources of the schemes are cited on each function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.linalg as sla

SCHEMES = ("channel", "spatial", "tucker2")
METHODS = ("auto", "gram", "exact", "randomized")
#: largest small side for which the Gram route works in float64
GRAM64_MAX_SIDE = 2048
_BLOCK_BYTES = 64 << 20


@dataclass
class SVD:
    """A (possibly partial) SVD of an m x n matrix M, singular values descending.

    ``side`` says which singular vectors are stored: ``"both"`` (U and Vt),
    ``"left"`` (U only; the rest follows from M) or ``"right"`` (V only).
    ``s`` holds every singular value (``"gram"``/``"exact"``) or the leading ones
    (``"randomized"``); ``total_energy`` is ||M||_F^2 either way.
    """

    U: Optional[np.ndarray]
    s: np.ndarray
    Vt: Optional[np.ndarray]
    side: str
    total_energy: float
    method: str
    gram: Optional[np.ndarray] = None  # kept when the vectors are computed lazily

    @property
    def energies(self) -> np.ndarray:
        return self.s.astype(np.float64) ** 2


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown SVD method {method!r} (choose from {', '.join(METHODS)})")
    return "gram" if method == "auto" else method


def _gram(M: np.ndarray, rows: bool) -> np.ndarray:
    """M M^T (rows=True) or M^T M, float64 accumulated over column/row blocks when small."""
    m = M.shape[0] if rows else M.shape[1]
    if m > GRAM64_MAX_SIDE:
        X = np.asarray(M, dtype=np.float32)
        return X @ X.T if rows else X.T @ X
    G = np.zeros((m, m), dtype=np.float64)
    if rows:
        step = max(1, _BLOCK_BYTES // (8 * m))
        for j in range(0, M.shape[1], step):
            X = np.asarray(M[:, j:j + step], dtype=np.float64)
            G += X @ X.T
    else:
        step = max(1, _BLOCK_BYTES // (8 * m))
        for i in range(0, M.shape[0], step):
            X = np.asarray(M[i:i + step], dtype=np.float64)
            G += X.T @ X
    return G


#: below this size LAPACK's symmetric eigensolvers run faster on one BLAS thread (and do
#: not stall when the cores are busy); threadpoolctl is used when installed
SMALL_EIG = 1024
_CONTROLLER = []


def _one_blas_thread():
    import contextlib
    if not _CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
            _CONTROLLER.append(ThreadpoolController())
        except Exception:  # not installed, or cannot inspect the loaded libraries
            _CONTROLLER.append(None)
    ctl = _CONTROLLER[0]
    return ctl.limit(limits=1, user_api="blas") if ctl is not None else contextlib.nullcontext()


def _sym_eig_desc(G: np.ndarray, vectors: bool = True):
    if G.shape[0] <= SMALL_EIG:
        with _one_blas_thread():
            return _sym_eig(G, vectors)
    return _sym_eig(G, vectors)


def _sym_eig(G: np.ndarray, vectors: bool):
    if vectors:
        w, V = sla.eigh(G, driver="evd", overwrite_a=True, check_finite=False)
        return np.sqrt(np.clip(w[::-1].astype(np.float64), 0, None)), V[:, ::-1]
    w = sla.eigvalsh(G, driver="evd", overwrite_a=True, check_finite=False)
    return np.sqrt(np.clip(w[::-1].astype(np.float64), 0, None)), None


def _energy(M) -> float:
    M = np.asarray(M)
    if M.size <= (1 << 22):
        return float(np.sum(np.square(M, dtype=np.float64)))
    flat = M.reshape(-1)
    step = 1 << 22
    return float(sum(np.dot(flat[i:i + step].astype(np.float64), flat[i:i + step].astype(np.float64))
                     for i in range(0, flat.size, step)))


def singular_values(M: np.ndarray, method: str = "auto") -> np.ndarray:
    """All min(m, n) singular values of M, descending (float64).

    ``"gram"``: square roots of the eigenvalues of the smaller Gram matrix
    (``eigvalsh``); ``"exact"``: LAPACK gesdd.
    """
    method = _check_method(method)
    M = np.asarray(M)
    if method == "exact":
        return sla.svd(np.asarray(M, np.float64), compute_uv=False, lapack_driver="gesdd")
    if method == "randomized":
        raise ValueError("randomized SVD gives leading singular values only; use 'gram' or 'exact'")
    s, _ = _sym_eig_desc(_gram(M, rows=M.shape[0] <= M.shape[1]), vectors=False)
    return s


def randomized_svd(M: np.ndarray, rank: int, seed: int = 0, n_iter: int = 4, oversample: int = 10) -> SVD:
    """Leading ``rank`` singular triplets of M by a seeded randomized range finder.

    Halko, Martinsson & Tropp 2011, "Finding structure with randomness:
    probabilistic algorithms for constructing approximate matrix
    decompositions", SIAM Review 53(2), Alg. 4.4 (subspace iteration) + 5.1.
    """
    M = np.asarray(M)
    m, n = M.shape
    k = min(min(m, n), int(rank) + int(oversample))
    rng = np.random.default_rng(seed)
    dt = np.float64 if M.dtype == np.float64 else np.float32
    X = M.astype(dt, copy=False)
    Q, _ = np.linalg.qr(X @ rng.standard_normal((n, k)).astype(dt))
    for _ in range(int(n_iter)):
        Q, _ = np.linalg.qr(X.T @ Q)
        Q, _ = np.linalg.qr(X @ Q)
    B = Q.T @ X
    Ub, s, Vt = sla.svd(B.astype(np.float64), full_matrices=False, lapack_driver="gesdd")
    return SVD(U=(Q.astype(np.float64) @ Ub), s=s, Vt=Vt, side="both", total_energy=_energy(M),
               method="randomized")


def svd(M: np.ndarray, method: str = "auto", rank: int = None, seed: int = 0, side: str = "auto",
        cache: dict = None, key=None, vectors: bool = True) -> SVD:
    """SVD of M by the chosen back end (see the module docstring).

    ``side="left"`` forces the Gram route to diagonalize ``M M^T`` (so that U
    is orthonormal whatever M's shape; Tucker needs that). ``cache``/``key``:
    reuse an earlier result for the same matrix (rank selection then
    truncation, in one run). ``vectors=False``: singular values now; on the
    Gram route with a side above :data:`LAZY_VECTORS_SIDE` the Gram matrix is
    kept and only the leading vectors a later truncation needs are computed
    then (``eigh`` with ``subset_by_index``), so a layer that ends up left
    alone costs one ``eigvalsh``.
    """
    method = _check_method(method)
    if key is not None and method == "randomized":
        key = (*key, int(rank))  # a randomized result holds that many components only
    if cache is not None and key is not None and key in cache:
        res = cache[key]
        if vectors:
            _ensure_vectors(res, rank)
        return res
    M = np.asarray(M)
    m, n = M.shape
    if method == "randomized":
        if rank is None:
            raise ValueError("randomized SVD needs the rank")
        res = randomized_svd(M, rank, seed=seed)
    elif method == "exact":
        U, s, Vt = sla.svd(np.asarray(M, np.float64), full_matrices=False, lapack_driver="gesdd")
        res = SVD(U, s, Vt, "both", float(np.sum(s ** 2)), "exact")
    else:
        rows = side == "left" or (side == "auto" and m <= n)
        G = _gram(M, rows=rows)
        if not vectors and G.shape[0] > LAZY_VECTORS_SIDE:
            s, _ = _sym_eig_desc(G.copy(), vectors=False)
            res = SVD(None, s, None, "left" if rows else "right", _energy(M), "gram", gram=G)
        else:
            s, V = _sym_eig_desc(G)
            res = SVD(U=V if rows else None, s=s, Vt=None if rows else V.T, side="left" if rows else "right",
                      total_energy=_energy(M), method="gram")
    if cache is not None and key is not None:
        cache[key] = res
    return res


#: Gram sides above this get their singular vectors lazily (see :func:`svd`)
LAZY_VECTORS_SIDE = 1024


def _ensure_vectors(res: SVD, rank: int = None):
    """Compute (at least the leading ``rank``) singular vectors of a lazy Gram-route result."""
    if res.gram is None:
        return
    have = res.U if res.side == "left" else (None if res.Vt is None else res.Vt.T)
    if have is not None and (rank is None or have.shape[1] >= int(rank)):
        return
    G = res.gram
    m = G.shape[0]
    if rank is not None and int(rank) < m // 3:
        # MRRR on the leading eigenpairs only (LAPACK syevr)
        _, V = sla.eigh(G, subset_by_index=[m - int(rank), m - 1], driver="evr", check_finite=False)
        V = V[:, ::-1]
    else:
        _, V = _sym_eig_desc(G.copy())
    if res.side == "left":
        res.U = V
    else:
        res.Vt = V.T
    if rank is None or V.shape[1] == m:
        res.gram = None


def _safe_sqrt(s):
    r = np.sqrt(np.asarray(s, dtype=np.float64))
    r[r <= 0] = 1.0  # a zero singular value: its factor column is zero either way
    return r


def low_rank_factors(M: np.ndarray, rank: int, res: SVD = None, method: str = "auto", seed: int = 0):
    """(A, B) with A @ B the best rank-``rank`` approximation of M (Eckart & Young 1936).

    A is m x r, B is r x n, balanced: ``A = U_r S_r^1/2``, ``B = S_r^1/2 V_r^T``
    (equal scale on both sides, better for later fine-tuning by SGD).
    Returned in float64 when M is small, float32 on the float32 Gram route.
    """
    M = np.asarray(M)
    r = int(rank)
    if res is None:
        res = svd(M, method=method, rank=r, seed=seed)
    if not 1 <= r <= min(M.shape):
        raise ValueError(f"rank {r} is outside 1..{min(M.shape)}")
    _ensure_vectors(res, r)
    if res.side == "both":
        sq = np.sqrt(res.s[:r])
        return res.U[:, :r] * sq, sq[:, None] * res.Vt[:r]
    dt = res.U.dtype if res.side == "left" else res.Vt.dtype
    sq = _safe_sqrt(res.s[:r]).astype(dt)
    if res.side == "left":
        Ur = np.ascontiguousarray(res.U[:, :r])
        P = _blocked_product(Ur.T, M, dt)  # rows: s_i v_i^T
        return Ur * sq, P / sq[:, None]
    Vr = np.ascontiguousarray(res.Vt[:r].T)
    Q = _blocked_product(Vr.T, M.T, dt).T  # columns: s_i u_i
    return Q / sq, sq[:, None] * Vr.T


def _blocked_product(L: np.ndarray, M: np.ndarray, dt) -> np.ndarray:
    """L @ M in dtype ``dt`` without a full converted copy of a large M."""
    if M.dtype == dt or M.size <= (1 << 22):
        return L.astype(dt, copy=False) @ M.astype(dt, copy=False)
    out = np.empty((L.shape[0], M.shape[1]), dtype=dt)
    step = max(1, _BLOCK_BYTES // (np.dtype(dt).itemsize * M.shape[0]))
    for j in range(0, M.shape[1], step):
        out[:, j:j + step] = L @ M[:, j:j + step].astype(dt)
    return out


def left_vectors(M: np.ndarray, rank: int, res: SVD = None, method: str = "auto", seed: int = 0) -> np.ndarray:
    """Orthonormal leading ``rank`` left singular vectors of M (m x r)."""
    if res is None:
        res = svd(M, method=method, rank=rank, seed=seed, side="left")
    if res.side == "right":  # only from an explicit right-side result: re-run on the left
        res = svd(M, method="gram", side="left")
    _ensure_vectors(res, rank)
    return res.U[:, :int(rank)]


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

def _res(M, method, rank, seed, cache, key, side="auto"):
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
        res = _res(M, method, rank, seed, cache, ("channel", j, "auto"))
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
        res = _res(M, method, rank, seed, cache, ("spatial", j, "auto"))
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
                             _res(channel_matrix(Wg), method, r2, seed, cache, ("mode0", j, "left"), "left"))
        U_in = left_vectors(mode1_matrix(Wd), r1,
                            _res(mode1_matrix(Wg), method, r1, seed, cache, ("mode1", j, "left"), "left"))
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
    res = _res(M, method, rank, seed, cache, ("fc", 0, "auto"))
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
