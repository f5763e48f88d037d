"""SVD back ends for the decompositions (pure numpy / scipy).

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.linalg as sla

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


__all__ = ["METHODS", "SVD", "svd", "randomized_svd", "singular_values", "low_rank_factors", "left_vectors",
           "GRAM64_MAX_SIDE", "LAZY_VECTORS_SIDE"]
