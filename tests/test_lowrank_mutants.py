"""lowrank behaviour the mutation run (tools/mutation.py) found untested, against values worked
out by hand or by numpy's own least squares / SVD (not our code against itself)."""

from __future__ import annotations

import numpy as np
import pytest

from lrprune_caffe.lowrank.datafit import Moments, conv_out_size
from lrprune_caffe.lowrank.prunefit import masked_fit
from lrprune_caffe.lowrank.svd_methods import low_rank_factors, svd


def test_conv_out_size_defaults_are_caffes():
    """Caffe's defaults: stride 1, pad 0, dilation 1: (size - kernel) + 1."""
    assert conv_out_size(10, 3) == 8
    assert conv_out_size(28, 5) == 24
    assert conv_out_size(7, 3, 2, 1) == 4  # (7 + 2 - 3) // 2 + 1
    assert conv_out_size(9, 3, dilation=2) == 5  # extent 5


@pytest.mark.parametrize("X, Y", [
    (np.ones(4), np.ones((2, 4))),          # X 1-D
    (np.ones((3, 4)), np.ones(4)),          # Y 1-D
    (np.ones((3, 4)), np.ones((2, 5))),     # a different number of samples
])
def test_moments_refuse_mismatched_samples(X, Y):
    with pytest.raises(ValueError, match="must be \\(K, n\\) and \\(N, n\\)"):
        Moments().add(X, Y)


def test_masked_fit_fits_an_intercept_by_default():
    """Y = W X + c exactly: the default fit finds W and c as numpy's least squares with a column
    of ones does (exactly when undamped, nearly with the default damping); intercept=False: c = 0."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 400)) + 2.0
    W = rng.standard_normal((3, 5))
    c = np.array([4.0, -3.0, 0.5])
    Y = W @ X + c[:, None]
    m = Moments().add(X, Y)
    sol = np.linalg.lstsq(np.vstack([X, np.ones(400)]).T, Y.T, rcond=None)[0].T
    W_ls, c_ls = sol[:, :5], sol[:, 5]
    np.testing.assert_allclose(c_ls, c, atol=1e-9)
    W_fit, c_fit = masked_fit(m, np.ones((3, 5), bool), damping=0.0)  # undamped: exactly least squares
    np.testing.assert_allclose(W_fit, W_ls, atol=1e-8)
    np.testing.assert_allclose(c_fit, c_ls, atol=1e-8)
    W_fit, c_fit = masked_fit(m, np.ones((3, 5), bool))  # the default light ridge shrinks W a little
    np.testing.assert_allclose(W_fit, W_ls, rtol=0.1, atol=0.05)
    np.testing.assert_allclose(c_fit, c_ls, atol=0.5)
    _, c0 = masked_fit(m, np.ones((3, 5), bool), intercept=False)
    assert np.all(c0 == 0)


@pytest.mark.parametrize("shape", [(60, 8), (8, 60)])
def test_full_rank_factors_of_a_rank_deficient_matrix_are_finite(shape):
    """Exact zero singular values (a 3 x 3 block in zeros): the Gram route's factors stay
    finite and A @ B is the matrix itself, as numpy's SVD says it is rank 3."""
    rng = np.random.default_rng(1)
    M = np.zeros(shape)
    M[:3, :3] = rng.standard_normal((3, 3))
    assert np.linalg.matrix_rank(M) == 3
    r = min(shape)
    res = svd(M, method="gram")
    A, B = low_rank_factors(M, r, res=res)
    assert np.isfinite(A).all() and np.isfinite(B).all()
    np.testing.assert_allclose(A @ B, M, atol=1e-12)


def test_two_factor_layer_choices_by_hand():
    """A two-factor layer (Tucker-2): each configuration's error is the discarded energy share of
    each factor at its rank, added: e1 = 4,2,1,1 (of 8), e2 = 6,1,1 (of 8), ranks up to 2 each."""
    from lrprune_caffe.lowrank.budget import BudgetLayer, layer_choices
    layer = BudgetLayer("t", 1000, (np.array([4.0, 2, 1, 1]), np.array([6.0, 1, 1])), (2, 2),
                        lambda rs: 10 * np.asarray(rs[0]) + 100 * np.asarray(rs[1]))
    ch = layer_choices(layer, "energy")
    got = {tuple(int(v) for v in r): (float(m), float(e)) for r, m, e in zip(ch.ranks, ch.macs, ch.err)}
    assert got == {(1, 1): (110.0, 4 / 8 + 2 / 8), (1, 2): (210.0, 4 / 8 + 1 / 8),
                   (2, 1): (120.0, 2 / 8 + 2 / 8), (2, 2): (220.0, 2 / 8 + 1 / 8)}


def test_rank_candidates_of_a_two_factor_table_by_hand():
    """Two rank axes: ``points_2d`` ranks per axis from 1 to the table's largest (rounded, unique),
    every pair, errors the discarded energy shares added (e1 = 4,2,1,1 of 8; e2 = 6,1,1 of 8)."""
    from types import SimpleNamespace

    from lrprune_caffe.lowrank.latency_budget import rank_candidates
    table = SimpleNamespace(axes=[np.array([1, 2, 4]), np.array([1, 3])])
    e1, e2 = np.array([4.0, 2, 1, 1]), np.array([6.0, 1, 1])
    ranks, err = rank_candidates([e1, e2], table, "energy")
    tail1, tail2 = {1: 4 / 8, 2: 2 / 8, 3: 1 / 8, 4: 0.0}, {1: 2 / 8, 2: 1 / 8, 3: 0.0}
    want = {(a, b): tail1[a] + tail2[b] for a in (1, 2, 3, 4) for b in (1, 2, 3)}
    assert {tuple(int(v) for v in r): float(e) for r, e in zip(ranks, err)} == want
    table = SimpleNamespace(axes=[np.array([1, 10]), np.array([1, 3])])
    ranks, _ = rank_candidates([np.ones(10), e2], table, "energy", points_2d=4)
    assert sorted({int(r) for r in ranks[:, 0]}) == [1, 4, 7, 10]  # linspace(1, 10, 4)
    table = SimpleNamespace(axes=[np.array([1, 2, 3])])  # one axis: every rank 1..3
    ranks, err = rank_candidates([e1], table, "energy")
    assert ranks.ravel().tolist() == [1, 2, 3] and err.tolist() == [4 / 8, 2 / 8, 1 / 8]


def test_svd_energies_are_the_squared_singular_values():
    rng = np.random.default_rng(3)
    M = rng.standard_normal((30, 7))
    s = np.linalg.svd(M, compute_uv=False)
    for method in ("exact", "gram"):
        np.testing.assert_allclose(svd(M, method=method).energies, s ** 2, rtol=1e-9)
