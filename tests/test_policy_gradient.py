"""Gradient of the ActFocus-weighted policy loss on a toy policy.

The toy policy has one logit table per position for REASONING tokens and another for all other
tokens, so the reasoning parameters influence exactly the reasoning tokens' log-probs. With
``alpha = 0`` the reasoning parameters must get an exactly-zero gradient; ``alpha`` scales their
gradient linearly under ``token-mean`` (whose denominator the weights do not change) and leaves the
action parameters' gradient unchanged.
"""

import functools

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest

from actfocus_jax.rl import actfocus, advantages, losses
from actfocus_jax.rollout import Role

B, L, V = 4, 14, 6


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    roles, turn_ids = ref.random_trajectories(rng, B, L)
    # Every row gets at least one reasoning and one action token.
    roles[:, 1], roles[:, 2] = Role.REASONING, Role.ACTION
    tokens = rng.integers(0, V, size=(B, L)).astype(np.int32)
    params = {
        "reasoning": jnp.asarray(rng.normal(size=(L, V)), jnp.float32),
        "action": jnp.asarray(rng.normal(size=(L, V)), jnp.float32),
    }
    rewards = rng.normal(size=B).astype(np.float32)
    mask = (roles == Role.REASONING) | (roles == Role.ACTION)
    adv = advantages.broadcast_to_tokens(advantages.grpo_advantages(rewards, 2), mask)
    return roles, turn_ids, tokens, params, adv, mask


def _token_logp(params, roles, tokens):
    """Log-prob of ``tokens`` ``[B, L]``: reasoning positions read ``params['reasoning']``."""
    is_reason = (roles == Role.REASONING)[..., None]
    logits = jnp.where(is_reason, params["reasoning"][None], params["action"][None])
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]


def _loss(params, old_logp, roles, turn_ids, tokens, adv, mask, *, alpha, loss_agg):
    logp = _token_logp(params, roles, tokens)
    w = actfocus.token_weights(
        roles,
        actfocus.token_energies("neg_logprob", logp=old_logp),
        turn_ids,
        alpha=alpha,
        beta=1.0,
        tau=1.0,
        w_max=5.0,
        scope="turn",
        normalize="none",
    )
    return losses.policy_loss(logp, old_logp, adv, mask, weights=w, loss_agg=loss_agg)[0]


def _grads(alpha, loss_agg, *, use_jit):
    roles, turn_ids, tokens, params, adv, mask = _setup()
    # Behaviour policy: slightly different parameters, so ratios differ from 1.
    old_params = jax.tree.map(lambda p: p + 0.05, params)
    old_logp = _token_logp(old_params, roles, tokens)
    fn = functools.partial(
        _loss,
        old_logp=old_logp,
        roles=roles,
        turn_ids=turn_ids,
        tokens=tokens,
        adv=adv,
        mask=mask,
        alpha=alpha,
        loss_agg=loss_agg,
    )
    g = jax.grad(fn)
    if use_jit:
        g = jax.jit(g)
    return jax.tree.map(np.asarray, g(params))


@pytest.mark.parametrize("loss_agg", losses.LOSS_AGG_MODES)
def test_alpha_zero_removes_reasoning_gradient(loss_agg):
    # (The op-by-op path is exercised by the scaling test below; eager grads are slow on CPU.)
    g = _grads(0.0, loss_agg, use_jit=True)
    np.testing.assert_array_equal(g["reasoning"], 0.0)
    assert np.all(np.isfinite(g["action"]))
    assert np.abs(g["action"]).sum() > 0
    # alpha = 1: reasoning tokens do contribute.
    g1 = _grads(1.0, loss_agg, use_jit=True)
    assert np.abs(g1["reasoning"]).sum() > 0


@pytest.mark.parametrize("use_jit", [False, True])
def test_alpha_scales_reasoning_gradient_under_token_mean(use_jit):
    g_half = _grads(0.5, "token-mean", use_jit=use_jit)
    g_one = _grads(1.0, "token-mean", use_jit=use_jit)
    np.testing.assert_allclose(g_half["reasoning"], 0.5 * g_one["reasoning"], rtol=1e-6, atol=1e-9)
    # The weights do not change the token-mean denominator: the action gradient is unchanged.
    np.testing.assert_allclose(g_half["action"], g_one["action"], rtol=1e-6, atol=1e-9)
