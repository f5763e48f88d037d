"""Data-aware fitting (lowrank.datafit, lowrank.prunefit) against independent references:
scipy's direct correlation for im2col, numpy's lstsq for the least-squares fits, alternating least
squares for the reduced-rank optimum, SVD-PCA for Zhang's symmetric case, brute-force enumeration
for OBS; and, on the real-Caffe LeNet, data-aware against data-free factorization of conv2."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from lrprune_caffe.lowrank import datafit as df, prunefit as pf


def rng(seed=0):
    return np.random.default_rng(seed)


# --- im2col / convolution against scipy's direct correlation -----------------------

def direct_conv(x, W, b, stride, pad, dilation, group):
    """Caffe's convolution by scipy.signal.correlate2d on a dilated kernel, channel by channel."""
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    N, cg, kh, kw = W.shape
    ng = N // group
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    K = np.zeros((N, cg, dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    K[:, :, ::dh, ::dw] = W
    out = []
    for img in xp:
        chans = []
        for o in range(N):
            j = o // ng
            acc = sum(signal.correlate2d(img[j * cg + c], K[o, c], mode="valid") for c in range(cg))
            chans.append(acc[::sh, ::sw] + b[o])
        out.append(chans)
    return np.asarray(out)


@pytest.mark.parametrize("kernel,stride,pad,dilation,group", [
    ((3, 3), (1, 1), (0, 0), (1, 1), 1),
    ((5, 3), (2, 1), (1, 2), (1, 1), 1),
    ((3, 2), (2, 3), (2, 0), (2, 3), 2),
    ((1, 1), (2, 2), (0, 0), (1, 1), 3),
])
def test_conv2d_matches_direct_correlation(kernel, stride, pad, dilation, group):
    r = rng(1)
    x = r.standard_normal((2, 6, 11, 10))
    W = r.standard_normal((6, 6 // group, *kernel))
    b = r.standard_normal(6)
    got = df.conv2d(x, W, b, stride, pad, dilation, group)
    assert got.shape[2:] == (df.conv_out_size(11, kernel[0], stride[0], pad[0], dilation[0]),
                             df.conv_out_size(10, kernel[1], stride[1], pad[1], dilation[1]))
    np.testing.assert_allclose(got, direct_conv(x, W, b, stride, pad, dilation, group), atol=1e-10)


def test_im2col_at_positions_is_a_column_subset_and_matches_responses():
    r = rng(2)
    x = r.standard_normal((3, 4, 9, 8))
    W = r.standard_normal((5, 4, 3, 3))
    geo = dict(kernel=(3, 3), stride=(2, 1), pad=(1, 0), dilation=(1, 2))
    full = df.im2col(x, **geo)
    y = df.conv2d(x, W, None, geo["stride"], geo["pad"], geo["dilation"])
    pos = df.sample_positions(3, y.shape[2], y.shape[3], max_per_image=7, seed=4)
    np.testing.assert_array_equal(df.im2col(x, positions=pos, **geo), full[:, pos])
    np.testing.assert_allclose(W.reshape(5, -1) @ full[:, pos], df.responses(y, pos), atol=1e-10)
    np.testing.assert_array_equal(df.responses(y), df.responses(y, np.arange(full.shape[1])))


def test_sample_positions_bounded_distinct_seeded():
    pos = df.sample_positions(5, 20, 30, max_per_image=64, seed=3)
    assert pos.size == 5 * 64
    per_image = pos // 600
    assert all(np.unique(pos[per_image == b]).size == 64 for b in range(5))
    np.testing.assert_array_equal(pos, df.sample_positions(5, 20, 30, max_per_image=64, seed=3))
    assert not np.array_equal(pos, df.sample_positions(5, 20, 30, max_per_image=64, seed=4))
    np.testing.assert_array_equal(df.sample_positions(2, 4, 4, max_per_image=64), np.arange(32))


# --- least squares ------------------------------------------------------------------

def lstsq_with_bias(X, Y, lam=0.0, prior=None):
    """[A c] by numpy's lstsq on the (augmented) system; the bias is not damped."""
    K, n = X.shape
    D = np.vstack([X, np.ones((1, n))]).T
    T = Y.T
    if lam:
        reg = np.hstack([np.sqrt(lam) * np.eye(K), np.zeros((K, 1))])
        D = np.vstack([D, reg])
        T = np.vstack([T, np.sqrt(lam) * (np.zeros((K, Y.shape[0])) if prior is None else prior.T)])
    sol = np.linalg.lstsq(D, T, rcond=None)[0]
    return sol[:-1].T, sol[-1]


def test_moments_squared_error_matches_direct():
    r = rng(5)
    X, Y = r.standard_normal((4, 50)), r.standard_normal((3, 50))
    A, c = r.standard_normal((3, 4)), r.standard_normal(3)
    m = df.Moments.of(X[:, :20], Y[:, :20]).add(X[:, 20:], Y[:, 20:])
    assert m.sq_error(A, c) == pytest.approx(float(np.sum((Y - A @ X - c[:, None]) ** 2)), rel=1e-10)


@pytest.mark.parametrize("group", [1, 2])
def test_ridge_fit_undamped_equals_lstsq(group):
    r = rng(6)
    Z = r.standard_normal((6, 80)) + 0.5
    Y = r.standard_normal((4, 80))
    A, c = df.ridge_fit(df.Moments.of(Z, Y), damping=0.0, group=group)
    assert A.shape == (4, 6 // group)
    for j in range(group):
        rows, cols = slice(j * 4 // group, (j + 1) * 4 // group), slice(j * 6 // group, (j + 1) * 6 // group)
        Aj, cj = lstsq_with_bias(Z[cols], Y[rows])
        np.testing.assert_allclose(A[rows], Aj, atol=1e-9)
        np.testing.assert_allclose(c[rows], cj, atol=1e-9)


def test_fits_without_intercept_equal_lstsq_through_the_origin():
    r = rng(19)
    X = r.standard_normal((5, 60)) + 1.0
    Y = r.standard_normal((4, 5)) @ X + 0.3 * r.standard_normal((4, 60)) + 2.0
    m = df.Moments.of(X, Y)
    A, c = df.ridge_fit(m, damping=0.0, intercept=False)
    np.testing.assert_allclose(A, np.linalg.lstsq(X.T, Y.T, rcond=None)[0].T, atol=1e-9)
    assert not c.any()
    mask = r.random((4, 5)) > 0.4
    W, c = pf.masked_fit(m, mask, damping=0.0, intercept=False)
    for i in range(4):
        S = np.nonzero(mask[i])[0]
        np.testing.assert_allclose(W[i, S], np.linalg.lstsq(X[S].T, Y[i], rcond=None)[0], atol=1e-9)
    assert not c.any()
    W1, W2, b2 = df.zhang_fit(A, None, df.Moments.of(A @ X, A @ X), 2, damping=0.0, intercept=False)
    U = np.linalg.svd(A @ X, full_matrices=False)[0][:, :2]  # uncentered principal subspace
    np.testing.assert_allclose(W2 @ W2.T, U @ U.T, atol=1e-8)
    assert not b2.any()


def test_ridge_fit_damped_equals_augmented_lstsq():
    r = rng(7)
    Z = r.standard_normal((5, 30)) * np.array([[3.0], [1], [0.1], [1], [2]])
    Y = r.standard_normal((3, 30))
    prior = r.standard_normal((3, 5))
    m = df.Moments.of(Z, Y)
    lam = 0.05 * float(np.mean(np.sum(Z * Z, axis=1)))
    for p in (None, prior):
        A, c = df.ridge_fit(m, damping=0.05, prior=p)
        Ar, cr = lstsq_with_bias(Z, Y, lam, p)
        np.testing.assert_allclose(A, Ar, atol=1e-9)
        np.testing.assert_allclose(c, cr, atol=1e-9)


# --- reduced-rank regression and Zhang et al. ----------------------------------------

def rrr_objective(X, Y, M, c, lam=0.0, prior=None):
    pen = 0.0 if not lam else lam * float(np.sum((M - (0 if prior is None else prior)) ** 2))
    return float(np.sum((Y - M @ X - c[:, None]) ** 2)) + pen


def als_rank_fit(X, Y, r, lam=0.0, prior=None, iters=3000, seed=0):
    """Alternating least squares on P, Q (from a random start) for the same penalized objective."""
    K, n = X.shape
    N = Y.shape[0]
    Xa, Ya = X - X.mean(1, keepdims=True), Y - Y.mean(1, keepdims=True)
    if lam:
        Xa = np.hstack([Xa, np.sqrt(lam) * np.eye(K)])
        Ya = np.hstack([Ya, np.sqrt(lam) * (np.zeros((N, K)) if prior is None else prior)])
    Q = np.random.default_rng(seed).standard_normal((r, K))
    for _ in range(iters):
        Z = Q @ Xa
        P = np.linalg.lstsq(Z.T, Ya.T, rcond=None)[0].T
        # Q: min ||Ya - P Q Xa||: vec(Q) by the normal equations (P^T P) Q (Xa Xa^T) = P^T Ya Xa^T
        Q = np.linalg.solve(P.T @ P, P.T @ Ya @ Xa.T) @ np.linalg.inv(Xa @ Xa.T)
    M = P @ Q
    return M, Y.mean(1) - M @ X.mean(1)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_reduced_rank_fit_is_the_optimum(damping):
    r = rng(8)
    X = r.standard_normal((5, 40))
    Y = r.standard_normal((6, 5)) @ X + 0.7 * r.standard_normal((6, 40)) + 2.0
    prior = r.standard_normal((6, 5)) if damping else None
    m = df.Moments.of(X, Y)
    lam = df.damping_of(m.xx, damping)
    P, Q, c = df.reduced_rank_fit(m, 2, damping=damping, prior=prior)
    np.testing.assert_allclose(P.T @ P, np.eye(2), atol=1e-10)
    ours = rrr_objective(X, Y, P @ Q, c, lam, prior)
    best = min(rrr_objective(X, Y, *als_rank_fit(X, Y, 2, lam, prior, seed=s), lam, prior) for s in range(3))
    assert ours == pytest.approx(best, rel=1e-7)
    for s in range(20):  # no nearby rank-2 point is better
        d = np.random.default_rng(s)
        Pp, Qp = P + 1e-3 * d.standard_normal(P.shape), Q + 1e-3 * d.standard_normal(Q.shape)
        cp = m.ybar - Pp @ Qp @ m.xbar
        assert rrr_objective(X, Y, Pp @ Qp, cp, lam, prior) >= ours - 1e-9


def low_rank_layer(seed, N=8, K=12, r=3, n=200):
    g = rng(seed)
    W = g.standard_normal((N, r)) @ g.standard_normal((r, K))
    b = g.standard_normal(N)
    X = g.standard_normal((K, n)) + 1.0
    return W, b, X


def test_zhang_symmetric_is_pca_of_responses_with_bias_correction():
    W, b, X = low_rank_layer(9, r=5)
    W = W + 0.3 * rng(10).standard_normal(W.shape)  # full rank responses
    Y = W @ X + b[:, None]
    for damping in (0.0, 0.01):
        W1, W2, b2 = df.zhang_fit(W, b, df.Moments.of(Y, Y), 3, damping=damping)
        Yc = Y - Y.mean(1, keepdims=True)
        U = np.linalg.svd(Yc, full_matrices=False)[0][:, :3]
        np.testing.assert_allclose(W2 @ W2.T, U @ U.T, atol=1e-8)  # the principal subspace
        expected = U @ U.T @ Yc + Y.mean(1, keepdims=True)  # y' = M (y - ybar) + ybar
        np.testing.assert_allclose(W2 @ (W1 @ X) + b2[:, None], expected, atol=1e-8)
        np.testing.assert_allclose(b2, b + (np.eye(8) - U @ U.T) @ W @ X.mean(1), atol=1e-8)


def test_zhang_exact_on_low_rank_responses():
    W, b, X = low_rank_layer(11, r=3)
    Y = W @ X + b[:, None]
    W1, W2, b2 = df.zhang_fit(W, b, df.Moments.of(Y, Y), 3, damping=0.0)
    np.testing.assert_allclose(W2 @ W1 @ X + b2[:, None], Y, atol=1e-8)


@pytest.mark.parametrize("group", [1, 2])
def test_zhang_asymmetric_optimal_in_response_space_and_beats_symmetric(group):
    W, b, X = low_rank_layer(12, N=8, K=12, r=6)
    g = rng(13)
    W = W + 0.2 * g.standard_normal(W.shape)
    W = W[:, :12 // group]  # per-group input width
    Xs = [X[j * 12 // group:(j + 1) * 12 // group] for j in range(group)]
    Xh = [x + 0.4 * g.standard_normal(x.shape) for x in Xs]  # inputs from the compressed layers below

    def layer(Wm, xs, bias):
        return np.vstack([Wm[j * 8 // group:(j + 1) * 8 // group] @ xs[j] for j in range(group)]) + bias[:, None]

    Y, Yh = layer(W, Xs, b), layer(W, Xh, b)
    asym = df.zhang_fit(W, b, df.Moments.of(Yh, Y), 2, damping=0.0, group=group)
    sym = df.zhang_fit(W, b, df.Moments.of(Y, Y), 2, damping=0.0, group=group)

    def err(f):
        W1, W2, b2 = f
        Z = np.vstack([W1[j * 2:(j + 1) * 2] @ Xh[j] for j in range(group)])
        out = np.vstack([W2[j * 8 // group:(j + 1) * 8 // group] @ Z[j * 2:(j + 1) * 2] for j in range(group)])
        return float(np.sum((Y - out - f[2][:, None]) ** 2))

    assert err(asym) < err(sym)
    if group == 1:  # the optimum of the response-space problem, by ALS
        best = min(rrr_objective(Yh, Y, *als_rank_fit(Yh, Y, 2, seed=s)) for s in range(3))
        assert err(asym) == pytest.approx(best, rel=1e-7)


@pytest.mark.parametrize("group", [1, 2])
def test_balance_keeps_the_product_and_equalizes_component_norms(group):
    g = rng(20)
    W1 = g.standard_normal((3 * group, 7)) * 10.0
    W2 = g.standard_normal((4 * group, 3)) * 0.1
    B1, B2 = df.balance(W1, W2, group)
    for j in range(group):
        r1, r2 = slice(3 * j, 3 * j + 3), slice(4 * j, 4 * j + 4)
        np.testing.assert_allclose(B2[r2] @ B1[r1], W2[r2] @ W1[r1], atol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(B1[r1], axis=1), np.linalg.norm(B2[r2], axis=0), rtol=1e-10)


def test_relu_targets_minimize_the_auxiliary_objective_by_grid_search():
    g = rng(21)
    y, p = g.standard_normal(400) * 2, g.standard_normal(400) * 2
    grid = np.linspace(-8, 8, 160001)
    for mu in (0.01, 0.3, 1.0, 5.0):
        z = df.relu_targets(y[None], p[None], mu)[0]

        def f(zz, i):
            return (max(y[i], 0) - np.maximum(zz, 0)) ** 2 + mu * (zz - p[i]) ** 2

        for i in range(0, 400, 7):
            best = f(grid, i).min()
            assert f(np.array([z[i]]), i)[0] <= best + 1e-6


def test_retarget_equals_fresh_moments():
    g = rng(22)
    X, Y, Z = g.standard_normal((4, 30)), g.standard_normal((3, 30)), g.standard_normal((3, 30))
    a, b = df.retarget(df.Moments.of(X, Y), X, Z), df.Moments.of(X, Z)
    for k in ("sx", "sy", "xx", "yx"):
        np.testing.assert_allclose(getattr(a, k), getattr(b, k), atol=1e-12)
    assert a.n == b.n and a.yy == pytest.approx(b.yy)


# --- data-aware pruning --------------------------------------------------------------

def pruning_case(seed=14, N=5, K=7, n=60):
    g = rng(seed)
    X = g.standard_normal((K, n)) * g.uniform(0.3, 2, (K, 1)) + 0.3
    W = g.standard_normal((N, K))
    Y = W @ X + g.standard_normal((N, 1)) + 0.1 * g.standard_normal((N, n))
    return X, Y, W


@pytest.mark.parametrize("damping", [0.0, 0.02])
def test_masked_fit_rows_equal_per_row_lstsq(damping):
    X, Y, W = pruning_case()
    mask = rng(15).random(W.shape) > 0.5
    mask[1] = mask[0]  # rows sharing a kept set
    mask[2] = False
    m = df.Moments.of(X, Y)
    lam = df.damping_of(m.xx, damping)
    Wf, c = pf.masked_fit(m, mask, damping=damping)
    assert not Wf[~mask].any()
    for i in range(W.shape[0]):
        S = np.nonzero(mask[i])[0]
        a, ci = lstsq_with_bias(X[S], Y[i:i + 1], lam)
        np.testing.assert_allclose(Wf[i, S], a[0], atol=1e-9)
        assert c[i] == pytest.approx(ci[0], abs=1e-9)


def test_obs_step_equals_brute_force_single_removal():
    X, Y, _ = pruning_case(seed=16, N=1, K=6)
    m = df.Moments.of(X, Y)
    H = m.centered()[0]
    alive = np.ones(6, bool)
    w = pf.masked_fit(m, alive[None], damping=0.0)[0][0]
    for _ in range(3):  # three greedy steps; each equals the best single removal
        q, w_new, inc = pf.obs_remove_one(w, H, alive)
        errs = {}
        for cand in np.nonzero(alive)[0]:
            keep = alive.copy()
            keep[cand] = False
            Wk, ck = pf.masked_fit(m, keep[None], damping=0.0)
            errs[cand] = (m.sq_error(Wk, ck), Wk[0])
        best = min(errs, key=lambda k: errs[k][0])
        assert q == best
        np.testing.assert_allclose(w_new, errs[best][1], atol=1e-8)
        before = m.sq_error(w[None], m.ybar - w @ m.xbar)
        assert errs[best][0] - before == pytest.approx(inc, rel=1e-7)
        alive[q] = False
        w = w_new


def test_sparsegpt_exact_on_prefix_masks_and_hits_sparsity():
    X, Y, _ = pruning_case(seed=17, N=6, K=9)
    m = df.Moments.of(X, Y)
    # when each row prunes a prefix of the column order, the sequential OBS updates are exact
    mask = np.ones((6, 9), bool)
    for i, p in enumerate([0, 1, 2, 3, 5, 8]):
        mask[i, :p] = False
    for bs in (2, 128):
        W, c, got_mask = pf.sparsegpt(m, mask=mask, damping=0.01, blocksize=bs)
        Wr, cr = pf.masked_fit(m, mask, damping=0.01)
        np.testing.assert_allclose(W, Wr, atol=1e-8)
        np.testing.assert_allclose(c, cr, atol=1e-8)
        np.testing.assert_array_equal(got_mask, mask)
    W, c, keep = pf.sparsegpt(m, sparsity=0.5, blocksize=3)
    assert [int((~keep[:, i:i + 3]).sum()) for i in range(0, 9, 3)] == [9, 9, 9]  # per block
    assert not W[~keep].any()
    dense = pf.sparsegpt(m, sparsity=0.0)[0]
    np.testing.assert_allclose(dense, df.ridge_fit(m)[0], atol=1e-10)


def test_sparsegpt_beats_magnitude_pruning_on_correlated_inputs():
    g = rng(18)
    base = g.standard_normal((4, 400))
    X = np.vstack([base, base + 0.05 * g.standard_normal((4, 400))])  # pairs of near-copies
    W = g.standard_normal((10, 8))
    Y = W @ X
    m = df.Moments.of(X, Y)
    Ws, cs, keep = pf.sparsegpt(m, sparsity=0.5, damping=0.001)
    mag = np.abs(W) >= np.median(np.abs(W), axis=None)
    Wm, cm = pf.masked_fit(m, mag, damping=0.001)
    Wk, ck = pf.masked_fit(m, keep, damping=0.001)
    assert m.sq_error(Wk, ck) <= m.sq_error(Ws, cs) + 1e-9  # re-solving never hurts
    assert m.sq_error(Ws, cs) < m.sq_error(Wm, cm)


# --- the real-Caffe LeNet: data-aware vs data-free factorization of conv2 ------------

def pool2x2(a):
    """2x2 stride-2 MAX pooling of an even-sized NCHW map (Caffe's rounding does not matter here)."""
    return np.maximum(np.maximum(a[:, :, ::2, ::2], a[:, :, 1::2, ::2]), np.maximum(a[:, :, ::2, 1::2], a[:, :, 1::2, 1::2]))


def lenet_forward(net, x, conv2=None):
    """Numpy forward of LeNet; ``conv2``: a callable replacing conv2 (pool1 -> conv2 output)."""
    L = {layer.name: layer for layer in net.layers}
    a = df.conv2d(x, L["conv1"].blobs[0], L["conv1"].blobs[1])
    p1 = a = pool2x2(a)
    a = conv2(p1) if conv2 else df.conv2d(p1, L["conv2"].blobs[0], L["conv2"].blobs[1])
    c2 = a
    a = pool2x2(a).reshape(a.shape[0], -1) @ L["ip1"].blobs[0].T + L["ip1"].blobs[1]
    a = np.maximum(a, 0) @ L["ip2"].blobs[0].T + L["ip2"].blobs[1]
    return {"pool1": p1, "conv2": c2, "ip2": a}


@pytest.fixture(scope="module")
def lenet():
    from conftest import SHARED, lenet_files, require_shared
    from lrprune_caffe.io.caffe import load_net
    d, proto, weights = lenet_files()
    split = SHARED / "data" / "mnist5k_split.npz"
    require_shared(split)
    with np.load(split) as z:
        data = {k: z[k] for k in z.files}
    net = load_net(proto, weights)
    with np.load(d / "blobs.npz") as z:
        golden = {"ip2": z["ip2"]}
    return net, data, golden


def test_lenet_conv2_data_aware_factorization_shrinks_output_error(lenet):
    from lrprune_caffe.lowrank import decompose as dec
    net, data, golden = lenet
    x_cal = data["x_train"][:512, None].astype(np.float64) / 256
    x_test = data["x_test"][:, None].astype(np.float64) / 256
    ref_test = lenet_forward(net, x_test)
    np.testing.assert_allclose(ref_test["ip2"], golden["ip2"], atol=1e-4)  # our forward is Caffe's
    W, b = net.layer("conv2").blobs
    r = 15  # channel rank with 64 r (500 + 50) <= 1/3 of conv2's 64 * 50 * 500 MACs
    assert 64 * r * 550 * 3 <= 64 * 50 * 500 < 64 * (r + 1) * 550 * 3
    W1f, W2f, _ = dec.channel_decompose(W, r)

    cal = lenet_forward(net, x_cal)
    pos = df.sample_positions(512, 8, 8, max_per_image=32, seed=0)
    Y = df.responses(cal["conv2"], pos)
    Xc = df.im2col(cal["pool1"], 5, positions=pos)
    Wm = W.reshape(50, -1).astype(np.float64)
    W1z, W2z, b2z = df.zhang_fit(Wm, b, df.Moments.of(Y, Y), r)
    A, c = df.ridge_fit(df.Moments.of(W1z @ Xc, Y), prior=W2z)  # refit of the last factor

    def chain(W1, W2, b2):
        return lambda p: df.conv2d(df.conv2d(p, W1.reshape(r, 20, 5, 5)), W2.reshape(50, r, 1, 1), b2)

    def rel(out):
        return float(np.linalg.norm(out["conv2"] - ref_test["conv2"]) / np.linalg.norm(ref_test["conv2"]))

    free = lenet_forward(net, x_test, chain(W1f, W2f, b))
    zhang = lenet_forward(net, x_test, chain(W1z, W2z, b2z))
    refit = lenet_forward(net, x_test, chain(W1z, A, c))
    errs = [rel(free), rel(zhang), rel(refit)]
    assert errs[1] < 0.8 * errs[0] and errs[2] <= errs[1] * 1.01, errs
    top1 = [float(np.mean(o["ip2"].argmax(1) == data["y_test"])) for o in (free, zhang, refit)]
    assert top1[1] >= top1[0] - 0.002, top1
