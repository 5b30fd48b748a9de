"""Batched KV-cache sampling and teacher-forced scoring with per-token log-probs and entropies.

Log-prob convention (shared by :func:`generate`, :func:`sample_token` and :func:`score`, so that
``old_logp`` recorded at rollout time equals what the trainer re-scores):

* ``logp_t = log softmax(logits_t / temperature)[y_t]``: the log-prob of the sampled token under the
  **temperature-scaled, untruncated** model distribution. top-k / top-p truncation changes which
  tokens can be drawn but not the recorded log-prob (as in verl / OpenRLHF), so the trainer only needs
  the temperature to reproduce it.
* ``entropy_t`` = entropy of that same temperature-scaled distribution.
* Greedy decoding takes the argmax of the logits; its log-probs still use ``temperature``
  (pass ``temperature=1.0``, the default, to get the model's own log-probs).

Prompts may be left-padded, right-padded or have holes: a ``prompt_mask`` (or ``prompt_lengths`` +
``padding_side``) says which tokens are real; :func:`generate` compacts each row's real tokens to the
front before prefilling, so every row's result is independent of its padding. RoPE positions of real
tokens are ``0, 1, 2, ...``, the same as :func:`score` gives with the mask.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actfocus_jax.models.transformer import (
    ModelLike,
    apply,
    as_graph_state,
    forward_with_cache,
    init_cache,
)

__all__ = [
    "GenerateOutput",
    "compact_left",
    "generate",
    "make_prompt_mask",
    "sample_token",
    "score",
    "token_logprobs",
]


@flax.struct.dataclass
class GenerateOutput:
    """Result of :func:`generate` (``B`` rows, ``N = max_new_tokens``).

    Attributes:
      tokens: ``int32 [B, N]``; sampled ids, ``pad_id`` after a row's stop token.
      logp: ``float32 [B, N]``; log-prob of each sampled token (see module docstring), 0 on padding.
      entropy: ``float32 [B, N]``; entropy of the sampling distribution at each step, 0 on padding.
      mask: ``bool [B, N]``; True for generated tokens (stop token included).
      lengths: ``int32 [B]``; number of generated tokens per row (stop token included).
      done: ``bool [B]``; True where the row emitted a stop token (False = hit ``max_new_tokens``).
      num_steps: ``int32 []``; decode steps the loop ran (``max(lengths)``: it exits early once
        every row is done).
    """

    tokens: jax.Array
    logp: jax.Array
    entropy: jax.Array
    mask: jax.Array
    lengths: jax.Array
    done: jax.Array
    num_steps: jax.Array


# ------------------------------------------------------------------------------------- helpers
def _dist_stats(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log Z`` and entropy of ``softmax(z)`` over the last axis (float32)."""
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jnp.exp(z - lse[..., None])
    entropy = lse - jnp.sum(p * z, axis=-1)
    return lse, entropy


def sample_token(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one token per row.

    Args:
      logits: ``float32 [B, V]``.
      key: PRNG key.
      temperature: > 0 (may be traced); scales the logits before softmax.
      top_k: keep the ``top_k`` largest logits (0 = off; static). Ties at the threshold are kept.
      top_p: nucleus sampling, keep the smallest prefix of sorted probabilities whose mass reaches
        ``top_p`` (1.0 = off; static).
      greedy: argmax instead of sampling (static).

    Returns:
      ``(token int32 [B], logp float32 [B], entropy float32 [B])``, the log-prob and entropy of the
      temperature-scaled untruncated distribution (module docstring).
    """
    z = logits.astype(jnp.float32) / temperature
    lse, entropy = _dist_stats(z)
    if greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        filtered = z
        if top_k > 0 and top_k < z.shape[-1]:
            kth = jax.lax.top_k(z, top_k)[0][..., -1:]
            filtered = jnp.where(z >= kth, filtered, -jnp.inf)
        if top_p < 1.0:
            sorted_z = jnp.sort(filtered, axis=-1)[..., ::-1]
            sorted_p = jax.nn.softmax(sorted_z, axis=-1)
            mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
            keep = mass_before < top_p
            keep = keep.at[..., 0].set(True)
            cutoff = jnp.min(jnp.where(keep, sorted_z, jnp.inf), axis=-1, keepdims=True)
            filtered = jnp.where(filtered >= cutoff, filtered, -jnp.inf)
        token = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    token_z = jnp.take_along_axis(z, token[:, None], axis=-1)[:, 0]
    return token, token_z - lse, entropy


def token_logprobs(
    logits: jax.Array,
    input_ids: jax.Array,
    mask: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs and entropies from full-sequence logits (differentiable).

    Args:
      logits: ``float32 [B, L, V]`` from ``model(input_ids, attention_mask=mask)``.
      input_ids: ``int32 [B, L]``.
      mask: ``[B, L]`` (bool or 0/1), 1 = real token; None = all real.
      temperature: divides the logits.

    Returns:
      ``(logp, entropy)``, float32 ``[B, L]``: ``logp[b, t] = log p(input_ids[b, t] | real tokens
      before t)`` and ``entropy[b, t]`` the entropy of that predictive distribution, both read from
      the logits of the last real token before ``t`` (so left padding and holes are handled). 0 at
      padding and at each row's first real token.
    """
    b, length = input_ids.shape
    if mask is None:
        mask = jnp.ones((b, length), bool)
    mask = mask.astype(bool)
    z = logits.astype(jnp.float32) / temperature
    lse, ent = _dist_stats(z)
    idx = jnp.arange(length, dtype=jnp.int32)
    last_real = jax.lax.cummax(jnp.where(mask, idx[None, :], -1), axis=1)  # [B, L]
    prev = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), last_real[:, :-1]], axis=1)
    valid = mask & (prev >= 0)
    prev = jnp.maximum(prev, 0)
    rows = jnp.arange(b)[:, None]
    logp = z[rows, prev, input_ids] - lse[rows, prev]
    entropy = ent[rows, prev]
    return jnp.where(valid, logp, 0.0), jnp.where(valid, entropy, 0.0)


@functools.partial(jax.jit, static_argnums=0)
def _score_core(graphdef, state, input_ids, mask, temperature):
    logits = apply(graphdef, state, input_ids, attention_mask=mask)
    return token_logprobs(logits, input_ids, mask, temperature)


def score(
    model: ModelLike,
    input_ids: jax.Array,
    mask: jax.Array | None = None,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced scoring (jitted): ``(logp, entropy)`` float32 ``[B, L]``.

    Args:
      model: a :class:`~actfocus_jax.models.CausalLM` or its ``(graphdef, state)``.
      input_ids: ``int32 [B, L]`` (e.g. prompt followed by a generated continuation).
      mask: ``[B, L]``, 1 = real token (any padding layout); None = all real.
      temperature: the sampling temperature, so that the result matches :func:`generate`'s.

    ``logp[:, t]`` is the log-prob of token ``t`` given the real tokens before it (0 for the first real
    token of a row and for padding); see :func:`token_logprobs`.
    """
    graphdef, state = as_graph_state(model)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if mask is None:
        mask = jnp.ones(input_ids.shape, bool)
    return _score_core(
        graphdef, state, input_ids, jnp.asarray(mask, bool), jnp.float32(temperature)
    )


def make_prompt_mask(prompt_lengths: Any, length: int, padding_side: str = "right") -> jax.Array:
    """``bool [B, length]`` prompt mask from ``prompt_lengths [B]`` and ``padding_side``."""
    lengths = jnp.asarray(prompt_lengths, jnp.int32)[:, None]
    idx = jnp.arange(length, dtype=jnp.int32)[None, :]
    if padding_side == "right":
        return idx < lengths
    if padding_side == "left":
        return idx >= length - lengths
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def compact_left(ids: jax.Array, mask: jax.Array, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Moves each row's real tokens to the front (order kept): right padding.

    ``ids [B, L]``, ``mask [B, L]`` -> ``(ids [B, L] with pad_id after the real tokens,
    num_real int32 [B])``.
    """
    mask = mask.astype(bool)
    order = jnp.argsort(~mask, axis=1, stable=True)
    compact = jnp.take_along_axis(ids, order, axis=1)
    n = jnp.sum(mask, axis=1, dtype=jnp.int32)
    keep = jnp.arange(ids.shape[1], dtype=jnp.int32)[None, :] < n[:, None]
    return jnp.where(keep, compact, pad_id).astype(jnp.int32), n


# ------------------------------------------------------------------------------------ generate
@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "top_k",
        "top_p",
        "greedy",
        "stop_ids",
        "pad_id",
        "cache_len",
    ),
)
def _generate_core(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    *,
    max_new_tokens: int,
    top_k: int,
    top_p: float,
    greedy: bool,
    stop_ids: tuple[int, ...],
    pad_id: int,
    cache_len: int,
) -> GenerateOutput:
    config = nnx.merge(graphdef, state).config
    b = prompt_ids.shape[0]
    n = max_new_tokens
    ids, plen = compact_left(prompt_ids, prompt_mask, pad_id)
    cache = init_cache(config, b, cache_len)
    logits, cache = forward_with_cache(graphdef, state, ids, plen, cache)
    last = logits[jnp.arange(b), jnp.maximum(plen - 1, 0)]  # [B, V]
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

    def cond(carry):
        step, done = carry[0], carry[6]
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, cache, last, key, out, (logp_buf, ent_buf), done, lengths = carry
        key, sub = jax.random.split(key)
        tok, lp, ent = sample_token(
            last, sub, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
        )
        active = ~done
        tok = jnp.where(active, tok, pad_id)
        out = out.at[:, step].set(tok)
        logp_buf = logp_buf.at[:, step].set(jnp.where(active, lp, 0.0))
        ent_buf = ent_buf.at[:, step].set(jnp.where(active, ent, 0.0))
        lengths = lengths + active.astype(jnp.int32)
        done = done | (active & jnp.any(tok[:, None] == stops[None, :], axis=-1))
        logits, cache = forward_with_cache(
            graphdef, state, tok[:, None], active.astype(jnp.int32), cache
        )
        return step + 1, cache, logits[:, 0], key, out, (logp_buf, ent_buf), done, lengths

    carry = (
        jnp.int32(0),
        cache,
        last,
        key,
        jnp.full((b, n), pad_id, jnp.int32),
        (jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.float32)),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
    )
    steps, _, _, _, out, (logp_buf, ent_buf), done, lengths = jax.lax.while_loop(cond, body, carry)
    mask = jnp.arange(n, dtype=jnp.int32)[None, :] < lengths[:, None]
    return GenerateOutput(
        tokens=out,
        logp=logp_buf,
        entropy=ent_buf,
        mask=mask,
        lengths=lengths,
        done=done,
        num_steps=steps,
    )


def generate(
    model: ModelLike,
    prompt_ids: Any,
    key: jax.Array,
    *,
    max_new_tokens: int,
    prompt_mask: Any = None,
    prompt_lengths: Any = None,
    padding_side: str = "right",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> GenerateOutput:
    """Batched sampling with a KV cache, jit-compiled, ``lax.while_loop`` with early exit.

    Args:
      model: a :class:`~actfocus_jax.models.CausalLM` or its ``(graphdef, state)``.
      prompt_ids: ``int32 [B, P]``; every row needs at least one real token.
      key: PRNG key (unused when ``greedy``).
      max_new_tokens: ``N``, the most tokens generated per row (static).
      prompt_mask: ``[B, P]``, 1 = real prompt token, any padding layout. Takes precedence.
      prompt_lengths: ``int32 [B]`` real tokens per row, padded on ``padding_side``
        (``"right"`` / ``"left"``). With neither mask nor lengths, all ``P`` tokens are real.
      temperature: > 0; see the module docstring for how it enters the log-probs.
      top_k, top_p, greedy: sampling filters / argmax (static; see :func:`sample_token`).
      stop_ids: ids that end a row (the stop token is kept in the output).
      pad_id: id written after a row has stopped (and used to pad the compacted prompt).

    Returns:
      :class:`GenerateOutput` with ``[B, N]`` tokens, log-probs, entropies, mask and per-row
      ``lengths`` / ``done``. The loop stops early once every row has emitted a stop token.
    """
    graphdef, state = as_graph_state(model)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids must be [batch, length], got shape {prompt_ids.shape}")
    b, p = prompt_ids.shape
    if prompt_mask is None:
        if prompt_lengths is None:
            prompt_mask = jnp.ones((b, p), bool)
        else:
            prompt_mask = make_prompt_mask(prompt_lengths, p, padding_side)
    prompt_mask = jnp.asarray(prompt_mask).astype(bool)
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompt_ids {prompt_ids.shape}")
    if not isinstance(prompt_mask, jax.core.Tracer) and not bool(np.all(np.any(prompt_mask, 1))):
        raise ValueError("every prompt row needs at least one real token (e.g. a BOS token)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if greedy and isinstance(temperature, int | float) and temperature <= 0:
        temperature = 1.0  # greedy ignores the temperature except in the recorded log-probs
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError("temperature must be > 0; use greedy=True for argmax decoding")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    return _generate_core(
        graphdef,
        state,
        prompt_ids,
        prompt_mask,
        key,
        jnp.float32(temperature),
        max_new_tokens=int(max_new_tokens),
        top_k=int(top_k),
        top_p=float(top_p),
        greedy=bool(greedy),
        stop_ids=tuple(sorted({int(s) for s in stop_ids})),
        pad_id=int(pad_id),
        cache_len=p + int(max_new_tokens),
    )
