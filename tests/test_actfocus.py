"""ActFocus token weights vs the float64 reference, edge cases, invariants and the PPO equivalence."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actfocus_jax.rl import actfocus, losses
from actfocus_jax.rollout import Role

B, L = 5, 24
SCOPES = ("trajectory", "turn")
NORMS = ("none", "preserve_sum")
TOL = dict(rtol=2e-5, atol=2e-6)

_jit_weights = jax.jit(
    actfocus.token_weights,
    static_argnames=("scope", "normalize"),
)


def _weights(roles, energies, turn_ids, **kw):
    """Direct call and jit call (hyper-parameters traced), checked equal; returns the direct one."""
    direct = actfocus.token_weights(roles, energies, turn_ids, **kw)
    jitted = _jit_weights(roles, energies, turn_ids, **kw)
    np.testing.assert_allclose(direct, jitted, rtol=1e-6, atol=1e-7)
    assert direct.dtype == jnp.float32 and direct.shape == np.shape(roles)
    return np.asarray(direct)


def _data(seed, *, layout=True, scale=2.0):
    rng = np.random.default_rng(seed)
    roles, turn_ids = ref.random_trajectories(rng, B, L, layout=layout)
    energies = (rng.exponential(size=(B, L)) * scale).astype(np.float32)
    return roles, energies, turn_ids


def _kw(**over):
    kw = dict(alpha=0.1, beta=1.0, tau=1.0, w_max=5.0, scope="trajectory", normalize="none")
    kw.update(over)
    return kw


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("normalize", NORMS)
@pytest.mark.parametrize("layout", [True, False])
def test_weights_match_reference(scope, normalize, layout):
    seed = SCOPES.index(scope) * 4 + NORMS.index(normalize) * 2 + int(layout)
    roles, energies, turn_ids = _data(seed, layout=layout)
    rng = np.random.default_rng(100 + seed)
    kw = _kw(
        alpha=float(rng.uniform(0, 1)),
        beta=float(rng.uniform(0, 1.5)),
        tau=float(rng.uniform(0.3, 2.0)),
        w_max=float(rng.uniform(1.5, 4.0)),
        scope=scope,
        normalize=normalize,
    )
    got = _weights(roles, energies, turn_ids, **kw)
    np.testing.assert_allclose(got, ref.token_weights(roles, energies, turn_ids, **kw), **TOL)


def test_scopes_differ_and_turn_scope_is_per_turn():
    roles = np.array([[1, 2, 2, 0, 1, 2, 2, 2]], np.int8)
    turn_ids = np.array([[0, 0, 0, 1, 1, 1, 1, 1]], np.int32)
    energies = np.array([[9.0, 0.0, 1.0, 9.0, 9.0, 2.0, 2.0, 2.0]], np.float32)
    w_turn = _weights(roles, energies, turn_ids, **_kw(scope="turn", w_max=100.0))
    # Turn 1's actions have equal energies: exactly 1 each. Turn 0's average 1.
    np.testing.assert_array_equal(w_turn[0, 5:], 1.0)
    np.testing.assert_allclose(w_turn[0, 1:3].mean(), 1.0, rtol=1e-6)
    w_traj = _weights(roles, energies, turn_ids, **_kw(scope="trajectory", w_max=100.0))
    np.testing.assert_allclose(w_traj[0, [1, 2, 5, 6, 7]].mean(), 1.0, rtol=1e-6)
    assert not np.allclose(w_turn, w_traj)
    np.testing.assert_array_equal(w_turn[0, [0, 4]], np.float32(0.1))
    assert w_turn[0, 3] == 0.0


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("normalize", NORMS)
def test_no_action_tokens(scope, normalize):
    roles = np.array([[0, 1, 1, 1, 3], [0, 0, 3, 3, 3]], np.int8)
    energies = np.full((2, 5), np.inf, np.float32)
    w = _weights(
        roles, energies, np.zeros((2, 5), np.int32), **_kw(scope=scope, normalize=normalize)
    )
    assert np.all(np.isfinite(w))
    expected_r = 1.0 if normalize == "preserve_sum" else np.float32(0.1)
    np.testing.assert_allclose(w[0], [0, expected_r, expected_r, expected_r, 0], rtol=1e-6)
    np.testing.assert_array_equal(w[1], 0.0)  # no generated tokens at all: zeros, no NaN


@pytest.mark.parametrize("scope", SCOPES)
def test_one_action_token_gets_weight_one(scope):
    roles = np.array([[0, 1, 1, 2, 3]], np.int8)
    energies = np.array([[np.nan, 3.0, 4.0, 1234.5, -np.inf]], np.float32)
    for beta in (0.0, 0.5, 1.0, 2.0):
        w = _weights(roles, energies, np.zeros((1, 5), np.int32), **_kw(scope=scope, beta=beta))
        assert w[0, 3] == 1.0


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("n_actions", [1, 3, 7, 49])
def test_all_equal_energies_give_exactly_one(scope, n_actions):
    length = n_actions + 3
    roles = np.array([[0, 1] + [2] * n_actions + [3]], np.int8)
    energies = np.full((1, length), 0.37, np.float32)
    w = _weights(roles, energies, np.zeros((1, length), np.int32), **_kw(scope=scope))
    np.testing.assert_array_equal(w[0, 2 : 2 + n_actions], 1.0)


def test_clipped_weights():
    roles = np.array([[1, 2, 2, 2, 2, 0]], np.int8)
    energies = np.array([[0.0, 10.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    kw = _kw(w_max=1.5)
    w = _weights(roles, energies, np.zeros((1, 6), np.int32), **kw)
    expected, raw = ref.token_weights(roles, energies, None, return_raw=True, **kw)
    np.testing.assert_allclose(w, expected, **TOL)
    assert w[0, 1] == np.float32(1.5) and raw[0, 1] > 1.5
    _, stats = actfocus.token_weights_and_stats(roles, energies, None, **kw)
    np.testing.assert_allclose(stats.action_clip_frac, 0.25)
    # beta > 1 drives low-energy weights negative before the clip: clipped to 0.
    w2 = _weights(roles, energies, np.zeros((1, 6), np.int32), **_kw(beta=3.0))
    np.testing.assert_array_equal(w2[0, 2:5], 0.0)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("normalize", NORMS)
def test_huge_and_non_finite_energies(scope, normalize):
    roles, energies, turn_ids = _data(21)
    energies = energies * 1e4  # huge, spread out
    energies[roles != Role.ACTION] = np.where(
        np.random.default_rng(0).random((roles != Role.ACTION).sum()) < 0.5, np.inf, -np.inf
    )
    kw = _kw(scope=scope, normalize=normalize, tau=0.5)
    w = _weights(roles, energies, turn_ids, **kw)
    assert np.all(np.isfinite(w))
    clean = np.where(roles == Role.ACTION, energies, 0.0)
    np.testing.assert_allclose(w, ref.token_weights(roles, clean, turn_ids, **kw), **TOL)


def test_preserve_sum():
    roles, energies, turn_ids = _data(22)
    roles[0] = np.where(roles[0] == Role.ACTION, Role.PROMPT, roles[0])  # row 0: reasoning only
    w = _weights(roles, energies, turn_ids, **_kw(normalize="preserve_sum"))
    gen = (roles == Role.REASONING) | (roles == Role.ACTION)
    for b in range(B):
        np.testing.assert_allclose(w[b][gen[b]].sum(), gen[b].sum(), rtol=1e-5)
    # Zero weight mass (alpha = 0, no action tokens): zeros, no NaN.
    roles0 = np.array([[0, 1, 1, 3]], np.int8)
    w0 = _weights(
        roles0, np.ones((1, 4), np.float32), None, **_kw(alpha=0.0, normalize="preserve_sum")
    )
    np.testing.assert_array_equal(w0, 0.0)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scope=st.sampled_from(SCOPES),
    layout=st.booleans(),
    tau=st.floats(0.2, 3.0),
    beta=st.floats(0.0, 1.0),
)
def test_invariants_hypothesis(seed, scope, layout, tau, beta):
    roles, energies, turn_ids = _data(seed, layout=layout, scale=3.0)
    kw = _kw(scope=scope, tau=tau, beta=beta, w_max=1e6)
    w = np.asarray(actfocus.token_weights(roles, energies, turn_ids, **kw))
    # Zero on PROMPT / PAD, alpha on REASONING.
    np.testing.assert_array_equal(w[(roles == Role.PROMPT) | (roles == Role.PAD)], 0.0)
    np.testing.assert_array_equal(w[roles == Role.REASONING], np.float32(0.1))
    # Action weights average exactly 1 per scope (no clipping with a huge w_max).
    assert np.all(w[roles == Role.ACTION] >= 0)
    for b in range(B):
        keys = np.zeros(L, np.int32) if scope == "trajectory" else turn_ids[b]
        for k in np.unique(keys[roles[b] == Role.ACTION]):
            sel = (roles[b] == Role.ACTION) & (keys == k)
            np.testing.assert_allclose(w[b][sel].mean(), 1.0, rtol=1e-5)
    # alpha = 1, beta = 0: exactly 1 on generated tokens, whatever the energies.
    for normalize in NORMS:
        w1 = np.asarray(
            actfocus.token_weights(
                roles,
                energies,
                turn_ids,
                **_kw(alpha=1.0, beta=0.0, scope=scope, normalize=normalize),
            )
        )
        gen = (roles == Role.REASONING) | (roles == Role.ACTION)
        np.testing.assert_array_equal(w1[gen], 1.0)
        np.testing.assert_array_equal(w1[~gen], 0.0)


@pytest.mark.parametrize(
    ("mode", "scope"),
    [(m, SCOPES[i % 2]) for i, m in enumerate(losses.LOSS_AGG_MODES)],
)
def test_alpha1_beta0_equals_unweighted_policy_loss_bitwise(mode, scope):
    roles, _, turn_ids = _data(30 + losses.LOSS_AGG_MODES.index(mode))
    rng = np.random.default_rng(31)
    gen = (roles == Role.REASONING) | (roles == Role.ACTION)
    old = rng.normal(-1.5, 0.5, size=(B, L)).astype(np.float32)
    logp = (old + rng.normal(0, 0.4, size=(B, L))).astype(np.float32)
    advs = rng.normal(size=(B, L)).astype(np.float32)
    wkw = _kw(alpha=1.0, beta=0.0, scope=scope, normalize="preserve_sum")

    def weighted(lp):
        w = actfocus.token_weights(roles, -old, turn_ids, **wkw)
        return losses.policy_loss(lp, old, advs, gen, weights=w, loss_agg=mode)[0]

    def plain(lp):
        return losses.policy_loss(lp, old, advs, gen, loss_agg=mode)[0]

    np.testing.assert_array_equal(weighted(logp), plain(logp))
    np.testing.assert_array_equal(jax.jit(weighted)(logp), jax.jit(plain)(logp))
    if mode == "token-mean":  # gradients too (op-by-op grads are slow on CPU: one mode)
        np.testing.assert_array_equal(jax.grad(weighted)(logp), jax.grad(plain)(logp))


def test_weights_are_stop_gradient():
    roles, energies, turn_ids = _data(40)

    def f(e):
        return jnp.sum(actfocus.token_weights(roles, e, turn_ids, **_kw(scope="turn")) * e)

    g = jax.grad(f)(jnp.asarray(energies))
    w = actfocus.token_weights(roles, energies, turn_ids, **_kw(scope="turn"))
    np.testing.assert_array_equal(g, w)  # d(w * e)/de = w when w is a constant


def test_validation_errors():
    roles, energies, turn_ids = _data(41)
    bad = [
        dict(scope="episode"),
        dict(normalize="sum"),
        dict(alpha=-0.1),
        dict(beta=-1.0),
        dict(tau=0.0),
        dict(w_max=0.0),
        dict(tau=float("nan")),
    ]
    for over in bad:
        with pytest.raises(ValueError):
            actfocus.token_weights(roles, energies, turn_ids, **_kw(**over))
    with pytest.raises(ValueError, match="turn_ids"):
        actfocus.token_weights(roles, energies, None, **_kw(scope="turn"))
    with pytest.raises(ValueError, match="shape"):
        actfocus.token_weights(roles, energies[:, :3], turn_ids, **_kw())


def test_config_defaults_and_validation():
    cfg = actfocus.ActFocusConfig()
    assert (cfg.alpha, cfg.beta, cfg.tau, cfg.w_max) == (0.1, 1.0, 1.0, 5.0)
    assert (cfg.scope, cfg.normalize, cfg.energy) == ("trajectory", "none", "neg_logprob")
    assert (cfg.weight_kl, cfg.weight_entropy, cfg.enabled) == (False, False, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.alpha = 1.0  # type: ignore[misc]
    for over in (dict(scope="x"), dict(normalize="x"), dict(energy="x"), dict(tau=-1.0)):
        with pytest.raises(ValueError):
            actfocus.ActFocusConfig(**over)


def test_token_energies():
    x = jnp.array([[-0.5, -2.0]])
    np.testing.assert_array_equal(actfocus.token_energies("neg_logprob", logp=x), -x)
    np.testing.assert_array_equal(actfocus.token_energies("entropy", entropy=-x), -x)
    np.testing.assert_array_equal(actfocus.token_energies("neg_logit", logit=x), -x)
    with pytest.raises(ValueError, match="entropy"):
        actfocus.token_energies("entropy", logp=x)
    with pytest.raises(ValueError, match="unknown"):
        actfocus.token_energies("surprise", logp=x)


def test_stats_and_config_entry_point():
    roles, energies, turn_ids = _data(42)
    cfg = actfocus.ActFocusConfig(scope="turn", w_max=2.0)
    logp = -energies
    w, stats = jax.jit(functools.partial(actfocus.actfocus_weights, cfg))(
        roles, turn_ids, logp=logp
    )
    np.testing.assert_allclose(
        w, ref.token_weights(roles, energies, turn_ids, **cfg.weight_kwargs()), **TOL
    )
    chex.assert_tree_all_finite(stats)
    chex.assert_shape(list(stats.values()), ())
    w = np.asarray(w)
    is_r, is_a = roles == Role.REASONING, roles == Role.ACTION
    mass = w[is_r].sum() + w[is_a].sum()
    np.testing.assert_allclose(stats.reasoning_mass_frac, w[is_r].sum() / mass, rtol=1e-5)
    np.testing.assert_allclose(stats.action_mass_frac, w[is_a].sum() / mass, rtol=1e-5)
    np.testing.assert_allclose(stats.action_token_frac, is_a.sum() / (is_a | is_r).sum(), rtol=1e-6)
    np.testing.assert_allclose(stats.reasoning_weight_mean, 0.1, rtol=1e-6)
    np.testing.assert_allclose(stats.action_weight_mean, w[is_a].mean(), rtol=1e-5)
    np.testing.assert_allclose(stats.action_energy_mean, energies[is_a].mean(), rtol=1e-5)
    np.testing.assert_allclose(stats.reasoning_energy_mean, energies[is_r].mean(), rtol=1e-5)
    _, raw = ref.token_weights(roles, energies, turn_ids, return_raw=True, **cfg.weight_kwargs())
    np.testing.assert_allclose(stats.action_clip_frac, (raw[is_a] > 2.0).mean(), rtol=1e-6)
    np.testing.assert_allclose(stats.action_weight_max, w[is_a].max(), rtol=1e-6)
    # Disabled: exactly 1 on generated tokens even with w_max < 1.
    off = dataclasses.replace(cfg, enabled=False, w_max=0.5)
    w_off, _ = actfocus.actfocus_weights(off, roles, turn_ids, logp=logp)
    np.testing.assert_array_equal(w_off, (is_r | is_a).astype(np.float32))
