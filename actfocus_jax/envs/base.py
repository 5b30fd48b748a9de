"""Shared pieces of the JAX environments (DESIGN.md section 6, the shared environment API).

Environments are Python objects that hold only static configuration and constant token tables
(NumPy arrays); every game method is a pure function over pytrees, ``jit``- and ``vmap``-able, in the
style of gymnax / Jumanji:

* ``env.reset(key, task) -> (state, Timestep)``
* ``env.step(state, parsed: ParsedActions) -> (state, Timestep)``
* ``env.parse_actions(token_ids: int32[L], length: int32[]) -> ParsedActions``

This module provides

* :class:`Timestep` and :class:`ParsedActions` (``chex`` dataclasses, scalar fields are 0-d arrays);
* :class:`ActionTable` / :func:`build_action_table`: the env's actions as padded token sequences,
  consumed by :func:`actfocus_jax.envs.parsing.parse_actions`;
* :func:`whitespace_token_mask`: which token ids decode to whitespace only (ignored inside answers);
* :class:`GridRenderer`: grid of symbol codes -> observation token ids on device (and the same text on
  the host);
* :class:`JaxEnv`: the base class, with the RAGEN-style turn logic shared by the grid envs
  (:meth:`JaxEnv.run_turn`): format penalty and no move on invalid output, actions applied one after
  another until the episode ends or the per-episode action cap is reached.

Turn semantics (shared by Sokoban, FrozenLake, Sudoku; RAGEN's ``es_manager`` conventions where known):

* A turn is *valid* iff ``parsed.format_ok`` and ``parsed.num_invalid == 0`` (``format_ok`` is False
  for an empty answer). An invalid turn gets ``format_penalty`` (default -0.1, RAGEN's
  ``es_manager.format_penalty``) as its whole reward and makes no move at all (RAGEN would still
  execute the valid actions of a partly valid answer; we do not, as specified by the project).
  ``Timestep.invalid_action`` is then ``num_invalid`` (at least 1).
* A valid turn applies ``parsed.actions[:parsed.num]`` one after another; each executed action counts
  towards ``max_actions_per_episode``; execution stops when the episode ends (success / terminal
  state) or the cap is reached. The turn's reward is the sum of the executed actions' rewards.
* Every step on a not-yet-done episode counts one turn; ``done`` becomes True at ``max_turns`` turns,
  at the action cap, or on a terminal state. Steps on a done episode are no-ops with zero reward
  (absorbing), so batched rollouts can keep stepping finished instances.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from actfocus_jax.text.tokenizer import TextTokenizer, build_embedded_tokenizer

__all__ = [
    "ActionTable",
    "GridRenderer",
    "JaxEnv",
    "ParsedActions",
    "Timestep",
    "build_action_table",
    "stack_tasks",
    "tag_variants",
    "unknown_tokens",
    "whitespace_token_mask",
]


@chex.dataclass
class Timestep:
    """What an env returns after ``reset`` / ``step`` (unbatched shapes; ``vmap`` adds a batch axis).

    Attributes:
      obs_tokens: int32[max_obs_len] observation token ids, padded with the tokenizer's pad id.
      obs_len: int32[] number of valid ids in ``obs_tokens``.
      reward: float32[] reward of this turn (sum over its executed actions, or the format penalty).
      done: bool[] the episode is over (success, terminal state, turn cap or action cap).
      success: bool[] the task is solved.
      invalid_action: int32[] invalid segments in this turn's answer (>= 1 when the turn was invalid).
      num_actions: int32[] actions executed so far in the episode.
      turn: int32[] turns taken so far in the episode (0 after reset).
    """

    obs_tokens: jax.Array
    obs_len: jax.Array
    reward: jax.Array
    done: jax.Array
    success: jax.Array
    invalid_action: jax.Array
    num_actions: jax.Array
    turn: jax.Array


@chex.dataclass
class ParsedActions:
    """Actions parsed from one generated response (see :mod:`actfocus_jax.envs.parsing`).

    Attributes:
      actions: int32[K] action indices of the valid segments, in order, -1 padding
        (``K = env.max_actions_per_turn``).
      num: int32[] number of valid actions in ``actions``.
      format_ok: bool[] an answer span was found, well-formed (exactly one opening and one closing
        tag, in order) and not empty.
      num_invalid: int32[] non-empty segments that are not valid actions, including every segment
        beyond the first K.
    """

    actions: jax.Array
    num: jax.Array
    format_ok: jax.Array
    num_invalid: jax.Array

    def is_valid(self) -> jax.Array:
        """bool[]: the turn may be executed (well-formed and no invalid segment)."""
        return self.format_ok & (self.num_invalid == 0) & (self.num > 0)

    @classmethod
    def from_list(cls, actions: Sequence[int], max_actions: int) -> ParsedActions:
        """A valid ``ParsedActions`` holding ``actions`` (host helper for tests and solvers).

        Actions beyond ``max_actions`` are counted in ``num_invalid``.
        """
        acts = list(actions)[:max_actions]
        padded = np.full((max_actions,), -1, np.int32)
        padded[: len(acts)] = acts
        return cls(
            actions=jnp.asarray(padded),
            num=jnp.asarray(len(acts), jnp.int32),
            format_ok=jnp.asarray(len(actions) > 0),
            num_invalid=jnp.asarray(max(0, len(actions) - max_actions), jnp.int32),
        )


# ----------------------------------------------------------------------------------------------
# Token tables
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActionTable:
    """The env's actions as padded token sequences (several spellings per action allowed).

    Attributes:
      tokens: int32[V, M] token ids of each variant (whitespace-only tokens removed), padded with -1.
      lengths: int32[V] number of ids of each variant.
      action_ids: int32[V] the action index each variant stands for.
      num_actions: number of distinct actions (``len(env.action_names)``).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    action_ids: np.ndarray
    num_actions: int


def whitespace_token_mask(tokenizer: TextTokenizer) -> np.ndarray:
    """bool[vocab_size]: ids whose decoded text is whitespace only (e.g. ``"\\n"``, BPE's ``"Ġ"``).

    The parser ignores these ids inside an answer, so ``<answer> Up || Down </answer>`` parses the
    same way whether or not the tokenizer emits separate whitespace tokens.
    """
    vocab = tokenizer.vocab_size
    texts = tokenizer.tokenizer.decode_batch([[i] for i in range(vocab)], skip_special_tokens=False)
    return np.array([t.strip() == "" and t != "" for t in texts], dtype=bool)


def build_action_table(
    tokenizer: TextTokenizer,
    action_names: Sequence[str],
    *,
    aliases: Mapping[int, Sequence[str]] | None = None,
    case_insensitive: bool = True,
    ws_mask: np.ndarray | None = None,
) -> ActionTable:
    """Builds the :class:`ActionTable` of ``action_names`` for ``tokenizer``.

    Each action gets the variants ``name`` and ``" " + name`` (BPE tokenizers often encode a word
    differently after a space), plus its lower-case and capitalised spellings when
    ``case_insensitive`` (RAGEN matches action words case-insensitively), plus ``aliases[i]``.
    Whitespace-only tokens are removed from each variant (as the parser removes them from segments);
    variants that contain ``<unk>`` or encode to nothing are skipped; duplicates are removed.

    Raises:
      ValueError: if some action has no usable spelling under ``tokenizer``.
    """
    if ws_mask is None:
        ws_mask = whitespace_token_mask(tokenizer)
    unk = tokenizer.token_to_id("<unk>")
    rows: list[tuple[int, tuple[int, ...]]] = []
    seen: set[tuple[int, ...]] = set()
    for index, name in enumerate(action_names):
        spellings = [name]
        if case_insensitive:
            spellings += [name.lower(), name.capitalize(), name.upper()]
        spellings += list((aliases or {}).get(index, ()))
        found = False
        for spelling in spellings:
            for text in (spelling, " " + spelling):
                ids = tuple(
                    i for i in tokenizer.encode(text) if not (0 <= i < len(ws_mask) and ws_mask[i])
                )
                if not ids or (unk is not None and unk in ids):
                    continue
                found = True
                if ids in seen:
                    continue
                seen.add(ids)
                rows.append((index, ids))
        if not found:
            raise ValueError(f"action {name!r} has no spelling the tokenizer can encode")
    width = max(len(ids) for _, ids in rows)
    tokens = np.full((len(rows), width), -1, np.int32)
    for r, (_, ids) in enumerate(rows):
        tokens[r, : len(ids)] = ids
    return ActionTable(
        tokens=tokens,
        lengths=np.array([len(ids) for _, ids in rows], np.int32),
        action_ids=np.array([index for index, _ in rows], np.int32),
        num_actions=len(action_names),
    )


def tag_variants(
    tokenizer: TextTokenizer, name: str, ws_mask: np.ndarray | None = None
) -> tuple[tuple[int, ...], ...]:
    """Token sequences of tag ``name`` as it may appear in a response.

    ``tokenizer.tag_ids(name)`` first, then the encoding of ``" " + tag`` with whitespace-only tokens
    removed when it differs (a byte-level BPE may merge the space into the tag's first token, e.g.
    ``"Ġ||"``). With the embedded tokenizer both are the same single token.
    """
    if ws_mask is None:
        ws_mask = whitespace_token_mask(tokenizer)
    out = [tuple(tokenizer.tag_ids(name))]
    ids = tuple(
        i
        for i in tokenizer.encode(" " + tokenizer.tags[name])
        if not (0 <= i < len(ws_mask) and ws_mask[i])
    )
    if ids and ids not in out:
        out.append(ids)
    return tuple(out)


def unknown_tokens(tokenizer: TextTokenizer, text: str) -> list[str]:
    """Pieces of ``text`` that encode to ``<unk>`` (empty when the text is fully in the vocabulary)."""
    unk = tokenizer.token_to_id("<unk>")
    if unk is None:
        return []
    enc = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    return [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk]


def stack_tasks(tasks: Sequence[Any]) -> Any:
    """Stacks same-shaped task pytrees along a new leading axis (for ``vmap(env.reset)``)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *tasks)


class GridRenderer:
    """Renders a grid of symbol codes as observation tokens (device) and text (host).

    Text layout: ``header`` followed by the rows, each row the cell symbols separated by single
    spaces, rows separated by ``"\\n"`` (no trailing newline). Example (Sokoban, header
    ``"State:\\n"``)::

        State:
        # # # #
        # P X O
        # # # #

    On device the tokens are the concatenation of per-piece token sequences precomputed at
    construction: ``encode(header)``, ``encode(symbol)`` for the first cell of a row,
    ``encode(" " + symbol)`` for the others and ``encode("\\n")`` between rows. With the embedded
    word-level tokenizer every symbol and the newline are one token and the result equals
    ``encode(text)``; with a BPE tokenizer it is a valid tokenization of the same text that may differ
    from encoding the whole string at once.

    Args:
      tokenizer: the tokenizer.
      symbols: symbol string of each code ``0..S-1``.
      height, width: grid shape ``[H, W]``.
      header: fixed text before the grid.
    """

    def __init__(
        self, tokenizer: TextTokenizer, symbols: Sequence[str], height: int, width: int, header: str
    ):
        self.symbols = tuple(symbols)
        self.height, self.width, self.header = int(height), int(width), header
        self.pad_id = int(tokenizer.pad_id)
        self.header_ids = np.array(tokenizer.encode(header) if header else [], np.int32)
        pieces = [[tokenizer.encode(s) for s in self.symbols]]
        pieces.append([tokenizer.encode(" " + s) for s in self.symbols])
        width_p = max(len(p) for row in pieces for p in row)
        #: int32[2, S, P] piece tokens (variant 0: first cell of a row, 1: with leading space).
        self.piece_tokens = np.full((2, len(self.symbols), width_p), self.pad_id, np.int32)
        #: int32[2, S] piece lengths.
        self.piece_lens = np.zeros((2, len(self.symbols)), np.int32)
        for v, row in enumerate(pieces):
            for s, ids in enumerate(row):
                self.piece_tokens[v, s, : len(ids)] = ids
                self.piece_lens[v, s] = len(ids)
        self.newline_ids = np.array(tokenizer.encode("\n"), np.int32)
        #: Static upper bound of the observation length.
        self.max_len = (
            len(self.header_ids)
            + self.height * self.width * width_p
            + (self.height - 1) * len(self.newline_ids)
        )

    def text(self, codes: np.ndarray) -> str:
        """Host rendering of ``codes`` int[H, W] (the text that :meth:`tokens` tokenizes)."""
        codes = np.asarray(codes)
        rows = [" ".join(self.symbols[int(c)] for c in row) for row in codes]
        return self.header + "\n".join(rows)

    def tokens(self, codes: jax.Array, max_len: int | None = None) -> tuple[jax.Array, jax.Array]:
        """Device rendering: ``codes`` int[H, W] -> (int32[max_len] ids padded with pad, int32[] length).

        ``max_len`` defaults to :attr:`max_len`; it may be larger (extra padding).
        """
        max_len = self.max_len if max_len is None else max_len
        h, w = self.height, self.width
        variant = jnp.broadcast_to((jnp.arange(w) > 0).astype(jnp.int32), (h, w))
        cell_tok = jnp.asarray(self.piece_tokens)[variant, codes]  # [H, W, P]
        cell_len = jnp.asarray(self.piece_lens)[variant, codes]  # [H, W]
        p = cell_tok.shape[-1]
        cell_valid = jnp.arange(p)[None, None, :] < cell_len[..., None]
        row_tok = cell_tok.reshape(h, w * p)
        row_valid = cell_valid.reshape(h, w * p)
        nl = len(self.newline_ids)
        if nl:
            nl_tok = jnp.broadcast_to(jnp.asarray(self.newline_ids), (h, nl))
            nl_valid = jnp.broadcast_to((jnp.arange(h) < h - 1)[:, None], (h, nl))
            row_tok = jnp.concatenate([row_tok, nl_tok], axis=1)
            row_valid = jnp.concatenate([row_valid, nl_valid], axis=1)
        flat_tok, flat_valid = row_tok.reshape(-1), row_valid.reshape(-1)
        n_head = len(self.header_ids)
        pos = n_head + jnp.cumsum(flat_valid) - 1
        pos = jnp.where(flat_valid, pos, max_len)
        out = jnp.full((max_len,), self.pad_id, jnp.int32)
        if n_head:
            out = out.at[:n_head].set(jnp.asarray(self.header_ids))
        out = out.at[pos].set(flat_tok, mode="drop")
        length = jnp.minimum(n_head + jnp.sum(flat_valid), max_len).astype(jnp.int32)
        return out, length


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------

ApplyFn = Callable[[Any, jax.Array], tuple[Any, jax.Array, jax.Array, jax.Array]]


class JaxEnv:
    """Base class of the pure-JAX environments (see the module docstring for the turn semantics).

    Subclasses set ``name`` and ``action_names`` and implement ``reset``, ``step``, ``render_text``,
    ``system_prompt``, ``solve`` and ``generate_task``; ``step`` typically is
    ``self.run_turn(state, parsed, self._apply_action)`` followed by :meth:`make_timestep`.
    Their ``state`` must be a ``chex`` dataclass with int32 ``num_actions``, ``turn`` and bool
    ``done``, ``success`` fields (0-d arrays).

    Args:
      tokenizer: a :class:`TextTokenizer`; None means the embedded tokenizer.
      max_turns: turns per episode.
      max_actions_per_turn: K, the most actions one answer may hold.
      max_actions_per_episode: action cap per episode.
      format_penalty: reward of an invalid turn (RAGEN's format penalty, default -0.1).
      action_aliases: extra spellings per action index (see :func:`build_action_table`).
    """

    name: str = "base"
    action_names: tuple[str, ...] = ()

    def __init__(
        self,
        tokenizer: TextTokenizer | None = None,
        *,
        max_turns: int,
        max_actions_per_turn: int,
        max_actions_per_episode: int,
        format_penalty: float = -0.1,
        action_aliases: Mapping[int, Sequence[str]] | None = None,
    ):
        if min(max_turns, max_actions_per_turn, max_actions_per_episode) < 1:
            raise ValueError(
                "max_turns, max_actions_per_turn, max_actions_per_episode must be >= 1"
            )
        self.tokenizer = tokenizer if tokenizer is not None else build_embedded_tokenizer()
        self.max_turns = int(max_turns)
        self.max_actions_per_turn = int(max_actions_per_turn)
        self.max_actions_per_episode = int(max_actions_per_episode)
        self.format_penalty = float(format_penalty)
        self.ws_mask = whitespace_token_mask(self.tokenizer)
        self.action_table = build_action_table(
            self.tokenizer, self.action_names, aliases=action_aliases, ws_mask=self.ws_mask
        )
        #: Token-sequence variants of ``<answer>``, ``</answer>`` and ``||`` (see :func:`tag_variants`).
        self.answer_open_ids = tag_variants(self.tokenizer, "answer_open", self.ws_mask)
        self.answer_close_ids = tag_variants(self.tokenizer, "answer_close", self.ws_mask)
        self.sep_ids = tag_variants(self.tokenizer, "action_sep", self.ws_mask)

    # --- parsing -------------------------------------------------------------------------------

    def parse_actions(self, token_ids: jax.Array, length: jax.Array) -> ParsedActions:
        """Parses one response ``token_ids`` int32[L] with ``length`` valid ids (jit-able)."""
        from actfocus_jax.envs.parsing import parse_actions

        return parse_actions(
            token_ids,
            length,
            open_ids=self.answer_open_ids,
            close_ids=self.answer_close_ids,
            sep_ids=self.sep_ids,
            table=self.action_table,
            ws_mask=self.ws_mask,
            max_actions=self.max_actions_per_turn,
        )

    def parse_text(self, text: str) -> ParsedActions:
        """Host convenience: tokenizes ``text`` and parses it (jitted; ids padded to a power of 2)."""
        ids = self.tokenizer.encode(text)
        size = max(64, 1 << max(0, len(ids) - 1).bit_length())
        arr = np.full((size,), self.tokenizer.pad_id, np.int32)
        arr[: len(ids)] = ids
        if getattr(self, "_parse_jit", None) is None:
            self._parse_jit = jax.jit(self.parse_actions)
        return self._parse_jit(jnp.asarray(arr), jnp.asarray(len(ids), jnp.int32))

    # --- turn logic ----------------------------------------------------------------------------

    def run_turn(
        self, state: Any, parsed: ParsedActions, apply_action: ApplyFn
    ) -> tuple[Any, jax.Array, jax.Array]:
        """Runs one turn; returns ``(state, reward float32[], invalid_action int32[])``.

        ``apply_action(state, action int32[]) -> (state, reward, terminal, success)`` executes ONE
        action (the env's rules) and must be pure; this method handles validity, the format penalty,
        the per-episode action cap, the turn count and ``done`` / ``success``.
        """
        active = ~state.done
        valid = parsed.is_valid()
        k = parsed.actions.shape[-1]

        def body(i, carry):
            st, total = carry
            go = (
                active
                & valid
                & (i < parsed.num)
                & ~st.done
                & (st.num_actions < self.max_actions_per_episode)
            )
            new, r, terminal, succ = apply_action(st, jnp.maximum(parsed.actions[i], 0))
            n_act = st.num_actions + 1
            new = new.replace(
                num_actions=n_act,
                success=succ,
                done=terminal | (n_act >= self.max_actions_per_episode),
            )
            st = jax.tree_util.tree_map(lambda a, b: jnp.where(go, a, b), new, st)
            return st, total + jnp.where(go, r, 0.0)

        st, total = jax.lax.fori_loop(0, k, body, (state, jnp.zeros((), jnp.float32)))
        turn = state.turn + active.astype(jnp.int32)
        st = st.replace(turn=turn, done=st.done | (turn >= self.max_turns))
        reward = jnp.where(active & ~valid, jnp.float32(self.format_penalty), total)
        invalid = jnp.where(active & ~valid, jnp.maximum(parsed.num_invalid, 1), 0).astype(
            jnp.int32
        )
        return st, reward.astype(jnp.float32), invalid

    def make_timestep(
        self,
        state: Any,
        obs: tuple[jax.Array, jax.Array],
        reward: jax.Array | float = 0.0,
        invalid_action: jax.Array | int = 0,
    ) -> Timestep:
        """Assembles a :class:`Timestep` from a state with the base fields and ``(obs_tokens, len)``."""
        return Timestep(
            obs_tokens=obs[0].astype(jnp.int32),
            obs_len=jnp.asarray(obs[1], jnp.int32),
            reward=jnp.asarray(reward, jnp.float32),
            done=jnp.asarray(state.done, bool),
            success=jnp.asarray(state.success, bool),
            invalid_action=jnp.asarray(invalid_action, jnp.int32),
            num_actions=jnp.asarray(state.num_actions, jnp.int32),
            turn=jnp.asarray(state.turn, jnp.int32),
        )

    # --- interface the subclasses implement ----------------------------------------------------

    @property
    def max_obs_len(self) -> int:
        raise NotImplementedError

    def reset(self, key: jax.Array, task: Any) -> tuple[Any, Timestep]:
        raise NotImplementedError

    def step(self, state: Any, parsed: ParsedActions) -> tuple[Any, Timestep]:
        raise NotImplementedError

    def render_text(self, state: Any) -> str:
        raise NotImplementedError

    def system_prompt(self) -> str:
        raise NotImplementedError

    def solve(self, task: Any) -> list[int] | None:
        raise NotImplementedError

    def generate_task(self, rng: np.random.Generator) -> Any:
        raise NotImplementedError
