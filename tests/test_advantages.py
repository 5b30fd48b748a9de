"""Advantage estimators vs the float64 references of tests/np_reference.py."""

import functools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actfocus_jax.rl import advantages as adv

RTOL, ATOL = 2e-5, 2e-5


def _grpo_jit(group_size, **kw):
    return jax.jit(functools.partial(adv.grpo_advantages, group_size=group_size, **kw))


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("leave_one_out", [False, True])
@pytest.mark.parametrize("group_size", [2, 5])
def test_grpo_variants_match_reference(normalize_std, leave_one_out, group_size):
    rng = np.random.default_rng(group_size * 10 + normalize_std * 2 + leave_one_out)
    rewards = rng.normal(size=4 * group_size).astype(np.float32)
    rewards[:group_size] = rng.integers(0, 2, size=group_size)  # binary rewards group
    kw = dict(normalize_std=normalize_std, leave_one_out=leave_one_out)
    expected = ref.grpo_advantages(rewards, group_size, **kw)
    out = adv.grpo_advantages(jnp.asarray(rewards), group_size, **kw)
    out_jit = _grpo_jit(group_size, **kw)(jnp.asarray(rewards))
    assert out.shape == (4 * group_size,)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out_jit, expected, rtol=RTOL, atol=ATOL)


def _episodes_with_turns(rng, n, length, max_turns):
    """Rows of up to ``max_turns`` turns (each: a few observation tokens, then generated ones),
    each row stopping after a random number of turns, padded with turn id -1."""
    turn_ids = np.full((n, length), -1, np.int32)
    mask = np.zeros((n, length), bool)
    for i in range(n):
        pos = 0
        for t in range(int(rng.integers(1, max_turns + 1))):
            obs, gen = int(rng.integers(1, 3)), int(rng.integers(1, 4))
            if pos + obs + gen > length:
                break
            turn_ids[i, pos : pos + obs + gen] = t
            mask[i, pos + obs : pos + obs + gen] = True
            pos += obs + gen
    return turn_ids, mask


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 4])
def test_grpo_turn_baseline_matches_reference(normalize_std, group_size):
    rng = np.random.default_rng(group_size + 7 * normalize_std)
    n = 3 * group_size
    turn_ids, mask = _episodes_with_turns(rng, n, 24, 3)
    rewards = rng.integers(0, 2, size=n).astype(np.float32) * 10.0
    rewards[-group_size:] = rng.normal(size=group_size)
    expected = ref.grpo_turn_advantages(
        rewards, turn_ids, mask, group_size, normalize_std=normalize_std
    )
    out = adv.grpo_turn_advantages(
        jnp.asarray(rewards),
        jnp.asarray(turn_ids),
        jnp.asarray(mask),
        group_size,
        normalize_std=normalize_std,
    )
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=1e-4)


def test_grpo_turn_baseline_turn0_is_grpo_and_later_turns_are_balanced():
    """Turn 0 (played by all) gets the GRPO advantage; on every turn the advantages of the rollouts
    that played it sum to zero within a group (the episode-level baseline puts only negative ones
    on the later turns of a group whose only success ended early)."""
    # One group of 4: rollout 0 succeeds in turn 0; the others fail after 3 turns.
    turn_ids = np.array([[0, 0, -1, -1, -1, -1]] + [[0, 0, 1, 1, 2, 2]] * 3, np.int32)
    mask = np.array([[0, 1, 0, 0, 0, 0]] + [[0, 1, 0, 1, 0, 1]] * 3, bool)
    rewards = jnp.array([10.0, 0.0, 0.0, 0.0])
    out = np.asarray(adv.grpo_turn_advantages(rewards, turn_ids, mask, 4, eps=0.0))
    grpo = np.asarray(adv.grpo_advantages(rewards, 4, eps=0.0))
    np.testing.assert_allclose(out[:, 1], grpo, rtol=1e-6)  # turn 0
    np.testing.assert_array_equal(out[1:, [3, 5]], 0.0)  # turns 1-2: all three failed alike
    np.testing.assert_array_equal(out[~mask], 0.0)


def test_grpo_known_values():
    r = jnp.array([1.0, 0.0, 0.0, 0.0])
    # mean 0.25, unbiased std = sqrt(0.25) = 0.5.
    np.testing.assert_allclose(
        adv.grpo_advantages(r, 4, eps=0.0), [1.5, -0.5, -0.5, -0.5], rtol=1e-6
    )
    np.testing.assert_allclose(
        adv.grpo_advantages(r, 4, normalize_std=False), [0.75, -0.25, -0.25, -0.25], rtol=1e-6
    )
    np.testing.assert_allclose(
        adv.grpo_advantages(r, 4, normalize_std=False, leave_one_out=True),
        [1.0, -1.0 / 3, -1.0 / 3, -1.0 / 3],
        rtol=1e-6,
    )


def test_grpo_constant_group_gives_zeros_and_int_rewards():
    r = jnp.array([1, 1, 1, 0, 1, 0], jnp.int32)
    out = adv.grpo_advantages(r, 3)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out[:3], 0.0)
    assert np.all(np.isfinite(out))


def test_rloo_is_scaled_dr_grpo():
    rng = np.random.default_rng(0)
    g = 4
    r = jnp.asarray(rng.normal(size=3 * g), jnp.float32)
    dr = adv.grpo_advantages(r, g, normalize_std=False)
    rloo = adv.grpo_advantages(r, g, normalize_std=False, leave_one_out=True)
    np.testing.assert_allclose(rloo, dr * g / (g - 1), rtol=1e-5, atol=1e-6)


def test_grpo_errors():
    with pytest.raises(ValueError, match="divisible"):
        adv.grpo_advantages(jnp.zeros(7), 2)
    with pytest.raises(ValueError, match=">= 2"):
        adv.grpo_advantages(jnp.zeros(4), 1)
    with pytest.raises(ValueError, match="1-D"):
        adv.grpo_advantages(jnp.zeros((2, 2)), 2)


@settings(max_examples=15, deadline=None)
@given(
    group_size=st.sampled_from([2, 3, 4]),
    num_groups=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_grpo_groups_sum_to_zero(group_size, num_groups, seed):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=group_size * num_groups).astype(np.float32)
    for kw in (dict(), dict(normalize_std=False), dict(leave_one_out=True)):
        out = np.asarray(adv.grpo_advantages(jnp.asarray(r), group_size, **kw))
        sums = out.reshape(num_groups, group_size).sum(axis=1)
        np.testing.assert_allclose(sums, 0.0, atol=1e-4)
        np.testing.assert_allclose(
            out, ref.grpo_advantages(r, group_size, **kw), rtol=1e-4, atol=1e-4
        )


def _random_gae_inputs(rng, batch, length):
    rewards = rng.normal(size=(batch, length)).astype(np.float32)
    values = rng.normal(size=(batch, length)).astype(np.float32)
    mask = rng.random((batch, length)) < 0.6  # random gaps
    mask[0] = False  # a row without generated tokens
    if batch > 1:
        mask[1] = True  # a row without gaps
    return rewards, values, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_reference(seed):
    rng = np.random.default_rng(seed)
    rewards, values, mask = _random_gae_inputs(rng, 4, 13)
    gamma, lam = float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.0, 1.0))
    exp_adv, exp_ret = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
    a, r = adv.gae(rewards, values, mask, gamma=gamma, lam=lam)
    a_j, r_j = jax.jit(adv.gae)(rewards, values, mask, gamma=gamma, lam=lam)
    for got_a, got_r in ((a, r), (a_j, r_j)):
        assert got_a.shape == got_r.shape == (4, 13)
        np.testing.assert_allclose(got_a, exp_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_r, exp_ret, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(got_a)[~mask], 0.0)
        np.testing.assert_array_equal(np.asarray(got_r)[~mask], 0.0)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rng = np.random.default_rng(3)
    rewards, values, mask = _random_gae_inputs(rng, 3, 9)
    a, r = adv.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for b in range(3):
        pos = np.flatnonzero(mask[b])
        for k, t in enumerate(pos):
            togo = rewards[b, pos[k:]].sum()
            np.testing.assert_allclose(r[b, t], togo, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(a[b, t], togo - values[b, t], rtol=1e-5, atol=1e-5)


def test_gae_ignores_non_finite_unmasked_values():
    rng = np.random.default_rng(4)
    rewards, values, mask = _random_gae_inputs(rng, 3, 8)
    rewards2, values2 = rewards.copy(), values.copy()
    rewards2[~mask] = np.nan
    values2[~mask] = np.inf
    a1, r1 = adv.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    a2, r2 = jax.jit(adv.gae)(rewards2, values2, mask, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(a1, a2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r1, r2, rtol=1e-6, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), length=st.sampled_from([1, 6]))
def test_gae_hypothesis(seed, length):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(2, length)).astype(np.float32)
    values = rng.normal(size=(2, length)).astype(np.float32)
    mask = rng.random((2, length)) < 0.5
    gamma, lam = float(rng.uniform(0, 1)), float(rng.uniform(0, 1))
    a, r = adv.gae(rewards, values, mask, gamma=gamma, lam=lam)
    ea, er = ref.gae(rewards, values, mask, gamma=gamma, lam=lam)
    np.testing.assert_allclose(a, ea, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r, er, rtol=1e-5, atol=1e-5)


def test_turn_rewards_to_tokens_matches_reference():
    rng = np.random.default_rng(5)
    roles, turn_ids = ref.random_trajectories(rng, 5, 20, max_turns=3)
    mask = (roles == ref.REASONING) | (roles == ref.ACTION)
    turn_rewards = rng.normal(size=(5, 3)).astype(np.float32)
    expected = ref.turn_rewards_to_tokens(turn_rewards, turn_ids, mask)
    out = adv.turn_rewards_to_tokens(turn_rewards, turn_ids, mask)
    out_j = jax.jit(adv.turn_rewards_to_tokens)(turn_rewards, turn_ids, mask)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(out_j, expected, rtol=1e-6)


def test_episode_rewards_and_broadcast():
    mask = np.array([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]], bool)
    r = np.array([2.0, 3.0, -1.0], np.float32)
    out = adv.episode_rewards_to_tokens(r, mask)
    np.testing.assert_array_equal(out, [[0, 0, 0, 0, 2.0, 0], [0] * 6, [0, 0, 0, 0, 0, -1.0]])
    b = adv.broadcast_to_tokens(r, mask)
    np.testing.assert_array_equal(b, mask * r[:, None])
    with pytest.raises(ValueError):
        adv.broadcast_to_tokens(r, mask[:2])


def test_masked_whiten_matches_reference():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 7)).astype(np.float32) * 3 + 1
    mask = rng.random((3, 7)) < 0.5
    for shift in (True, False):
        np.testing.assert_allclose(
            adv.masked_whiten(x, mask, shift_mean=shift),
            ref.masked_whiten(x, mask, shift_mean=shift),
            rtol=1e-5,
            atol=1e-5,
        )
    assert np.all(np.isfinite(adv.masked_whiten(x, np.zeros_like(mask))))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 4),
    group_size=st.integers(1, 5),
    length=st.integers(1, 9),
)
def test_masked_group_center_matches_reference_and_centres_each_group(
    seed, groups, group_size, length
):
    """Against the float64 loop reference; every group's masked entries then average to 0, a
    per-group constant added to the input changes nothing, and masked-out entries are 0 (also for
    a group without any masked token)."""
    rng = np.random.default_rng(seed)
    shape = (groups * group_size, length)
    x = (rng.normal(size=shape) * 3 + rng.normal() * 5).astype(np.float32)
    mask = rng.random(shape) < 0.6
    if groups > 1:
        mask[:group_size] = False  # an empty group
    out = np.asarray(adv.masked_group_center(x, mask, group_size))
    np.testing.assert_allclose(out, ref.masked_group_center(x, mask, group_size), atol=2e-5)
    assert np.all(out[~mask] == 0)
    for g in range(groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        if mask[rows].any():
            assert abs(out[rows][mask[rows]].mean()) < 1e-5
    shift = np.repeat(rng.normal(size=groups) * 10, group_size)[:, None].astype(np.float32)
    np.testing.assert_allclose(adv.masked_group_center(x + shift, mask, group_size), out, atol=5e-5)


def test_masked_group_center_refuses_a_batch_that_is_not_whole_groups():
    x = np.zeros((6, 4), np.float32)
    with pytest.raises(ValueError, match="whole number of groups of 4"):
        adv.masked_group_center(x, x > 0, 4)
    with pytest.raises(ValueError, match=r"one \[B, L\] shape"):
        adv.masked_group_center(x, (x > 0)[:, :3], 3)
