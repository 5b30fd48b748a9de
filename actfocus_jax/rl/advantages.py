"""Advantage estimators: GRPO / Dr. GRPO / RLOO (episode level) and token-level GAE.

All functions are pure and ``jax.jit``-able (shape arguments such as ``group_size`` are static
Python ints). Layout conventions (DESIGN.md sections 2 and 5):

* Episode-level quantities are ``[N]`` arrays laid out **group after group**: rollouts
  ``g * G ... g * G + G - 1`` belong to group ``g`` (``G = group_size``).
* Token-level quantities are ``[batch, length]``; a boolean/0-1 ``mask`` of the same shape marks the
  generated tokens (REASONING or ACTION). Observation / prompt / pad positions are unmasked.

References:

* GRPO: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models" (group-normalised outcome advantages), as implemented in verl
  (``compute_grpo_outcome_advantage``) and TRL (``GRPOTrainer``), both with the unbiased std.
* Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"
  (no division by the group std).
* RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
  from Human Feedback in LLMs" (leave-one-out baseline).
* GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation"; the masked variant (recursion over generated tokens only) follows DESIGN.md section 5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "broadcast_to_tokens",
    "episode_rewards_to_tokens",
    "gae",
    "grpo_advantages",
    "grpo_turn_advantages",
    "masked_group_center",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "turn_rewards_to_tokens",
]


def _float(x: jax.Array) -> jax.Array:
    """Cast integer / bool arrays to float32; keep floating dtypes."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def grpo_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    normalize_std: bool = True,
    leave_one_out: bool = False,
    eps: float = 1e-6,
) -> jax.Array:
    """Group-relative episode advantages (GRPO, Dr. GRPO, RLOO).

    Args:
      rewards: ``[N]`` episode rewards laid out group after group; ``N % group_size == 0``.
      group_size: ``G``, rollouts per group (static Python int, ``G >= 2``).
      normalize_std: divide by the group's unbiased (``ddof=1``) std plus ``eps`` (GRPO, as verl
        and TRL). ``False`` gives Dr. GRPO (Liu et al. 2025) or plain RLOO.
      leave_one_out: use the leave-one-out baseline (RLOO, Ahmadian et al. 2024) instead of the
        group mean.
      eps: added to the std (not to the variance) before dividing.

    Returns:
      ``[N]`` advantages (float dtype of ``rewards``; float32 for integer rewards):

      ============  ===============  ==================================================
      leave_one_out  normalize_std   ``A_i``
      ============  ===============  ==================================================
      False          True            ``(R_i - mean_g R) / (std_g R + eps)``   (GRPO)
      False          False           ``R_i - mean_g R``                       (Dr. GRPO)
      True           False           ``R_i - mean_{j != i} R_j``              (RLOO)
      True           True            ``(R_i - mean_{j != i} R_j) / (std_g R + eps)``
      ============  ===============  ==================================================

      ``std_g`` is the unbiased std of the whole group (including ``i``) in both rows where it
      appears. Note ``R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_g R)``.

    Raises:
      ValueError: if ``rewards`` is not 1-D, ``group_size < 2`` (a single rollout carries no
        group-relative signal: its GRPO advantage is 0 and its unbiased std undefined; we refuse it
        rather than silently train on nothing — unlike verl, which then uses ``A_i = R_i``), or
        ``N`` is not a multiple of ``group_size``.
    """
    rewards = _float(rewards)
    _check_groups(rewards, group_size)
    return _grpo_impl(rewards, eps, group_size, normalize_std, leave_one_out)


def _check_groups(rewards: jax.Array, group_size: int) -> None:
    """``rewards`` is ``[N]`` and ``group_size`` a Python int ``>= 2`` dividing ``N``."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise ValueError(f"group_size must be a Python int, got {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"number of rewards ({n}) is not divisible by group_size ({group_size}); "
            "rewards must be laid out group after group"
        )


def _group_std(r: jax.Array, mean: jax.Array, g: int) -> jax.Array:
    """Unbiased std over axis 1 of grouped rewards ``r`` (``mean``: their mean, kept dims)."""
    return jnp.sqrt(jnp.sum(jnp.square(r - mean), axis=1, keepdims=True) / (g - 1))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _grpo_impl(rewards, eps, g, normalize_std, leave_one_out):
    n = rewards.shape[0]
    r = rewards.reshape(n // g, g)
    total = jnp.sum(r, axis=1, keepdims=True)
    mean = total / g
    if leave_one_out:
        centred = r - (total - r) / (g - 1)
    else:
        centred = r - mean
    if normalize_std:
        centred = centred / (_group_std(r, mean, g) + eps)
    return centred.reshape(n)


def grpo_turn_advantages(
    rewards: jax.Array,
    turn_ids: jax.Array,
    mask: jax.Array,
    group_size: int,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> jax.Array:
    """GRPO with a per-turn group baseline: token advantages ``[N, L]``.

    A token of turn ``t`` of rollout ``i`` gets ``(R_i - mean_{j in g, j reached t} R_j) /
    (std_g R + eps)``: the group mean is taken over the rollouts of the group that played turn
    ``t``. Turn 0 is played by all, so its tokens get exactly the GRPO advantage. Why: an episode
    that ends early (solved, or out of budget) has no later turns, so with the episode-level
    baseline the tokens of later turns come mostly from one kind of episode (in Sokoban with a
    success-only reward, from failures: a group with one success in turn 0 puts only negative
    advantages on every turn-1 and turn-2 token). That pushes down whatever later turns share
    (templates, state descriptions) whatever its merit. Reaching turn ``t`` is decided before
    turn ``t``'s tokens are sampled, so the per-turn mean is a valid (history-dependent) baseline
    for them, as the group mean is for the whole episode.

    Args:
      rewards: ``[N]`` episode rewards laid out group after group.
      turn_ids: int ``[N, L]`` turn index of each token (``-1`` or anything on unmasked tokens).
      mask: ``[N, L]`` generated tokens (the tokens that get an advantage).
      group_size: ``G >= 2`` (static).
      normalize_std: divide by the group's unbiased std of ``R`` over all its rollouts (as GRPO).
      eps: added to the std.

    Returns:
      ``[N, L]`` float advantages, 0 outside ``mask``.
    """
    rewards = _float(rewards)
    _check_groups(rewards, group_size)
    if turn_ids.ndim != 2 or turn_ids.shape != mask.shape or turn_ids.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"need turn_ids and mask of shape [N, L] with N = {rewards.shape[0]} rewards; got "
            f"{turn_ids.shape} and {mask.shape}"
        )
    return _grpo_turn_impl(rewards, turn_ids, mask, eps, group_size, normalize_std)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _grpo_turn_impl(rewards, turn_ids, mask, eps, g, normalize_std):
    n, length = turn_ids.shape
    m = mask.astype(bool)
    t = jnp.where(m, turn_ids, 0).astype(jnp.int32)
    # played[i, t]: rollout i has a generated token in turn t (turn ids < L, so L slots suffice).
    rows = jnp.arange(n)[:, None]
    played = jnp.zeros((n, length), rewards.dtype).at[rows, t].max(m.astype(rewards.dtype))
    r = rewards.reshape(n // g, g, 1)
    p = played.reshape(n // g, g, length)
    mean_t = jnp.sum(p * r, axis=1, keepdims=True) / jnp.maximum(
        jnp.sum(p, axis=1, keepdims=True), 1
    )
    centred = r - mean_t  # [groups, G, turn]
    if normalize_std:
        centred = centred / (_group_std(r, jnp.mean(r, axis=1, keepdims=True), g) + eps)
    adv = jnp.take_along_axis(centred.reshape(n, length), t, axis=1)
    return jnp.where(m, adv, 0.0)


def broadcast_to_tokens(episode_values: jax.Array, mask: jax.Array) -> jax.Array:
    """Broadcast per-episode values ``[N]`` to the masked tokens of ``[N, L]``; 0 elsewhere."""
    episode_values = _float(episode_values)
    mask = jnp.asarray(mask).astype(bool)
    if episode_values.ndim != 1 or mask.ndim != 2 or mask.shape[0] != episode_values.shape[0]:
        raise ValueError(
            f"expected episode_values [N] and mask [N, L], got {episode_values.shape} "
            f"and {mask.shape}"
        )
    return jnp.where(mask, episode_values[:, None], jnp.zeros((), episode_values.dtype))


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Token-level GAE over the generated tokens only (Schulman et al. 2016; DESIGN.md section 5).

    For the masked positions ``t_1 < ... < t_n`` of a row::

        delta_k = r_{t_k} + gamma * V_{t_{k+1}} - V_{t_k}      (V_{t_{n+1}} := 0)
        A_k     = delta_k + gamma * lam * A_{k+1}              (A_{n+1} := 0)
        returns = A + V

    Unmasked positions (prompt / observation / pad) are skipped: the recursion jumps from a
    response's first token straight to the previous response's last token. Their rewards and
    values are ignored (they may even be non-finite) and their outputs are 0.

    Implemented as one reverse ``lax.scan`` over the length axis carrying ``(next_value,
    next_adv)``, which passes through unmasked positions unchanged.

    Args:
      rewards: ``[B, L]`` token rewards (e.g. from :func:`turn_rewards_to_tokens`).
      values: ``[B, L]`` critic values ``V_t``.
      mask: ``[B, L]`` bool / 0-1, the generated tokens.
      gamma: discount (scalar, may be traced).
      lam: GAE lambda (scalar, may be traced).

    Returns:
      ``(advantages, returns)``, both ``[B, L]``, 0 at unmasked positions.
    """
    rewards = _float(rewards)
    values = _float(values)
    dtype = jnp.result_type(rewards.dtype, values.dtype)
    rewards = rewards.astype(dtype)
    values = values.astype(dtype)
    mask = jnp.asarray(mask).astype(bool)
    if not (rewards.shape == values.shape == mask.shape) or rewards.ndim != 2:
        raise ValueError(
            f"rewards, values and mask must share one [B, L] shape, got {rewards.shape}, "
            f"{values.shape}, {mask.shape}"
        )
    return _gae_impl(rewards, values, mask, gamma, lam)


@jax.jit
def _gae_impl(rewards, values, mask, gamma, lam):
    dtype = rewards.dtype
    gamma = jnp.asarray(gamma, dtype)
    lam = jnp.asarray(lam, dtype)
    zero = jnp.zeros((), dtype)

    def step(carry, xs):
        # Unmasked positions pass the carry through unchanged.
        next_value, next_adv = carry
        r, v, m = xs
        r = jnp.where(m, r, zero)
        v = jnp.where(m, v, zero)
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        new_carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return new_carry, jnp.where(m, adv, zero)

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), dtype), jnp.zeros((batch,), dtype))
    # Scan over the length axis (time-major), last position first.
    _, adv_t = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
    advantages = adv_t.T
    returns = jnp.where(mask, advantages + values, zero)
    return advantages, returns


def turn_rewards_to_tokens(
    turn_rewards: jax.Array,
    turn_ids: jax.Array,
    mask: jax.Array,
) -> jax.Array:
    """Place per-turn rewards on the last generated token of each turn's response.

    Args:
      turn_rewards: ``[B, T]`` reward of turn ``k`` of each trajectory.
      turn_ids: ``[B, L]`` int turn index of every token (values outside ``[0, T)`` are ignored).
      mask: ``[B, L]`` bool / 0-1, the generated tokens.

    Returns:
      ``[B, L]`` token rewards: ``turn_rewards[b, k]`` at the last masked position with
      ``turn_ids == k`` of row ``b``, 0 elsewhere. A turn without generated tokens drops its reward
      (there is no token to carry it).
    """
    turn_rewards = _float(turn_rewards)
    turn_ids = jnp.asarray(turn_ids)
    mask = jnp.asarray(mask).astype(bool)
    if turn_rewards.ndim != 2 or turn_ids.shape != mask.shape or turn_ids.ndim != 2:
        raise ValueError(
            f"expected turn_rewards [B, T], turn_ids and mask [B, L], got {turn_rewards.shape}, "
            f"{turn_ids.shape}, {mask.shape}"
        )
    batch, length = mask.shape
    num_turns = turn_rewards.shape[1]
    pos = jnp.arange(length, dtype=jnp.int32)
    in_turn = (turn_ids[:, None, :] == jnp.arange(num_turns)[None, :, None]) & mask[:, None, :]
    last = jnp.max(jnp.where(in_turn, pos[None, None, :], -1), axis=-1)  # [B, T]
    # Empty turns scatter to index L, which mode="drop" discards.
    last = jnp.where(last >= 0, last, length)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], last.shape)
    out = jnp.zeros((batch, length), turn_rewards.dtype)
    return out.at[rows, last].add(turn_rewards, mode="drop")


def episode_rewards_to_tokens(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """Place episode rewards ``[B]`` on the last masked token of each row ``[B, L]``; 0 elsewhere."""
    rewards = _float(rewards)
    mask = jnp.asarray(mask).astype(bool)
    turn_ids = jnp.zeros(mask.shape, jnp.int32)
    return turn_rewards_to_tokens(rewards[:, None], turn_ids, mask)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of ``x`` over ``mask`` (0 where the mask is empty); non-finite masked-out values are safe."""
    x = _float(x)
    mask = jnp.asarray(mask).astype(bool)
    total = jnp.sum(jnp.where(mask, x, 0), axis=axis)
    count = jnp.sum(mask, axis=axis).astype(x.dtype)
    return total / jnp.maximum(count, 1)


def masked_var(x: jax.Array, mask: jax.Array, *, unbiased: bool = True) -> jax.Array:
    """Variance of ``x`` over all masked entries (Bessel-corrected when ``unbiased`` and count > 1)."""
    x = _float(x)
    mask = jnp.asarray(mask).astype(bool)
    mean = masked_mean(x, mask)
    count = jnp.sum(mask).astype(x.dtype)
    sq = jnp.sum(jnp.where(mask, jnp.square(x - mean), 0))
    denom = jnp.maximum(count - 1, 1) if unbiased else jnp.maximum(count, 1)
    return sq / denom


def masked_whiten(
    x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """Whiten ``x`` with the masked mean / unbiased std of the whole batch (as verl / TRL).

    ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back. Unmasked
    positions are set to 0.
    """
    x = _float(x)
    mask = jnp.asarray(mask).astype(bool)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask, out, 0)


def masked_group_center(x: jax.Array, mask: jax.Array, group_size: int) -> jax.Array:
    """Subtract from each group's rows the masked mean of ``x`` over that group's tokens.

    ``x`` and ``mask`` are ``[B, L]`` with ``B`` laid out group after group (rows
    ``g * G .. g * G + G - 1`` share a task). Each masked entry of group ``g`` becomes
    ``x - mean_g``, ``mean_g`` the token-weighted mean over the group's masked entries (0 for a
    group without any); unmasked positions are set to 0. No scaling: applied to PPO's GAE
    advantages it is the per-task analogue of :func:`masked_whiten`'s centring, what a critic that
    knew each task's mean advantage would leave, and what GRPO's group baseline does for episodes.
    """
    x = _float(x)
    mask = jnp.asarray(mask).astype(bool)
    if x.ndim != 2 or x.shape != mask.shape:
        raise ValueError(f"expected x and mask of one [B, L] shape, got {x.shape} and {mask.shape}")
    batch, length = x.shape
    if group_size < 1 or batch % group_size:
        raise ValueError(f"batch of {batch} rows is not a whole number of groups of {group_size}")
    xg = x.reshape(batch // group_size, group_size * length)
    mg = mask.reshape(xg.shape)
    mean = masked_mean(xg, mg, axis=1)  # [num_groups]
    out = x - jnp.repeat(mean, group_size)[:, None]
    return jnp.where(mask, out, 0)
