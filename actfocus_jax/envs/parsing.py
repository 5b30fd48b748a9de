"""Jit-able parsing of a generated response into env actions (shared by all JAX envs).

Format (DESIGN.md section 2): ``<think> ... </think><answer> A1 || A2 || ... </answer>``; tags and
separator are token *sequences* taken from the tokenizer (``TextTokenizer.tag_ids``), so a tag may
be several tokens with a BPE tokenizer.

Algorithm (everything on fixed-shape arrays, no data-dependent shapes, never raises):

1. Positions ``>= length`` are ignored. Tag occurrences are found by comparing the ids at every
   position with the tag's id sequence.
2. The answer span is the LAST complete one: the last ``</answer>`` and the last ``<answer>`` that
   ends before it. ``format_ok`` requires such a span AND exactly one ``<answer>`` and one
   ``</answer>`` in the response (duplicated or unclosed tags are flagged) AND at least one non-empty
   segment (an empty answer is flagged).
3. Inside the span, ids covered by a separator occurrence split segments (a run of adjacent
   separators counts once); ids that decode to whitespace only (``ws_mask``) are dropped. Empty
   segments are skipped, as RAGEN does (``[a.strip() for a in answer.split(sep) if a.strip()]``).
4. The first ``max_actions`` non-empty segments are matched against the env's
   :class:`~actfocus_jax.envs.base.ActionTable` (exact token-sequence match with any spelling
   variant). Segments that match nothing, and every non-empty segment beyond ``max_actions``, count in
   ``num_invalid``. Valid actions are written, in order, to ``actions`` (-1 padding).

Known limitation: matching is at token level, so a BPE tokenizer that merges a tag with the next word
(e.g. ``">Right"`` as one token) makes the span undetectable; the embedded tokenizer and tokenizers
whose tags are added tokens are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from actfocus_jax.envs.base import ActionTable, ParsedActions

__all__ = [
    "find_any",
    "find_sequence",
    "parse_actions",
]

_NEVER = -7  # an id that matches no tag (ids >= 0); used to mask positions beyond the length


def find_sequence(ids: jax.Array, pattern: Sequence[int]) -> jax.Array:
    """bool[L]: positions ``i`` where ``ids[i : i + len(pattern)] == pattern`` (fully inside ``ids``)."""
    pattern = [int(p) for p in pattern]
    n, m = ids.shape[0], len(pattern)
    padded = jnp.concatenate([ids, jnp.full((m,), _NEVER, ids.dtype)])
    hit = jnp.ones((n,), bool)
    for j, p in enumerate(pattern):
        hit = hit & (jax.lax.dynamic_slice_in_dim(padded, j, n) == p)
    return hit


def _variants(pattern: Sequence[int] | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """A token sequence or a list of alternative sequences -> list of non-empty tuples."""
    pattern = list(pattern)
    if pattern and isinstance(pattern[0], (int, np.integer)):
        pattern = [pattern]
    out = [tuple(int(i) for i in v) for v in pattern if len(v) > 0]
    if not out:
        raise ValueError("empty tag / separator pattern")
    return out


def find_any(
    ids: jax.Array, patterns: Sequence[Sequence[int]]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Occurrences of any of ``patterns`` in ``ids`` int32[L].

    Returns ``(start bool[L], end int32[L], covered bool[L])``: where an occurrence starts, the
    position just after it (for starts; the longest variant wins), and the positions it covers.
    """
    n = ids.shape[0]
    pos = jnp.arange(n)
    start = jnp.zeros((n,), bool)
    end = jnp.zeros((n,), jnp.int32)
    covered = jnp.zeros((n,), bool)
    for pat in patterns:
        hit = find_sequence(ids, pat)
        start = start | hit
        end = jnp.maximum(end, jnp.where(hit, pos + len(pat), 0))
        for j in range(len(pat)):
            covered = covered | (
                jnp.concatenate([jnp.zeros((j,), bool), hit[: n - j]]) if j else hit
            )
    return start, end, covered


def parse_actions(
    token_ids: jax.Array,
    length: jax.Array,
    *,
    open_ids: Sequence[int],
    close_ids: Sequence[int],
    sep_ids: Sequence[int],
    table: ActionTable,
    ws_mask: np.ndarray,
    max_actions: int,
) -> ParsedActions:
    """Parses one response (see the module docstring).

    Args:
      token_ids: int32[L] the response's token ids (anything after ``length`` is ignored).
      length: int32[] number of valid ids.
      open_ids / close_ids / sep_ids: token sequences of ``<answer>``, ``</answer>`` and ``||``, or
        lists of alternative sequences (e.g. with and without a leading-space token of a BPE).
      table: the env's action table.
      ws_mask: bool[vocab] ids that decode to whitespace only.
      max_actions: K, the most actions per answer.

    Returns:
      :class:`ParsedActions` with ``actions`` int32[K].
    """
    ids = jnp.asarray(token_ids).astype(jnp.int32)
    n = ids.shape[0]
    pos = jnp.arange(n)
    in_len = pos < jnp.clip(jnp.asarray(length, jnp.int32), 0, n)
    ids = jnp.where(in_len, ids, _NEVER)
    open_start, open_end, _ = find_any(ids, _variants(open_ids))
    close_hit, _, _ = find_any(ids, _variants(close_ids))
    c = jnp.max(jnp.where(close_hit, pos, -1))
    ok_open = open_start & (open_end <= c)
    o = jnp.max(jnp.where(ok_open, pos, -1))
    complete = (c >= 0) & (o >= 0)
    single = (jnp.sum(open_start) == 1) & (jnp.sum(close_hit) == 1)
    start = jnp.max(jnp.where(ok_open & (pos == o), open_end, 0))
    in_span = complete & (pos >= start) & (pos < c)

    # separators inside the span (positions covered by an occurrence that lies in the span)
    sep_start, sep_end, _ = find_any(ids, _variants(sep_ids))
    sep_start = sep_start & in_span & (sep_end <= c)
    sep_cover_end = jax.lax.cummax(jnp.where(sep_start, sep_end, 0), axis=0)
    is_sep = in_span & (pos < sep_cover_end)
    is_ws = jnp.take(jnp.asarray(ws_mask), ids, mode="fill", fill_value=False)
    content = in_span & ~is_sep & ~is_ws

    # segment index of each id = number of separator runs before it in the span
    sep_run_start = is_sep & ~jnp.concatenate([jnp.zeros((1,), bool), is_sep[:-1]])
    seg = jnp.cumsum(sep_run_start)
    prev_seg = jnp.concatenate([jnp.full((1,), -1), jnp.where(content, seg, -1)])
    # first content id of its segment: no earlier content id with the same segment index
    last_content_seg = jax.lax.cummax(prev_seg[:-1], axis=0)
    first_of_seg = content & (last_content_seg != seg)
    rank = jnp.cumsum(first_of_seg) - 1  # rank among non-empty segments
    n_segments = jnp.sum(first_of_seg).astype(jnp.int32)
    # offset of each content id inside its segment
    content_count = jnp.cumsum(content)
    seg_first_count = jax.lax.cummax(jnp.where(first_of_seg, content_count, 0), axis=0)
    offset = content_count - seg_first_count

    k = int(max_actions)
    width = table.tokens.shape[1]
    row = jnp.where(content & (rank < k), rank, k)  # k = dropped
    col = jnp.where(offset < width, offset, width)
    seg_tokens = jnp.full((k, width), -1, jnp.int32).at[row, col].set(ids, mode="drop")
    seg_len = jnp.zeros((k,), jnp.int32).at[row].add(1, mode="drop")

    tab = jnp.asarray(table.tokens)
    match = jnp.all(seg_tokens[:, None, :] == tab[None, :, :], axis=-1) & (
        seg_len[:, None] == jnp.asarray(table.lengths)[None, :]
    )  # [K, V]
    matched = jnp.any(match, axis=-1)
    action = jnp.asarray(table.action_ids)[jnp.argmax(match, axis=-1)]
    present = jnp.arange(k) < n_segments
    ok = present & matched
    out_pos = jnp.where(ok, jnp.cumsum(ok) - 1, k)
    actions = jnp.full((k,), -1, jnp.int32).at[out_pos].set(action, mode="drop")
    num = jnp.sum(ok).astype(jnp.int32)
    num_invalid = (jnp.sum(present & ~matched) + jnp.maximum(n_segments - k, 0)).astype(jnp.int32)
    format_ok = complete & single & (n_segments > 0)
    return ParsedActions(actions=actions, num=num, format_ok=format_ok, num_invalid=num_invalid)
