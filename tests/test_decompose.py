"""Pure numerics of lrprune_caffe.lowrank: decompositions (Eckart-Young, exactness at full
rank, Tucker-2 / HOOI), SVD back ends, and rank selection (energy, VBMF, MAC budget)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg as sla

from lrprune_caffe.lowrank import decompose as dec, rank as rk, svd_methods as svd_backends

METHODS = ["gram", "exact"]


def weights(shape, seed=0, decay=0.85):
    """Random weights with a decaying spectrum (like trained ones), float32."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(shape)
    n = shape[0]
    W *= (decay ** np.arange(n))[:, None, None, None] if W.ndim == 4 else (decay ** np.arange(n))[:, None]
    return W.astype(np.float32)


def discarded(mats, r):
    return sum(float(np.sum(sla.svdvals(np.asarray(M, np.float64))[r:] ** 2)) for M in mats)


def sq_err(W, W_hat):
    return float(np.sum((np.asarray(W, np.float64) - W_hat) ** 2))


# --- Eckart-Young: ||W - W_r||^2 == sum of discarded sigma^2 -------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_eckart_young_conv(scheme, group, method):
    W = weights((16, 6, 3, 5), seed=group)
    fn = dec.channel_decompose if scheme == "channel" else dec.spatial_decompose
    mat = dec.channel_matrix if scheme == "channel" else dec.spatial_matrix
    mats = [mat(g) for g in np.split(W, group)]
    r = min(mats[0].shape) // 2
    W1, W2, info = fn(W, r, group=group, method=method)
    W_hat = dec.reconstruct(scheme, (W1, W2), group)
    expected = discarded(mats, r)
    assert expected > 0.01 * float(np.sum(W.astype(np.float64) ** 2))  # a real truncation
    assert sq_err(W, W_hat) == pytest.approx(expected, rel=1e-5)
    total = float(np.sum(W.astype(np.float64) ** 2))
    assert 1 - info["energy_kept"] == pytest.approx(expected / total, rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
def test_eckart_young_fc(shape, method):
    W = weights(shape, seed=3, decay=0.95)
    r = 12
    W1, W2, info = dec.fc_decompose(W, r, method=method)
    assert W1.shape == (r, shape[1]) and W2.shape == (shape[0], r)
    assert sq_err(W, W2.astype(np.float64) @ W1) == pytest.approx(discarded([W], r), rel=1e-5)


def test_eckart_young_float32_gram_route(monkeypatch):
    """The float32 Gram route (used above GRAM64_MAX_SIDE) still gives the optimum closely."""
    monkeypatch.setattr(svd_backends, "GRAM64_MAX_SIDE", 8)
    W = weights((30, 200), seed=5, decay=0.9)
    r = 10
    W1, W2, _ = dec.fc_decompose(W, r)
    assert W1.dtype == np.float32
    assert sq_err(W, W2.astype(np.float64) @ W1) == pytest.approx(discarded([W], r), rel=1e-4)


def test_singular_values_agree():
    W = weights((50, 120), seed=1)
    ref = sla.svdvals(W.astype(np.float64))
    np.testing.assert_allclose(dec.singular_values(W, "gram"), ref, rtol=1e-9, atol=1e-9 * ref[0])
    np.testing.assert_allclose(dec.singular_values(W.T, "exact"), ref, rtol=1e-12)


def test_randomized_svd_is_seeded_and_near_optimal():
    W = weights((60, 150), seed=2, decay=0.9)
    a = dec.randomized_svd(W, 8, seed=7)
    b = dec.randomized_svd(W, 8, seed=7)
    np.testing.assert_array_equal(a.U, b.U)
    A, B = dec.low_rank_factors(W, 8, a)
    assert sq_err(W, A @ B) == pytest.approx(discarded([W], 8), rel=1e-6)


# --- exactness at full rank, all schemes -------------------------------------------

@pytest.mark.parametrize("group", [1, 3])
def test_full_rank_is_exact(group):
    W = weights((12, 4, 3, 3), seed=4)  # C = 4 * group inputs in the layer
    n, c = 12 // group, 4
    W = W[: n * group]
    for scheme, fn, r in (("channel", dec.channel_decompose, min(n, c * 9)),
                          ("spatial", dec.spatial_decompose, min(c * 3, 3 * n))):
        W1, W2, _ = fn(W, r, group=group)
        np.testing.assert_allclose(dec.reconstruct(scheme, (W1, W2), group), W, atol=1e-5)
    W1, W2, W3, info = dec.tucker2_decompose(W, (c, n), group=group)
    assert W1.shape == (group * c, c, 1, 1) and W2.shape == (group * n, c, 3, 3) and W3.shape == (12, n, 1, 1)
    np.testing.assert_allclose(dec.reconstruct("tucker2", (W1, W2, W3), group), W, atol=1e-5)
    assert info["energy_kept"] == pytest.approx(1.0, abs=1e-9)


def test_spatial_layout_matches_the_two_convolutions():
    """W[o, c, i, j] == sum_k V[o, k, 0, j] H[k, c, i, 0]: the kh x 1 then 1 x kw chain."""
    W = weights((5, 3, 3, 2), seed=8)
    H, V, _ = dec.spatial_decompose(W, 9)  # full rank: min(c kh, kw n) = 9
    assert H.shape == (9, 3, 3, 1) and V.shape == (5, 9, 1, 2)
    direct = np.einsum("okj,kci->ocij", V[:, :, 0, :].astype(np.float64), H[:, :, :, 0])
    np.testing.assert_allclose(direct, W, atol=1e-5)


# --- Tucker-2 ------------------------------------------------------------------------

def test_tucker2_error_is_discarded_core_energy_and_hooi_helps():
    W = weights((24, 16, 3, 3), seed=9, decay=0.9)
    total = float(np.sum(W.astype(np.float64) ** 2))
    errs = []
    for iters in (0, 3):
        W1, W2, W3, info = dec.tucker2_decompose(W, (6, 8), hooi_iters=iters)
        e = sq_err(W, dec.reconstruct("tucker2", (W1, W2, W3)))
        assert e == pytest.approx(total * (1 - info["energy_kept"]), rel=1e-5)
        errs.append(e)
    assert errs[1] <= errs[0] * (1 + 1e-9)
    # HOSVD quasi-optimality bound: error <= sum of both modes' discarded energies
    bound = discarded([dec.channel_matrix(W)], 8) + discarded([dec.mode1_matrix(W)], 6)
    assert errs[0] <= bound * (1 + 1e-9)


# --- rank selection ----------------------------------------------------------------

def test_energy_rank():
    e = np.array([50.0, 30, 10, 5, 5])
    assert rk.energy_rank(e, 0.5) == 1
    assert rk.energy_rank(e, 0.8) == 2
    assert rk.energy_rank(e, 0.81) == 3
    assert rk.energy_rank(e, 1.0) == 5


@pytest.mark.parametrize("true_rank", [3, 8])
def test_vbmf_recovers_the_rank_of_signal_plus_noise(true_rank):
    rng = np.random.default_rng(true_rank)
    L, M = 60, 150
    signal = rng.standard_normal((L, true_rank)) @ rng.standard_normal((true_rank, M))
    Y = signal + 0.1 * rng.standard_normal((L, M))
    s = sla.svdvals(Y)
    assert rk.evbmf_rank(s, L, M) == true_rank
    assert rk.evbmf_rank(s, M, L) == true_rank  # orientation does not matter


def test_vbmf_ranks_per_mode_and_group():
    W = weights((16, 4, 3, 3), seed=1)  # group 2: n = 8 outputs, c = 4 inputs per group
    spectra = dec.scheme_spectra(W, "tucker2", group=2)
    assert [m.shape for m in spectra] == [(4, 72), (8, 36)]
    r1, r2 = rk.vbmf_ranks(spectra)
    assert 1 <= r1 <= 4 and 1 <= r2 <= 8


def test_pareto_and_hull():
    macs = np.array([10, 20, 30, 40, 25])
    err = np.array([0.9, 0.5, 0.4, 0.1, 0.6])  # (25, 0.6) is dominated by (20, 0.5)
    front = rk.pareto_front(macs, err, macs_before=50)
    assert list(macs[front]) == [10, 20, 30, 40]
    x = np.array([10, 20, 30, 40, 50.0])
    y = np.array([0.9, 0.5, 0.4, 0.1, 0.0])
    assert rk.lower_hull(x, y) == [0, 1, 3, 4]  # (30, 0.4) lies above the hull


def _options(name, macs_before, per_rank, energies):
    r = np.arange(1, len(energies) + 1)
    return rk.LayerChoices(name, macs_before, (per_rank * r).astype(float), rk.tail_errors(energies), r[:, None])


def test_budget_spends_cuts_where_they_cost_least():
    # layer a is exactly rank 2: cutting it to 2 is free; layer b has a flat spectrum
    a = _options("a", 1000, 50, [5.0, 5.0, 0, 0, 0, 0, 0, 0])
    b = _options("b", 1000, 50, [1.0] * 8)
    choice = rk.budget_allocation([a, b], target_macs=1500)
    assert choice["a"] is not None and a.ranks[choice["a"], 0] == 2
    assert choice["b"] is None  # 2000 -> 1100 from a alone meets 1500


def test_budget_meets_the_target_and_matches_brute_force_on_small_problems():
    rng = np.random.default_rng(0)
    for trial in range(20):
        layers = []
        for i in range(3):
            k = int(rng.integers(2, 6))
            e = np.sort(rng.random(k) ** 3)[::-1]
            per = int(rng.integers(5, 40))
            layers.append(_options(f"l{i}", int(per * k * rng.uniform(0.6, 1.2)) + 1, per, e))
        before = sum(o.macs_before for o in layers)
        target = before / rng.uniform(1.2, 2.5)
        try:
            choice = rk.budget_allocation(layers, target)
        except ValueError:
            best = sum(min(o.macs_before, o.macs.min()) for o in layers)
            assert best > target
            continue
        total = sum(o.macs_before if choice[o.name] is None else o.macs[choice[o.name]] for o in layers)
        err = sum(0 if choice[o.name] is None else o.err[choice[o.name]] for o in layers)
        assert total <= target + 1e-9
        # brute force over every combination (None = left alone)
        best = np.inf
        for combo in itertools.product(*[[None] + list(range(len(o.macs))) for o in layers]):
            t = sum(o.macs_before if c is None else o.macs[c] for o, c in zip(layers, combo))
            if t <= target:
                best = min(best, sum(0 if c is None else o.err[c] for o, c in zip(layers, combo)))
        # greedy on the convex hull is optimal up to the last segment's step
        assert err <= best + max(float(np.max(o.err)) for o in layers) + 1e-12


def test_budget_stops_at_the_first_front_point_that_meets_the_target():
    """One layer, worked by hand: front (10, .5) (60, .3) (80, .25), left alone (100, 0).
    (60, .3) and (80, .25) lie above the hull segment (10, .5) -> (100, 0), so the greedy
    has one segment; it must stop at the most expensive front point that meets the target
    (the exact optimum here), not run on to the segment's cheap end."""
    o = rk.LayerChoices("a", 100, np.array([10.0, 60, 80]), np.array([0.5, 0.3, 0.25]), np.array([[1], [2], [3]]))
    assert rk.lower_hull(np.array([10.0, 60, 80, 100]), np.array([0.5, 0.3, 0.25, 0])) == [0, 3]
    for target, want in ((95, 2), (85, 2), (80, 2), (75, 1), (60, 1), (59, 0), (10, 0), (100, None)):
        assert rk.budget_allocation([o], target) == {"a": want}, target


BUDGET_A = rk.LayerChoices("A", 100, np.array([20.0, 40, 70]), np.array([0.6, 0.2, 0.15]), np.array([[1], [2], [3]]))
BUDGET_B = rk.LayerChoices("B", 100, np.array([50.0]), np.array([0.25]), np.array([[1]]))


@pytest.mark.parametrize("target, fixed, want", [
    (200, 0, {"A": None, "B": None}),  # nothing to cut
    (170, 0, {"A": 2, "B": None}),     # inside A's first segment: (70, .15) meets it
    (190, 20, {"A": 2, "B": None}),    # the same with 20 fixed MACs counted
    (150, 0, {"A": 1, "B": None}),     # (70) saves only 30 < 50: (40, .2)
    (100, 0, {"A": 1, "B": 0}),        # A's segment whole (140), then B's (90)
    (80, 0, {"A": 0, "B": 0}),         # then A's second segment (70)
])
def test_budget_exact_two_layer_configurations(target, fixed, want):
    """Worked by hand. A: front (20, .6) (40, .2) (70, .15), left alone (100, 0); (70, .15)
    is above the hull, so A's segments are 100 -> 40 (slope .2/60) and 40 -> 20 (.4/20).
    B: one segment 100 -> 50 (.25/50). Greedy order: A1 (.0033), B (.005), A2 (.02).
    Each expected choice is also the exact optimum (checked by enumeration)."""
    assert rk.budget_allocation([BUDGET_A, BUDGET_B], target, fixed_macs=fixed) == want
    best = None
    for a, b in itertools.product([None, 0, 1, 2], [None, 0]):
        t = fixed + (100 if a is None else BUDGET_A.macs[a]) + (100 if b is None else 50)
        e = (0 if a is None else BUDGET_A.err[a]) + (0 if b is None else 0.25)
        if t <= target and (best is None or e < best[0] - 1e-12):
            best = (e, {"A": a, "B": b})
    assert best[1] == want


def test_budget_unreachable_reports_the_best_total():
    a = _options("a", 100, 60, [1.0, 1.0])  # rank 1 costs 60
    with pytest.raises(ValueError) as e:
        rk.budget_allocation([a], target_macs=50, fixed_macs=10)
    assert e.value.args[0] == pytest.approx(70)


@pytest.mark.parametrize("rank", [4, 25])  # below m/3: leading eigenpairs only; above: all
def test_lazy_vectors_after_spectra(monkeypatch, rank):
    """Rank selection computes singular values only; the truncation computes the vectors it needs."""
    monkeypatch.setattr(svd_backends, "LAZY_VECTORS_SIDE", 8)
    W = weights((40, 100), seed=6, decay=0.93)
    cache = {}
    (mode,) = dec.scheme_spectra(W, "fc", cache=cache)
    (res,) = cache.values()
    assert res.U is None and res.gram is not None
    np.testing.assert_allclose(mode.s[0], sla.svdvals(W.astype(np.float64)), rtol=1e-9)
    W1, W2, _ = dec.fc_decompose(W, rank, cache=cache)
    assert res.U is not None
    assert sq_err(W, W2.astype(np.float64) @ W1) == pytest.approx(discarded([W], rank), rel=1e-6)


def test_lazy_vectors_grow_with_a_later_larger_rank(monkeypatch):
    """A lazy result asked first for 3 vectors (leading eigenpairs only), then for 30, gives
    the best rank-30 approximation (Eckart-Young), not 3 vectors padded out."""
    monkeypatch.setattr(svd_backends, "LAZY_VECTORS_SIDE", 8)
    W = weights((40, 100), seed=7, decay=0.95)
    cache = {}
    res = svd_backends.svd(W, vectors=False, cache=cache, key="w")
    A, B = svd_backends.low_rank_factors(W, 3, res=res)
    assert sq_err(W, A @ B) == pytest.approx(discarded([W], 3), rel=1e-6)
    A, B = svd_backends.low_rank_factors(W, 30, res=res)
    assert A.shape == (40, 30) and B.shape == (30, 100)
    assert sq_err(W, A @ B) == pytest.approx(discarded([W], 30), rel=1e-6)


def test_svd_methods_are_the_ones_asked_for():
    W = weights((12, 20), seed=8)
    assert svd_backends.svd(W, method="exact").method == "exact" and svd_backends.svd(W, method="exact").side == "both"
    assert svd_backends.svd(W, method="gram").method == "gram" and svd_backends.svd(W).method == "gram"  # auto: Gram route
    with pytest.raises(ValueError, match="randomized SVD needs the rank"):
        svd_backends.svd(W, method="randomized")
    with pytest.raises(ValueError, match="unknown SVD method 'lapack'"):
        svd_backends.svd(W, method="lapack")


def test_left_vectors_span_the_leading_subspace():
    W = weights((15, 40), seed=9).astype(np.float64)
    U = sla.svd(W)[0][:, :4]
    for kw in ({}, {"method": "exact"}, {"res": svd_backends.svd(W, side="right")}):
        L = svd_backends.left_vectors(W, 4, **kw)
        assert L.shape == (15, 4)
        np.testing.assert_allclose(L.T @ L, np.eye(4), atol=1e-8)
        np.testing.assert_allclose(L @ L.T, U @ U.T, atol=1e-6)  # the same projector


def test_scheme_spectra_default_is_one_group():
    W = weights((8, 6, 3, 3), seed=10).astype(np.float64)
    (mode,) = dec.scheme_spectra(W, "channel")
    np.testing.assert_allclose(np.ravel(mode.s), sla.svdvals(W.reshape(8, -1)), rtol=1e-9)
    assert len(mode.s) == 1


def test_energy_of_a_large_array_is_exact():
    M = np.full((2050, 2050), 0.5, np.float32)  # above the 4M-element block size
    assert svd_backends._energy(M) == 2050 * 2050 * 0.25


@pytest.mark.parametrize("L, M, sigma2", [(100, 100, 1.0), (40, 80, 2.0)])
def test_evbmf_threshold_with_known_noise(L, M, sigma2):
    """Nakajima et al. 2013, Theorem 2: with sigma^2 given, a component is kept iff
    s > sqrt(M sigma^2 (1 + tau) (1 + alpha / tau)), alpha = L / M, tau = 2.5129 sqrt(alpha)."""
    import math
    alpha = L / M
    tau = 2.5129 * math.sqrt(alpha)
    th = math.sqrt(M * sigma2 * (1 + tau) * (1 + alpha / tau))
    assert rk.evbmf_rank(np.array([th * 1.001, th * 0.999, 0.1]), L, M, sigma2=sigma2) == 1
    assert rk.evbmf_rank(np.array([th * 1.2, th * 1.001, th * 0.999]), M, L, sigma2=sigma2) == 2  # L > M: swapped


def test_evbmf_degenerate_spectra():
    assert rk.evbmf_rank(np.zeros(4), 4, 6) == 0  # a zero matrix carries no signal
    assert rk.evbmf_rank(np.zeros((0,)), 4, 6) == 0
    assert rk.evbmf_rank(np.array([3.0]), 1, 6) == 1
    zero = dec.scheme_spectra(np.zeros((8, 4, 3, 3), np.float32), "tucker2")
    assert rk.vbmf_ranks(zero) == (1, 1)  # a factorization needs rank >= 1


@pytest.mark.parametrize("true_rank", [1, 3, 8])
def test_evbmf_exact_low_rank_with_exact_zeros(true_rank):
    """A noise-free rank-r matrix: exact zeros in the spectrum say the noise is nil, so the
    rank is r (the free energy once took log(0) there and chose r - 1 for r = 8)."""
    L, M = 60, 150
    s = np.zeros(L)
    s[:true_rank] = np.linspace(10.0, 2.0, true_rank)  # hand-made: r nonzero values, L - r zeros
    with np.errstate(all="raise"):  # no log(0), no 0/0
        assert rk.evbmf_rank(s, L, M) == true_rank
        assert rk.evbmf_rank(s, M, L) == true_rank
    # the same spectrum with the zeros replaced by round-off: no jump at exactly 0
    assert rk.evbmf_rank(np.where(s > 0, s, 1e-14), L, M) == true_rank
    # a rank-r matrix built by hand: zero rows give LAPACK's exact zeros
    rng = np.random.default_rng(true_rank)
    Y = np.zeros((L, M))
    Y[:true_rank] = rng.standard_normal((true_rank, M))
    sv = sla.svdvals(Y)
    assert (sv[true_rank:] == 0).all() and rk.evbmf_rank(sv, L, M) == true_rank


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, 1e3])
def test_evbmf_is_scale_invariant(scale):
    """EVBMF's rank of c * Y is that of Y (sigma^2 scales with c^2). The noise variance of
    small weights (1e-4..1e-8) was once searched with an absolute tolerance of 1e-5."""
    rng = np.random.default_rng(3)
    L, M, r = 64, 576, 3
    # signal singular values 4.5-5.5 over a noise bulk ending at 3.1 (0.1 * (sqrt(L) + sqrt(M)) = 3.2)
    Y = rng.standard_normal((L, r)) @ rng.standard_normal((r, M)) / np.sqrt(M) * 0.5 + 0.1 * rng.standard_normal((L, M))
    s = sla.svdvals(Y)
    assert s[r - 1] > 1.4 * s[r]
    assert rk.evbmf_rank(s * scale, L, M) == r


def test_tucker2_default_is_plain_hosvd():
    W = weights((6, 5, 3, 3), seed=11)
    plain = dec.tucker2_decompose(W, (3, 2))
    hosvd = dec.tucker2_decompose(W, (3, 2), hooi_iters=0)
    for a, b in zip(plain[:3], hosvd[:3]):
        np.testing.assert_array_equal(a, b)
