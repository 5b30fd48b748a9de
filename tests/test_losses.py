"""Losses and aggregation vs the float64 references of tests/np_reference.py."""

import functools

import chex
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest

from actfocus_jax.rl import losses

MODES = losses.LOSS_AGG_MODES
B, L = 4, 11
TOL = dict(rtol=2e-5, atol=2e-6)


def _inputs(seed, *, empty_row=True):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 0.6, size=(B, L)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, size=(B, L))).astype(np.float32)
    advs = rng.normal(size=(B, L)).astype(np.float32)
    mask = rng.random((B, L)) < 0.7
    if empty_row:
        mask[2] = False
    weights = rng.uniform(0, 3, size=(B, L)).astype(np.float32)
    return logp, old, advs, mask, weights


def test_loss_agg_modes_constant():
    assert MODES == (
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-sum-norm",
    )


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_matches_reference(mode):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, L)).astype(np.float32)
    mask = rng.random((B, L)) < 0.5
    mask[1] = False  # empty row
    x_bad = x.copy()
    x_bad[~mask] = np.nan  # never reaches the result
    agg = jax.jit(losses.aggregate, static_argnames="mode")
    for norm in (None, 7.0):
        expected = ref.aggregate(x, mask, mode, norm_length=norm)
        np.testing.assert_allclose(
            losses.aggregate(x, mask, mode, norm_length=norm), expected, **TOL
        )
        np.testing.assert_allclose(agg(x_bad, mask, mode=mode, norm_length=norm), expected, **TOL)
    # All-empty batch: 0, not NaN.
    assert float(losses.aggregate(x, np.zeros_like(mask), mode)) == 0.0


def test_aggregate_semantics():
    x = np.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]], np.float32)
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    assert float(losses.aggregate(x, m, "token-mean")) == pytest.approx(10.0 / 4)
    # Empty rows count as 0 in the mean over the B = 3 rows.
    assert float(losses.aggregate(x, m, "seq-mean-token-mean")) == pytest.approx((2.0 + 4.0) / 3)
    assert float(losses.aggregate(x, m, "seq-mean-token-sum")) == pytest.approx((6.0 + 4.0) / 3)
    assert float(losses.aggregate(x, m, "seq-mean-token-sum-norm")) == pytest.approx(
        (6.0 / 4 + 4.0 / 4) / 3
    )


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match=r"token-mean.*seq-mean-token-sum-norm"):
        losses.aggregate(jnp.zeros((2, 2)), jnp.ones((2, 2)), "mean")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weighted", [False, True])
def test_policy_loss_matches_reference(mode, weighted):
    logp, old, advs, mask, weights = _inputs(MODES.index(mode) * 2 + int(weighted))
    w = weights if weighted else None
    kw = dict(clip_low=0.2, clip_high=0.28, loss_agg=mode)
    exp_loss, exp_pg, exp_ratio, exp_cf, _ = ref.policy_loss(logp, old, advs, mask, weights=w, **kw)
    loss, m = losses.policy_loss(logp, old, advs, mask, weights=w, **kw)
    fn = jax.jit(functools.partial(losses.policy_loss, **kw))
    loss_j, m_j = fn(logp, old, advs, mask, weights=w)
    for got, met in ((loss, m), (loss_j, m_j)):
        np.testing.assert_allclose(got, exp_loss, **TOL)
        np.testing.assert_allclose(met.pg_loss_per_token, exp_pg, **TOL)
        np.testing.assert_allclose(met.ratio, exp_ratio, **TOL)
        np.testing.assert_allclose(met.clip_frac, exp_cf, **TOL)
        unweighted = ref.aggregate(exp_pg, mask, mode)
        np.testing.assert_allclose(met.pg_loss_unweighted, unweighted, **TOL)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_dual_clip(mode):
    logp, old, advs, mask, weights = _inputs(7)
    logp = (old + np.random.default_rng(8).normal(0, 1.5, size=(B, L))).astype(np.float32)
    kw = dict(clip_low=0.1, clip_high=0.3, loss_agg=mode, dual_clip=3.0, loss_agg_norm=16.0)
    exp_loss, exp_pg, _, exp_cf, exp_dual = ref.policy_loss(
        logp, old, advs, mask, weights=weights, **kw
    )
    assert exp_dual > 0  # the test exercises the dual clip
    for fn in (losses.policy_loss, jax.jit(functools.partial(losses.policy_loss, **kw))):
        loss, m = (
            fn(logp, old, advs, mask, weights=weights, **kw)
            if fn is losses.policy_loss
            else fn(logp, old, advs, mask, weights=weights)
        )
        np.testing.assert_allclose(loss, exp_loss, **TOL)
        np.testing.assert_allclose(m.pg_loss_per_token, exp_pg, **TOL)
        np.testing.assert_allclose(m.clip_frac, exp_cf, **TOL)
        np.testing.assert_allclose(m.clip_frac_lower, exp_dual, **TOL)
    # Dual clip caps the loss of negative advantages at -A * c.
    cap = np.where(advs < 0, -advs * 3.0, np.inf)
    assert np.all(np.asarray(m.pg_loss_per_token) <= cap + 1e-5)
    with pytest.raises(ValueError, match="dual_clip"):
        losses.policy_loss(logp, old, advs, mask, dual_clip=1.0)


def test_policy_loss_metrics_and_robustness():
    logp, old, advs, mask, weights = _inputs(9)
    logp_bad, old_bad, adv_bad = logp.copy(), old.copy(), advs.copy()
    logp_bad[~mask], old_bad[~mask], adv_bad[~mask] = -np.inf, np.nan, np.inf
    loss, m = jax.jit(losses.policy_loss)(logp_bad, old_bad, adv_bad, mask, weights=weights)
    loss_ref, _ = losses.policy_loss(logp, old, advs, mask, weights=weights)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    chex.assert_tree_all_finite(m)
    chex.assert_shape([m.ratio, m.pg_loss_per_token, m.weighted_pg_loss_per_token], (B, L))
    chex.assert_shape(
        [m.clip_frac, m.approx_kl, m.approx_kl_k3, m.ratio_mean, m.weight_mean, m.num_tokens], ()
    )
    assert int(m.num_tokens) == mask.sum()
    lr = (logp - old)[mask].astype(np.float64)
    np.testing.assert_allclose(m.approx_kl, np.mean(-lr), **TOL)
    np.testing.assert_allclose(m.approx_kl_k3, np.mean(np.expm1(lr) - lr), **TOL)
    np.testing.assert_allclose(m.ratio_mean, np.mean(np.exp(lr)), **TOL)
    np.testing.assert_allclose(m.ratio_max, np.max(np.exp(lr)), **TOL)
    np.testing.assert_allclose(m.weight_mean, np.mean(weights[mask]), **TOL)
    # Gradient is finite despite garbage at masked-out positions.
    g = jax.grad(lambda lp: losses.policy_loss(lp, old_bad, adv_bad, mask, weights=weights)[0])(
        logp_bad
    )
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)


def test_policy_loss_on_policy_gradient_is_minus_advantage():
    # At ratio = 1, d loss / d logp_t = -A_t / count under token-mean.
    logp, _, advs, mask, _ = _inputs(10)
    g = jax.grad(lambda lp: losses.policy_loss(lp, logp, advs, mask)[0])(logp)
    np.testing.assert_allclose(g, np.where(mask, -advs / mask.sum(), 0.0), rtol=1e-5, atol=1e-7)


def test_policy_loss_shape_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="advantages"):
        losses.policy_loss(x, x, jnp.zeros((2, 4)), x)
    with pytest.raises(ValueError, match="loss_agg"):
        losses.policy_loss(x, x, x, x, loss_agg="sum")


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_matches_reference(kind):
    rng = np.random.default_rng(11)
    logp = rng.normal(-2, 1, size=(B, L)).astype(np.float32)
    ref_logp = (logp + rng.normal(0, 0.5, size=(B, L))).astype(np.float32)
    ref_logp[0, 0] = logp[0, 0] + 30.0  # exercises the +-20 clamp of k3
    expected = ref.kl_penalty(logp, ref_logp, kind)
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses.kl_penalty(logp, ref_logp, kind), expected, **tol)
    kl_j = jax.jit(losses.kl_penalty, static_argnames="kind")(logp, ref_logp, kind=kind)
    np.testing.assert_allclose(kl_j, expected, **tol)
    clamped = losses.kl_penalty(logp, ref_logp, kind, clamp=0.5)
    np.testing.assert_allclose(clamped, ref.kl_penalty(logp, ref_logp, kind, clamp=0.5), **tol)
    if kind in ("k2", "k3"):
        assert np.all(np.asarray(losses.kl_penalty(logp, ref_logp, kind)) >= 0)
    # Identical policies: zero KL.
    np.testing.assert_array_equal(losses.kl_penalty(logp, logp, kind), 0.0)


def test_kl_aliases_and_errors():
    a, b = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -0.5])
    for alias, canon in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        np.testing.assert_array_equal(
            losses.kl_penalty(a, b, alias), losses.kl_penalty(a, b, canon)
        )
    with pytest.raises(ValueError, match="k3"):
        losses.kl_penalty(a, b, "k4")


@pytest.mark.parametrize("mode", MODES)
def test_kl_and_entropy_losses(mode):
    logp, old, _, mask, weights = _inputs(12)
    for w in (None, weights):
        per = ref.kl_penalty(logp, old, "k3")
        if w is not None:
            per = per * w
        expected = ref.aggregate(per, mask, mode)
        got = losses.kl_loss(logp, old, mask, kind="k3", loss_agg=mode, weights=w)
        np.testing.assert_allclose(got, expected, **TOL)
        ent = -logp  # any non-negative per-token quantity
        exp_ent = ref.aggregate(ent if w is None else ent * w, mask, mode)
        np.testing.assert_allclose(losses.entropy_loss(ent, mask, mode, weights=w), exp_ent, **TOL)
    fn = jax.jit(functools.partial(losses.kl_loss, kind="k2", loss_agg=mode))
    np.testing.assert_allclose(
        fn(logp, old, mask), ref.aggregate(ref.kl_penalty(logp, old, "k2"), mask, mode), **TOL
    )


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("clip_range", [None, 0.2])
def test_value_loss_matches_reference(mode, clip_range):
    rng = np.random.default_rng(13)
    old_v = rng.normal(size=(B, L)).astype(np.float32)
    v = (old_v + rng.normal(0, 0.5, size=(B, L))).astype(np.float32)
    ret = rng.normal(size=(B, L)).astype(np.float32)
    mask = rng.random((B, L)) < 0.7
    exp_loss, exp_per, exp_cf = ref.value_loss(
        v, old_v, ret, mask, clip_range=clip_range, loss_agg=mode
    )
    fn = jax.jit(functools.partial(losses.value_loss, clip_range=clip_range, loss_agg=mode))
    for loss, m in (
        losses.value_loss(v, old_v, ret, mask, clip_range=clip_range, loss_agg=mode),
        fn(v, old_v, ret, mask),
    ):
        np.testing.assert_allclose(loss, exp_loss, **TOL)
        np.testing.assert_allclose(m.value_loss_per_token, exp_per, **TOL)
        np.testing.assert_allclose(m.clip_frac, exp_cf, **TOL)
        chex.assert_tree_all_finite(m)
        chex.assert_shape(m.value_loss_per_token, (B, L))
        chex.assert_shape([m.clip_frac, m.value_mean, m.return_mean, m.explained_variance], ())
    if clip_range is not None:
        assert exp_cf > 0
    # Gradient: only through `values`, finite.
    g = jax.grad(lambda x: losses.value_loss(x, old_v, ret, mask, clip_range=clip_range)[0])(v)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)
