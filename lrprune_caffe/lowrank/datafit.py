"""Data-aware fitting of factorized layers (pure numpy / scipy, knows nothing of the IR).

Every problem here is a least-squares fit of a layer's outputs on calibration
data, written with samples as *columns*: inputs ``X`` (K x n), targets ``Y``
(N x n), a weight matrix acting as ``W X + b``. A convolution becomes such a
matrix product by :func:`im2col` (rows ordered ``(c, i, j)``, exactly Caffe's
weight layout ``(out, in/groups, kh, kw)`` flattened), at positions drawn by
:func:`sample_positions` so that the cost stays bounded on large images.

All solvers work from second moments (:class:`Moments`: sums of x, y, x x^T,
y x^T, accumulated in float64 over batches), so a caller can stream the
calibration set; the bias is eliminated exactly by centering (for a fixed
weight matrix A the best bias is ``c = ybar - A xbar``). Damping is Tikhonov
regularization relative to the data scale: ``lambda = d * mean(diag(H))``,
``H = sum x x^T`` (uncentered), default ``d = 0.01``, as SparseGPT damps its
Hessian (Frantar & Alistarh 2023, Sec. 3 / their code's ``percdamp``).
It pulls toward ``prior`` (default 0, i.e. ridge regression; pass the data-
free factor to pull toward it instead).

Solvers:

* :func:`ridge_fit` - ``min ||Y - A X - c||^2 + lambda ||A - prior||^2``: the
  least-squares re-fit of a chain's last factor (any scheme: the inputs are the
  fixed first factors' outputs), block-diagonal for grouped layers;
* :func:`reduced_rank_fit` - the same under ``rank(A) <= r``: reduced-rank
  regression, Izenman 1975 ("Reduced-rank regression for the multivariate
  linear model", J. Multivariate Analysis 5), Thm. 2 with identity weight:
  ``A = P P^T A_ls`` where P spans the top-r eigenvectors of the fitted
  values' scatter ``A_ls (H + lambda I) A_ls^T``; with damping it is exact by
  the augmented-data argument of Mukherjee & Zhu 2011 ("Reduced rank ridge
  regression and its kernel extensions", Stat. Anal. Data Min. 4, Sec. 2);
* :func:`zhang_fit` - Zhang, Zou, He & Sun 2015 ("Accelerating very deep
  convolutional networks for classification and detection", TPAMI 38(10)),
  the linear response reconstruction: ``y' = M (y^ - ybar^) + ybar`` with
  ``M = P Q`` of rank r applied to the original layer's responses, so the
  chain is ``Q W`` (r filters, no bias) then ``P`` (1x1 / FC, bias
  ``c + M b``). Symmetric case (Sec. 3.1, Eq. 3-5): the responses on the
  original inputs, P = Q^T = the top-r principal directions of their
  covariance, bias ``b + (I - P P^T) W xbar``. Asymmetric case (Sec. 3.3,
  linear form): the responses ``y^ = W x^`` on the inputs the already
  compressed layers below produce, target the original ``y``; solved as the
  reduced-rank regression of y on y^ (the paper solves the same problem by
  GSVD, Sec. 3.2, Eq. 9-10), damped toward M = I. Everything happens in the
  N-dimensional response space: the K x K input Gram matrix is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla

DEFAULT_DAMPING = 0.01


# ---------------------------------------------------------------------------
# convolution geometry: positions, im2col, responses

def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def conv_out_size(size: int, kernel: int, stride: int = 1, pad: int = 0, dilation: int = 1) -> int:
    """Caffe's output size (floor rounding): ``(size + 2 pad - (dilation (kernel - 1) + 1)) // stride + 1``."""
    return (int(size) + 2 * int(pad) - (int(dilation) * (int(kernel) - 1) + 1)) // int(stride) + 1


def sample_positions(n_images: int, height: int, width: int, max_per_image: int = None, seed: int = 0):
    """Flat indices into an ``(n_images, height, width)`` grid of output positions, sorted.

    Every position when an image has at most ``max_per_image`` (or it is None);
    otherwise ``max_per_image`` distinct positions per image, uniformly at random
    (``numpy.random.default_rng(seed)``, one permutation per image), so the number
    of sampled columns is at most ``n_images * max_per_image``.
    """
    hw = int(height) * int(width)
    if max_per_image is None or hw <= int(max_per_image):
        return np.arange(int(n_images) * hw, dtype=np.int64)
    rng = np.random.default_rng(seed)
    k = int(max_per_image)
    out = np.empty((int(n_images), k), dtype=np.int64)
    for b in range(int(n_images)):
        out[b] = np.sort(rng.choice(hw, size=k, replace=False)) + b * hw
    return out.reshape(-1)


def im2col(x: np.ndarray, kernel, stride=1, pad=0, dilation=1, positions=None) -> np.ndarray:
    """The patches of an NCHW input as columns: ``(C kh kw, n)``.

    Row ``(c, i, j)`` (C order) holds input channel c at kernel tap (i, j), so
    ``W.reshape(N, -1) @ im2col(x) + b`` is Caffe's convolution (group 1; group j
    of a grouped one uses rows ``j C/g kh kw ... (j+1) C/g kh kw``). Column order
    is ``(image, out_y, out_x)``; ``positions`` (flat indices into that grid, see
    :func:`sample_positions`) selects columns without forming the others.
    """
    x = np.asarray(x)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(kernel), _pair(stride), _pair(pad), _pair(dilation)
    B, C, H, W = x.shape
    ho, wo = conv_out_size(H, kh, sh, ph, dh), conv_out_size(W, kw, sw, pw, dw)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"kernel {kh}x{kw} (dilation {dh}x{dw}) does not fit a padded {H}x{W} input")
    if positions is not None:
        return _im2col_at(x, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ho, wo, positions)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    cols = np.empty((C, kh, kw, B, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dh, j * dw
            tap = xp[:, :, y0:y0 + sh * (ho - 1) + 1:sh, x0:x0 + sw * (wo - 1) + 1:sw]
            cols[:, i, j] = tap.transpose(1, 0, 2, 3)
    return cols.reshape(C * kh * kw, B * ho * wo)


def _im2col_at(x, kernel, stride, pad, dilation, ho, wo, positions):
    """im2col's columns at ``positions`` only, read from the unpadded input (taps in the padding are 0):
    the cost and the memory follow the number of positions, not the size of the input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, pad, dilation
    B, C, H, W = x.shape
    pos = np.asarray(positions, dtype=np.int64)
    b, rem = np.divmod(pos, ho * wo)
    oy, ox = np.divmod(rem, wo)
    rows = (oy * sh - ph)[:, None] + (np.arange(kh) * dh)[None, :]  # (n, kh), in input coordinates
    cols_ = (ox * sw - pw)[:, None] + (np.arange(kw) * dw)[None, :]  # (n, kw)
    rin, cin = (rows >= 0) & (rows < H), (cols_ >= 0) & (cols_ < W)
    patches = x[b[:, None, None], :, np.clip(rows, 0, H - 1)[:, :, None],
                np.clip(cols_, 0, W - 1)[:, None, :]]  # (n, kh, kw, C)
    if not (rin.all() and cin.all()):
        patches = np.where((rin[:, :, None] & cin[:, None, :])[..., None], patches, np.zeros((), patches.dtype))
    return np.ascontiguousarray(patches.transpose(3, 1, 2, 0)).reshape(C * kh * kw, pos.size)


def responses(y: np.ndarray, positions=None) -> np.ndarray:
    """An NCHW output as columns ``(N, n)``, columns ordered ``(image, y, x)`` like :func:`im2col`."""
    y = np.asarray(y)
    B, N = y.shape[:2]
    if positions is None:
        return y.reshape(B, N, -1).transpose(1, 0, 2).reshape(N, -1)
    hw = int(np.prod(y.shape[2:]))
    b, rem = np.divmod(np.asarray(positions, dtype=np.int64), hw)
    return y.reshape(B, N, hw)[b, :, rem].T


#: bytes of im2col buffer per step of :func:`conv2d` (images are processed in chunks under it)
CONV_BUFFER_BYTES = 128 << 20


def conv2d(x: np.ndarray, W: np.ndarray, b=None, stride=1, pad=0, dilation=1, group: int = 1) -> np.ndarray:
    """Caffe's convolution by im2col, a chunk of images at a time (the patch buffer stays
    under :data:`CONV_BUFFER_BYTES`); computed in the inputs' and weights' common dtype."""
    B, C, H, Wd = x.shape
    N, cg, kh, kw = W.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    ho, wo = conv_out_size(H, kh, sh, ph, dh), conv_out_size(Wd, kw, sw, pw, dw)
    ng = N // group
    dt = np.result_type(x, W)
    out = np.empty((B, N, ho, wo), dtype=dt)
    per_image = cg * kh * kw * ho * wo * np.dtype(dt).itemsize
    step = max(1, int(CONV_BUFFER_BYTES // max(1, per_image)))
    for i in range(0, B, step):
        xb = x[i:i + step]
        n = xb.shape[0]
        for j in range(group):
            X = im2col(xb[:, j * cg:(j + 1) * cg], (kh, kw), (sh, sw), (ph, pw), (dh, dw))
            Y = W[j * ng:(j + 1) * ng].reshape(ng, -1).astype(dt, copy=False) @ X
            out[i:i + n, j * ng:(j + 1) * ng] = Y.reshape(ng, n, ho, wo).transpose(1, 0, 2, 3)
    if b is not None:
        out += np.asarray(b, dtype=dt).reshape(1, N, 1, 1)
    return out


# ---------------------------------------------------------------------------
# moments

@dataclass
class Moments:
    """Sums over calibration samples (columns) of x (K), y (N): n, sum x, sum y, x x^T, y x^T, ||y||^2."""

    n: int = 0
    sx: np.ndarray = None
    sy: np.ndarray = None
    xx: np.ndarray = None
    yx: np.ndarray = None
    yy: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, X, Y) -> "Moments":
        m = cls()
        m.add(X, Y)
        return m

    def add(self, X, Y) -> "Moments":
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
            raise ValueError(f"X {X.shape} and Y {Y.shape} must be (K, n) and (N, n)")
        if self.xx is None:
            K, N = X.shape[0], Y.shape[0]
            self.sx, self.sy = np.zeros(K), np.zeros(N)
            self.xx, self.yx = np.zeros((K, K)), np.zeros((N, K))
        self.n += X.shape[1]
        self.sx += X.sum(axis=1)
        self.sy += Y.sum(axis=1)
        self.xx += X @ X.T
        self.yx += Y @ X.T
        self.yy += float(np.sum(Y * Y))
        return self

    @property
    def xbar(self):
        return self.sx / self.n

    @property
    def ybar(self):
        return self.sy / self.n

    def centered(self):
        """(Hc, Gc): ``sum (x - xbar)(x - xbar)^T`` and ``sum (y - ybar)(x - xbar)^T``."""
        xb, yb = self.xbar, self.ybar
        return self.xx - self.n * np.outer(xb, xb), self.yx - self.n * np.outer(yb, xb)

    def second(self, intercept: bool = True):
        """(H, G, xbar, ybar): centered moments with an intercept, raw ones (and zero means) without."""
        if intercept:
            return (*self.centered(), self.xbar, self.ybar)
        return self.xx, self.yx, np.zeros_like(self.sx), np.zeros_like(self.sy)

    def sq_error(self, A, c) -> float:
        """``sum ||y - A x - c||^2`` from the moments (float64)."""
        A = np.asarray(A, np.float64)
        c = np.asarray(c, np.float64)
        AS = A @ self.xx
        return float(self.yy - 2 * np.sum(A * self.yx) + np.sum(AS * A) - 2 * c @ self.sy
                     + 2 * c @ (A @ self.sx) + self.n * float(c @ c))


def damping_of(xx: np.ndarray, damping: float = DEFAULT_DAMPING) -> float:
    """``lambda = d * mean(diag(H))`` for an uncentered Gram matrix H."""
    return float(damping) * float(np.mean(np.diag(xx))) if xx.size else 0.0


def _spd_solve(H, B):
    """H^{-1} B for a symmetric positive (semi)definite H; the least-norm solution when singular."""
    try:
        return sla.cho_solve(sla.cho_factor(H, check_finite=False), B, check_finite=False)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(H, B, rcond=None)[0]


def _blocks(n_out: int, n_in: int, group: int):
    if n_out % group or n_in % group:
        raise ValueError(f"{n_out} outputs / {n_in} inputs do not split into {group} groups")
    no, ni = n_out // group, n_in // group
    return [(slice(j * no, (j + 1) * no), slice(j * ni, (j + 1) * ni)) for j in range(group)]


def _damped_ls(m: Moments, damping, prior, group, intercept=True):
    """Per group: (rows, cols, A_ls, H_lambda, G_lambda) of the damped (centered) least squares."""
    Hc, Gc, _, _ = m.second(intercept)
    out = []
    for rows, cols in _blocks(Gc.shape[0], Gc.shape[1], group):
        H = Hc[cols, cols].copy()
        lam = damping_of(m.xx[cols, cols], damping)
        G = Gc[rows, cols].copy()
        if lam:
            H[np.diag_indices_from(H)] += lam
            if prior is not None:
                G += lam * np.asarray(prior, np.float64)[rows]
        out.append((rows, cols, _spd_solve(H, G.T).T, H, G))
    return out


def ridge_fit(m: Moments, damping: float = DEFAULT_DAMPING, prior=None, group: int = 1, intercept: bool = True):
    """``argmin_{A, c} ||Y - A X - c||^2 + lambda ||A - prior||^2`` (A block-diagonal over ``group``).

    Returns ``(A, c)``: A ``(N, K / group)`` (group j's rows act on inputs
    ``j K/g ... (j+1) K/g``, Caffe's grouped layout), c ``(N,)``. Normal
    equations ``A (Hc + lambda I) = Gc + lambda prior`` (Tikhonov / ridge;
    Hoerl & Kennard 1970), Cholesky; ``damping=0`` on a singular Hc gives the
    minimum-norm least-squares solution. ``prior``: ``(N, K/g)``, default 0.
    ``intercept=False``: no c (it is returned as zeros), uncentered moments.
    """
    N, K = m.yx.shape
    _, _, xbar, ybar = m.second(intercept)
    A = np.zeros((N, K // group))
    c = ybar.copy()
    for rows, cols, Aj, _, _ in _damped_ls(m, damping, prior, group, intercept):
        A[rows] = Aj
        c[rows] -= Aj @ xbar[cols]
    return A, c


def _top_eigvecs(S, r):
    S = 0.5 * (S + S.T)
    n = S.shape[0]
    _, V = sla.eigh(S, subset_by_index=[n - r, n - 1], check_finite=False)
    return V[:, ::-1]


def reduced_rank_fit(m: Moments, rank: int, damping: float = DEFAULT_DAMPING, prior=None, group: int = 1,
                     intercept: bool = True):
    """``argmin ||Y - P Q X - c||^2 + lambda ||P Q - prior||^2`` over P (N x r), Q (r x K), per group.

    Reduced-rank (ridge) regression (Izenman 1975, Thm. 2; Mukherjee & Zhu
    2011, Sec. 2): with ``A_ls`` the damped least-squares solution,
    ``P`` = top-``rank`` eigenvectors of ``A_ls (Hc + lambda I) A_ls^T``
    (orthonormal columns), ``Q = P^T A_ls``, ``c = ybar - P Q xbar``.
    ``rank`` is per group. Returns ``(P (N, r), Q (g r, K/g), c)`` in
    Caffe's grouped layout (group j's P rows use its own r columns).
    """
    N, K = m.yx.shape
    r = int(rank)
    if not 1 <= r <= min(N, K) // group:
        raise ValueError(f"rank {r} is outside 1..{min(N, K) // group}")
    _, _, xbar, ybar = m.second(intercept)
    P = np.zeros((N, r))
    Q = np.zeros((group * r, K // group))
    c = ybar.copy()
    for j, (rows, cols, A, _, G) in enumerate(_damped_ls(m, damping, prior, group, intercept)):
        Pj = _top_eigvecs(A @ G.T, r)  # A (H + lam I) A^T = A G^T
        Qj = Pj.T @ A
        P[rows], Q[j * r:(j + 1) * r] = Pj, Qj
        c[rows] -= Pj @ (Qj @ xbar[cols])
    return P, Q, c


def zhang_fit(W: np.ndarray, b, m: Moments, rank: int, damping: float = DEFAULT_DAMPING, group: int = 1,
              intercept: bool = True):
    """Zhang et al. 2015's response reconstruction of a layer ``y = W x + b`` at rank ``rank``.

    ``m``: :class:`Moments` of (responses of the *original* layer on the inputs
    it now receives, ``y^ = W x^ + b``; target responses ``y``), both
    ``(N, n)``. For the symmetric case pass the same responses twice. ``W``:
    ``(N, K/g)`` (a conv's weights flattened per output). Fits ``M = P Q`` by
    :func:`reduced_rank_fit` with the damping pulling toward ``M = I`` (so the
    symmetric case is exactly PCA of the responses), per group.

    Returns ``(W1, W2, b2)``: W1 = ``Q W`` ``(g r, K/g)`` (the r new filters,
    no bias), W2 = ``P`` ``(N, r)`` (the 1x1 / FC that restores N outputs), and
    its bias ``b2 = c + P Q b``, so that ``W2 (W1 x) + b2 = M (W x + b) + c``.
    ``intercept=False`` (a layer without bias): c = 0, ``b`` must be None, and
    M is fit on uncentered responses.
    """
    W = np.asarray(W, np.float64)
    N = W.shape[0]
    b = np.zeros(N) if b is None else np.asarray(b, np.float64)
    if m.yx.shape != (N, N):
        raise ValueError(f"moments of shape {m.yx.shape}: expected responses of the {N} outputs")
    eye = np.zeros((N, N // group))
    for j, (rows, _) in enumerate(_blocks(N, N, group)):
        eye[rows] = np.eye(N // group)
    P, Q, c = reduced_rank_fit(m, rank, damping, prior=eye, group=group, intercept=intercept)
    r = int(rank)
    W1 = np.zeros((group * r, W.shape[1]))
    b2 = c.copy()
    for j, (rows, _) in enumerate(_blocks(N, N, group)):
        Qj = Q[j * r:(j + 1) * r]
        W1[j * r:(j + 1) * r] = Qj @ W[rows]
        b2[rows] += P[rows] @ (Qj @ b[rows])
    return W1, P, b2


def balance(W1: np.ndarray, W2: np.ndarray, group: int = 1):
    """Rescale each rank component so its row of W1 and its column of W2 have the same norm.

    ``W1`` ``(g r, K/g)``, ``W2`` ``(N, r)`` (grouped layout as above);
    ``W2 diag(1/s) diag(s) W1`` computes the same product, so the chain's output
    is unchanged. Zhang's factors put all the scale into W1 (P is orthonormal);
    balanced ones (like the data-free ``U S^1/2``, ``S^1/2 V^T``) keep weight
    magnitudes comparable across the two layers, which magnitude pruning needs.
    """
    W1 = np.array(W1, np.float64)
    W2 = np.array(W2, np.float64)
    r = W1.shape[0] // group
    n = W2.shape[0] // group
    for j in range(group):
        a = np.linalg.norm(W1[j * r:(j + 1) * r], axis=1)
        b = np.linalg.norm(W2[j * n:(j + 1) * n], axis=0)
        ok = (a > 0) & (b > 0)
        s = np.ones(r)
        s[ok] = np.sqrt(b[ok] / a[ok])
        W1[j * r:(j + 1) * r] *= s[:, None]
        W2[j * n:(j + 1) * n] /= s[None, :]
    return W1, W2


def relu_targets(Y: np.ndarray, P: np.ndarray, mu: float) -> np.ndarray:
    """Zhang et al. 2015's auxiliary step for a layer followed by a ReLU (Sec. 3.2, Eq. 8-9).

    Element-wise ``argmin_z (r(y) - r(z))^2 + mu (z - p)^2`` with ``r = max(., 0)``,
    ``y`` the original pre-activation target and ``p`` the current linear
    prediction; the next linear fit then targets these z. Where the original
    output is cut by the ReLU and the prediction is too, z = p: the fit is
    not spent on values the ReLU discards.
    """
    P = np.asarray(P, np.float64)
    t = np.maximum(np.asarray(Y), 0.0, dtype=np.float64)
    # the same arithmetic as the formulas' direct form, in place (these are the calibration's largest arrays)
    z0 = np.multiply(P, mu)
    z0 += t
    z0 /= 1.0 + mu
    np.maximum(z0, 0.0, out=z0)  # branch z >= 0: z0 = max((t + mu p) / (1 + mu), 0)
    f0 = np.subtract(t, z0)
    np.square(f0, out=f0)
    d = np.subtract(z0, P)
    np.square(d, out=d)
    d *= mu
    f0 += d  # f0 = (t - z0)^2 + mu (z0 - p)^2
    z1 = np.minimum(P, 0.0)  # branch z < 0 (its limit 0 when p >= 0)
    np.subtract(z1, P, out=d)
    np.square(d, out=d)
    d *= mu
    np.square(t, out=t)
    t += d  # f1 = t^2 + mu (z1 - p)^2
    np.copyto(z0, z1, where=f0 > t)
    return z0


def retarget(m: Moments, X: np.ndarray, Z: np.ndarray) -> Moments:
    """``m`` (moments of X and some Y) with the targets replaced by Z; the x moments are reused."""
    Z = np.asarray(Z, np.float64)
    out = Moments(m.n, m.sx, Z.sum(axis=1), m.xx, Z @ np.asarray(X, np.float64).T, float(np.sum(Z * Z)))
    return out


def relative_sq_error(m: Moments, A, c) -> float:
    """``||Y - A X - c||^2 / ||Y - ybar||^2`` (1 = no better than the mean)."""
    denom = m.yy - m.n * float(m.ybar @ m.ybar)
    return m.sq_error(A, c) / denom if denom > 0 else 0.0


__all__ = ["DEFAULT_DAMPING", "conv_out_size", "sample_positions", "im2col", "responses", "conv2d", "Moments",
           "damping_of", "ridge_fit", "reduced_rank_fit", "zhang_fit", "balance", "relu_targets", "retarget",
           "relative_sq_error"]
