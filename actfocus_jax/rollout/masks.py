"""Token-role masks computed from token ids on device (DESIGN.md section 2).

Generated positions are REASONING unless they lie inside an answer span: from the first token of an
``<answer>`` tag sequence to the last token of the matching ``</answer>`` tag sequence, inclusive, which
are ACTION. Tags are token *sequences* (a BPE tokenizer may split ``<answer>`` into several tokens).
An answer that is opened but not closed before the response ends is ACTION up to the response's end
(the model did attempt an action; the environment flags it as malformed). Answer spans never cross a
non-generated position: the state is reset at every observation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from actfocus_jax.rollout.roles import ROLE_DTYPE, Role

__all__ = ["compute_roles", "match_ends", "match_starts"]


def match_starts(tokens: jax.Array, pattern: Sequence[int]) -> jax.Array:
    """``out[..., i]`` is True where ``tokens[..., i : i + len(pattern)] == pattern``.

    Args:
      tokens: int array ``[..., L]``.
      pattern: a non-empty token-id sequence (static).
    Returns:
      bool ``[..., L]``; positions whose window runs past the end are False.
    """
    pattern = tuple(int(p) for p in pattern)
    if not pattern:
        raise ValueError("pattern must hold at least one token id")
    length = tokens.shape[-1]
    out = jnp.ones(tokens.shape, dtype=bool)
    for k, p in enumerate(pattern):
        shifted = jnp.roll(tokens, -k, axis=-1)
        valid = jnp.arange(length) < length - k
        out = out & (shifted == p) & valid
    return out


def match_ends(tokens: jax.Array, pattern: Sequence[int]) -> jax.Array:
    """``out[..., i]`` is True where ``tokens[..., i - len(pattern) + 1 : i + 1] == pattern``."""
    n = len(tuple(pattern))
    starts = match_starts(tokens, pattern)
    length = tokens.shape[-1]
    shifted = jnp.roll(starts, n - 1, axis=-1)
    return shifted & (jnp.arange(length) >= n - 1)


def compute_roles(
    tokens: jax.Array,
    generated: jax.Array,
    valid: jax.Array,
    answer_open: Sequence[int],
    answer_close: Sequence[int],
) -> jax.Array:
    """Role code of every position.

    Args:
      tokens: int32 ``[B, L]`` token ids.
      generated: bool ``[B, L]``, True at tokens sampled from the policy.
      valid: bool ``[B, L]``, False at padding.
      answer_open: token ids of ``<answer>`` (static).
      answer_close: token ids of ``</answer>`` (static).
    Returns:
      int8 ``[B, L]`` with :class:`~actfocus_jax.rollout.Role` codes: PAD where not ``valid``, PROMPT
      where valid but not generated, ACTION inside answer spans of generated text, else REASONING.
      An open tag must lie entirely inside generated text to count.
    """
    n_open = len(tuple(answer_open))
    gen_run = match_starts(generated.astype(jnp.int32), (1,) * n_open)
    opens = match_starts(tokens, answer_open) & gen_run
    closes = match_ends(tokens, answer_close) & generated

    def scan_fn(inside, xs):
        is_open, is_close, is_gen = xs
        # A tag opening here starts (or restarts) a span; a non-generated token ends any span.
        now_inside = (inside | is_open) & is_gen
        action = now_inside
        next_inside = now_inside & ~is_close
        return next_inside, action

    init = jnp.zeros(tokens.shape[:-1], dtype=bool)
    xs = (opens.T, closes.T, generated.T) if tokens.ndim == 2 else (opens, closes, generated)
    _, action = jax.lax.scan(scan_fn, init, xs)
    action = action.T if tokens.ndim == 2 else action
    roles = jnp.where(
        generated,
        jnp.where(action, jnp.int8(Role.ACTION), jnp.int8(Role.REASONING)),
        jnp.int8(Role.PROMPT),
    )
    return jnp.where(valid, roles, jnp.int8(Role.PAD)).astype(ROLE_DTYPE)
