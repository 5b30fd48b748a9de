"""The rollout buffer: fixed-shape, functional record of a batch of multi-turn episodes.

Layout (DESIGN.md section 2): row ``b`` holds one episode as a single left-aligned token sequence
``[prompt + obs_1] [response_1] [obs_2] [response_2] ... [response_T]`` followed by padding. Slots
``[0, length[b])`` are valid; the position (RoPE index) of slot ``j`` is ``j``. Episodes are laid out
group after group: rows ``g * G .. g * G + G - 1`` are the ``G`` rollouts of task ``g``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from actfocus_jax.rollout.roles import Role

__all__ = ["RolloutBuffer", "check_buffer"]


@chex.dataclass
class RolloutBuffer:
    """One batch of ``B`` episodes padded to ``S`` token slots and ``T`` turns.

    Attributes:
      tokens: int32 ``[B, S]`` token ids (pad id after ``length``).
      roles: int8 ``[B, S]`` :class:`~actfocus_jax.rollout.Role` codes, computed from token ids.
      turn_ids: int32 ``[B, S]`` turn index (0-based) of each token: an observation and the response
        that follows it share the turn index; ``-1`` on padding.
      generated: bool ``[B, S]`` tokens sampled from the policy (REASONING or ACTION).
      old_logp: float32 ``[B, S]`` log-prob of each generated token under the sampling policy
        (temperature-scaled); 0 elsewhere.
      entropy: float32 ``[B, S]`` entropy of the sampling distribution at each generated token; 0 elsewhere.
      logit: float32 ``[B, S]`` raw logit of each generated token (for the ``neg_logit`` energy).
      length: int32 ``[B]`` number of valid slots.
      turn_rewards: float32 ``[B, T]`` environment reward of each turn (0 for turns not played).
      reward_pos: int32 ``[B, T]`` slot of the last token of each turn's response (-1 if not played).
      episode_return: float32 ``[B]`` sum of turn rewards.
      success: bool ``[B]`` the environment reported success.
      done: bool ``[B]`` the environment ended the episode (else it hit the turn limit).
      num_turns: int32 ``[B]`` turns played.
      num_actions: int32 ``[B]`` environment actions executed.
      invalid_actions: int32 ``[B]`` turns with invalid or unparsable answers.
      truncated: bool ``[B]`` the episode was cut by the turn limit or the sequence budget.
      truncated_responses: int32 ``[B]`` responses that hit the per-turn token budget.
      group_id: int32 ``[B]`` index of the task group (rows of a group share the task).
      task_id: int32 ``[B]`` id of the task instance within its dataset.
    """

    tokens: chex.Array
    roles: chex.Array
    turn_ids: chex.Array
    generated: chex.Array
    old_logp: chex.Array
    entropy: chex.Array
    logit: chex.Array
    length: chex.Array
    turn_rewards: chex.Array
    reward_pos: chex.Array
    episode_return: chex.Array
    success: chex.Array
    done: chex.Array
    num_turns: chex.Array
    num_actions: chex.Array
    invalid_actions: chex.Array
    truncated: chex.Array
    truncated_responses: chex.Array
    group_id: chex.Array
    task_id: chex.Array

    @property
    def valid(self) -> jax.Array:
        """bool ``[B, S]``: slot holds a real token."""
        return self.roles != Role.PAD

    @property
    def loss_mask(self) -> jax.Array:
        """bool ``[B, S]``: generated tokens (the only ones trained on)."""
        return self.generated

    def token_rewards(self) -> jax.Array:
        """float32 ``[B, S]``: each turn's reward placed on the last token of its response."""
        b, s = self.tokens.shape
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], self.reward_pos.shape)
        out = jnp.zeros((b, s), jnp.float32)
        return out.at[rows, self.reward_pos].add(self.turn_rewards, mode="drop")


def check_buffer(buf: RolloutBuffer) -> None:
    """chex checks of shapes, dtypes, finiteness and layout invariants (debug mode and tests)."""
    b, s = buf.tokens.shape
    t = buf.turn_rewards.shape[1]
    chex.assert_shape([buf.roles, buf.turn_ids, buf.generated, buf.old_logp, buf.entropy], (b, s))
    chex.assert_shape(buf.logit, (b, s))
    chex.assert_shape([buf.turn_rewards, buf.reward_pos], (b, t))
    chex.assert_shape(
        [
            buf.length,
            buf.episode_return,
            buf.success,
            buf.done,
            buf.num_turns,
            buf.num_actions,
            buf.invalid_actions,
            buf.truncated,
            buf.truncated_responses,
            buf.group_id,
            buf.task_id,
        ],
        (b,),
    )
    chex.assert_type([buf.tokens, buf.turn_ids, buf.length, buf.reward_pos], jnp.int32)
    chex.assert_type(buf.roles, jnp.int8)
    chex.assert_type([buf.old_logp, buf.entropy, buf.logit, buf.turn_rewards], jnp.float32)
    chex.assert_tree_all_finite(
        (buf.old_logp, buf.entropy, buf.logit, buf.turn_rewards, buf.episode_return)
    )
    slots = jnp.arange(s)[None, :]
    chex.assert_trees_all_equal(buf.valid, slots < buf.length[:, None])
    generated_roles = (buf.roles == Role.REASONING) | (buf.roles == Role.ACTION)
    chex.assert_trees_all_equal(generated_roles, buf.generated)
