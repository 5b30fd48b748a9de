"""Multi-turn rollouts: a fused on-device loop for JAX environments and a host turn loop.

Both paths are built from the same three jitted pieces, so with the same keys they produce the same
trajectories (bit for bit under greedy decoding):

* ``prefill``: write the first prompt chunk ``[prefix][obs_1][suffix]`` into the KV cache.
* ``generate_turn``: sample one response token by token (``lax.while_loop``) until the answer closes,
  a stop token is sampled, or the per-turn token budget is spent; every sampled token is fed back into
  the cache at once, so the cache always holds exactly the buffer's tokens and ``next_logits`` is the
  distribution after the last one.
* ``append_observation``: write ``[turn_prefix][obs_t][turn_suffix]`` (ragged ``obs_t``) into the cache.

The fused path (:func:`rollout_fused`) runs the turn loop in one ``lax.while_loop`` with the
environment's pure ``parse_actions`` / ``step`` inside: no host round trip per turn. The host path
(:func:`rollout_host`) calls the same pieces from Python and steps any environment on the host
(WebShop), or a JAX environment through a jitted step for comparison.

The policy is given as a :class:`Policy`: ``init_cache(batch, max_len)`` and a pure
``apply(params, tokens [B, T], num_valid [B], cache) -> (logits [B, T, V] float32, cache)`` obeying the
per-row write-position cache contract of :mod:`actfocus_jax.models.sampling`.

Sharding (DESIGN.md section 8): ``rollout_fused(..., mesh=mesh)`` splits the episode batch over the
mesh's batch axes ``("data", "fsdp")``, as :func:`actfocus_jax.parallel.shard_batch` does for
training. Every per-episode array of the loop (buffer, KV cache, next-token logits, environment
state) carries a ``with_sharding_constraint`` on its episode axis, so XLA's SPMD partitioner keeps
each device on its own rows and the returned :class:`RolloutBuffer` is sharded on its batch
dimension. Parameters stay where the caller put them (e.g. :func:`actfocus_jax.parallel.shard_params`,
as in training). The per-row writes (buffer slots, KV cache) are ``vmap``-ed scatters, so on a pure
data mesh the only cross-device traffic of the loop is the "any episode still running?" flag of each
``while_loop`` condition. With JAX's default partitionable threefry (``jax_threefry_partitionable``)
every random draw depends only on the key and the row, so a sharded rollout gives the same episodes as
a single-device one (float32 log-probs / entropies equal up to rounding, ~1e-6).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from actfocus_jax.models.sampling import sample_token
from actfocus_jax.parallel import BATCH_AXES, logical_to_mesh
from actfocus_jax.rollout.buffer import RolloutBuffer
from actfocus_jax.rollout.masks import compute_roles
from actfocus_jax.text.chat import format_observation, format_prompt
from actfocus_jax.text.tokenizer import TextTokenizer

__all__ = [
    "Policy",
    "RolloutConfig",
    "TurnTemplate",
    "check_rollout_batch",
    "make_turn_template",
    "rollout_fused",
    "rollout_host",
    "sample_from_logits",
    "sequence_budget",
    "system_prompt_for",
    "transformer_policy",
]


@dataclasses.dataclass(frozen=True)
class Policy:
    """A policy as two pure functions (hashable, so it can be a static jit argument).

    Attributes:
      apply: ``(params, tokens int32[B, T], num_valid int32[B], cache) -> (logits f32[B, T, V], cache)``.
      init_cache: ``(batch, max_len) -> cache`` with an int32 ``length [B]`` field (all zeros).
      cache_axes: ``(cache) -> pytree of PartitionSpec`` (the cache's structure) naming each cache
        leaf's logical axes, ``"batch"`` on the episode axis; other names map to mesh axes through
        :data:`actfocus_jax.parallel.DEFAULT_RULES`. Only sharded rollouts use it; None: the leading
        axis of every leaf is the episode axis.
      resize_cache: ``(cache, max_len) -> cache`` with ``max_len`` slots, the existing ones kept
        (grows only). With it :func:`rollout_host` sizes the cache to what the episodes have used
        so far, in blocks, instead of the whole budget; None: the cache has the budget's size.
    """

    apply: Callable[..., tuple[jax.Array, Any]]
    init_cache: Callable[[int, int], Any]
    cache_axes: Callable[[Any], Any] | None = None
    resize_cache: Callable[[Any, int], Any] | None = None


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling and budget settings of a rollout.

    Attributes:
      max_turns: turns per episode (defaults to the environment's).
      max_response_tokens: token budget of one response.
      temperature: softmax temperature (> 0); log-probs and entropies are of the scaled distribution.
      top_k: keep the k most likely tokens (0 = off).
      top_p: nucleus sampling mass (1.0 = off).
      greedy: argmax decoding (log-probs / entropies still of the temperature-scaled distribution).
    """

    max_turns: int = 5
    max_response_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.max_response_tokens < 1:
            raise ValueError(f"max_response_tokens must be >= 1, got {self.max_response_tokens}")
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class TurnTemplate:
    """Static token ids around observations and the tags that end a response.

    ``first_prefix + obs_1 + first_suffix`` opens an episode; ``turn_prefix + obs_t + turn_suffix``
    follows every later response. ``answer_open`` / ``answer_close`` are tag token sequences and
    ``stop_ids`` end a response when sampled (e.g. eos).
    """

    first_prefix: tuple[int, ...]
    first_suffix: tuple[int, ...]
    turn_prefix: tuple[int, ...]
    turn_suffix: tuple[int, ...]
    answer_open: tuple[int, ...]
    answer_close: tuple[int, ...]
    stop_ids: tuple[int, ...]
    pad_id: int


#: Short task statements for the embedded model (``prompt="compact"``); pretrained chat models
#: should get the environment's full rules (``env.system_prompt()``, ``prompt="full"``).
COMPACT_PROMPTS = {
    "sokoban": "sokoban : push the box X onto the target O .",
    "frozenlake": "frozen lake : go to the goal G and avoid the holes O .",
    "sudoku": "sudoku : fill the grid .",
    "webshop": "webshop : buy the product that matches the instruction .",
}
PROMPT_STYLES = ("full", "compact")


def system_prompt_for(env: Any, style: str = "full") -> str:
    """The system prompt of ``env``: its full rules, or a one-line statement (``"compact"``)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r} is unknown; use one of {PROMPT_STYLES}")
    if style == "full":
        return env.system_prompt()
    name = getattr(env, "name", None)
    if name not in COMPACT_PROMPTS:
        raise ValueError(f"no compact prompt for environment {name!r}; use prompt style 'full'")
    return COMPACT_PROMPTS[name]


def make_turn_template(
    tokenizer: TextTokenizer, system_prompt: str, fmt: str | None = None
) -> TurnTemplate:
    """Token template for ``fmt`` in {"plain", "chatml"} (default: the tokenizer's chat template)."""
    fmt = fmt or tokenizer.chat_template
    marker = "\x00OBS\x00"
    if fmt == "plain":
        first = format_prompt([("system", system_prompt), ("user", marker)], "plain")
    else:
        first = format_prompt([("system", system_prompt), ("user", marker)], "chatml")
    first_prefix, first_suffix = first.split(marker)
    turn_prefix, turn_suffix = format_observation(marker, fmt).split(marker)
    enc = lambda s: tuple(tokenizer.encode(s)) if s else ()
    stops = {tokenizer.eos_id}
    if fmt == "chatml" and tokenizer.token_to_id("<|im_end|>") is not None:
        stops.add(tokenizer.token_to_id("<|im_end|>"))
    return TurnTemplate(
        first_prefix=enc(first_prefix),
        first_suffix=enc(first_suffix),
        turn_prefix=enc(turn_prefix),
        turn_suffix=enc(turn_suffix),
        answer_open=tokenizer.tag_ids("answer_open"),
        answer_close=tokenizer.tag_ids("answer_close"),
        stop_ids=tuple(sorted(stops)),
        pad_id=tokenizer.pad_id,
    )


def sample_from_logits(
    key: jax.Array, logits: jax.Array, cfg: RolloutConfig
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Samples one token per row with :func:`actfocus_jax.models.sampling.sample_token`.

    Args:
      key: PRNG key.
      logits: float32 ``[B, V]`` raw logits.
      cfg: sampling settings.
    Returns:
      ``(token int32[B], logp f32[B], entropy f32[B], logit f32[B])``: the log-prob and entropy are of
      the temperature-scaled distribution *before* top-k / top-p truncation (the policy being trained),
      ``logit`` is the raw logit of the sampled token (for the ``neg_logit`` energy).
    """
    token, logp, entropy = sample_token(
        logits,
        key,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        greedy=cfg.greedy,
    )
    logit = jnp.take_along_axis(logits.astype(jnp.float32), token[:, None], axis=-1)[:, 0]
    return token, logp, entropy, logit


def check_rollout_batch(num_episodes: int, mesh: Mesh, *, group_size: int | None = None) -> None:
    """Raises a ValueError naming the fix unless ``num_episodes`` splits evenly over the mesh's batch
    axes (``data x fsdp``)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if num_episodes % n:
        what = f"{num_episodes} episodes"
        if group_size is not None:
            what += f" (num_tasks={num_episodes // group_size} x group_size={group_size})"
        raise ValueError(
            f"the rollout batch of {what} is not divisible by the {n} data-parallel devices of the "
            f"mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); make num_tasks x "
            f"group_size a multiple of {n} or use a mesh with fewer data/fsdp shards"
        )


def _row_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of an array whose leading axis is the episode axis: split over ``("data", "fsdp")``."""
    if ndim == 0:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def _shard_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Constrains every leaf of ``tree`` to be split over the mesh along its leading (episode) axis."""
    if mesh is None:
        return tree
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, _row_sharding(mesh, x.ndim)), tree
    )


def _cache_shardings(policy: Policy, cache: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` of every cache leaf from ``policy.cache_axes`` (episode axis over the batch
    axes, the other logical axes by the default rules, replicated where not divisible)."""
    if policy.cache_axes is None:
        return jax.tree.map(lambda x: _row_sharding(mesh, x.ndim), cache)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    specs = jax.tree.leaves(policy.cache_axes(cache), is_leaf=is_spec)
    leaves, treedef = jax.tree.flatten(cache)
    out = []
    for spec, x in zip(specs, leaves, strict=True):
        names = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
        if names.count("batch") != 1:
            raise ValueError(f"cache_axes spec {spec} must name exactly one 'batch' axis")
        other = [None if n == "batch" else n for n in names]
        mapped = list(logical_to_mesh(other, x.shape, mesh))
        mapped[names.index("batch")] = BATCH_AXES
        out.append(NamedSharding(mesh, PartitionSpec(*mapped)))
    return jax.tree.unflatten(treedef, out)


def _shard_carry(carry: _Carry, policy: Policy, mesh: Mesh | None) -> _Carry:
    """Constrains the rollout state (cache included) to be split over the mesh by episode."""
    if mesh is None:
        return carry
    cache = jax.tree.map(
        jax.lax.with_sharding_constraint, carry.cache, _cache_shardings(policy, carry.cache, mesh)
    )
    rest = _shard_rows(carry.replace(cache=None), mesh)
    return rest.replace(cache=cache)


@chex.dataclass
class _Carry:
    """Per-row rollout state threaded through the turn loop."""

    tokens: chex.Array  # int32[B, S]
    generated: chex.Array  # bool[B, S]
    turn_ids: chex.Array  # int32[B, S]
    old_logp: chex.Array  # f32[B, S]
    entropy: chex.Array  # f32[B, S]
    logit: chex.Array  # f32[B, S]
    length: chex.Array  # int32[B]
    next_logits: chex.Array  # f32[B, V]
    cache: Any
    active: chex.Array  # bool[B], episode still running
    turn_rewards: chex.Array  # f32[B, T]
    reward_pos: chex.Array  # int32[B, T]
    success: chex.Array  # bool[B]
    done: chex.Array  # bool[B]
    num_turns: chex.Array  # int32[B]
    num_actions: chex.Array  # int32[B]
    invalid_actions: chex.Array  # int32[B]
    truncated_responses: chex.Array  # int32[B]


def _set_rows(x: jax.Array, cols: jax.Array, values: Any) -> jax.Array:
    """``x[b, cols[b]] = values[b]`` for every row ``b`` of ``x [B, S]`` (``cols`` ``[B]`` or
    ``[B, C]``; ``values`` broadcast to its shape); columns outside ``[0, S)`` are dropped.

    Written per row (``vmap``) so the scatter has an explicit batch dimension and XLA's SPMD
    partitioner keeps a batch-sharded ``x`` local instead of all-gathering the updates.
    """
    values = jnp.broadcast_to(jnp.asarray(values).astype(x.dtype), cols.shape)
    return jax.vmap(lambda xr, c, v: xr.at[c].set(v, mode="drop"))(x, cols, values)


def _write_chunk(carry: _Carry, chunk: jax.Array, chunk_len: jax.Array, turn: jax.Array) -> _Carry:
    """Writes a ragged prompt chunk ``[B, C]`` (first ``chunk_len`` real) at each row's length."""
    c = chunk.shape[1]
    cols = carry.length[:, None] + jnp.arange(c)[None, :]
    cols = jnp.where(jnp.arange(c)[None, :] < chunk_len[:, None], cols, carry.tokens.shape[1])
    return carry.replace(
        tokens=_set_rows(carry.tokens, cols, chunk),
        turn_ids=_set_rows(carry.turn_ids, cols, turn),
    )


def _build_chunk(
    prefix: Sequence[int], obs: jax.Array, obs_len: jax.Array, suffix: Sequence[int], pad_id: int
) -> tuple[jax.Array, jax.Array]:
    """``[prefix][obs[:obs_len]][suffix]`` per row, left-aligned in ``[B, P + O + S]``."""
    b, o = obs.shape
    p, s = len(prefix), len(suffix)
    width = p + o + s
    out = jnp.full((b, width), pad_id, jnp.int32)
    if p:
        out = out.at[:, :p].set(jnp.asarray(prefix, jnp.int32)[None, :])
    obs_cols = jnp.where(
        jnp.arange(o)[None, :] < obs_len[:, None], p + jnp.arange(o)[None, :], width
    )
    out = _set_rows(out, obs_cols, obs)
    if s:
        suf_cols = p + obs_len[:, None] + jnp.arange(s)[None, :]
        out = _set_rows(out, suf_cols, jnp.asarray(suffix, jnp.int32)[None, :])
    return out, p + obs_len + s


def _feed_chunk(
    policy: Policy,
    params: Any,
    carry: _Carry,
    chunk: jax.Array,
    chunk_len: jax.Array,
    turn: jax.Array,
) -> _Carry:
    """Writes a prompt chunk into buffer and cache; ``next_logits`` follows its last real token."""
    logits, cache = policy.apply(params, chunk, chunk_len, carry.cache)
    last = jnp.clip(chunk_len - 1, 0, chunk.shape[1] - 1)
    new_next = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    new_next = jnp.where((chunk_len > 0)[:, None], new_next.astype(jnp.float32), carry.next_logits)
    carry = _write_chunk(carry, chunk, chunk_len, turn)
    return carry.replace(cache=cache, next_logits=new_next, length=carry.length + chunk_len)


def _generate_turn(
    policy: Policy,
    cfg: RolloutConfig,
    template: TurnTemplate,
    params: Any,
    carry: _Carry,
    key: jax.Array,
    turn: jax.Array,
) -> tuple[_Carry, jax.Array, jax.Array]:
    """Samples one response for every active row.

    Returns:
      ``(carry, response int32[B, R], response_len int32[B])``.
    """
    b, s = carry.tokens.shape
    r = cfg.max_response_tokens
    close = jnp.asarray(template.answer_close, jnp.int32)
    n_close = len(template.answer_close)
    stops = jnp.asarray(template.stop_ids, jnp.int32)

    def cond(state):
        i, _, _, running, _ = state
        return (i < r) & jnp.any(running)

    def body(state):
        i, c, resp, running, resp_len = state
        tok, logp, ent, logit = sample_from_logits(jax.random.fold_in(key, i), c.next_logits, cfg)
        tok = jnp.where(running, tok, template.pad_id)
        col = jnp.where(running & (c.length < s), c.length, s)
        c = c.replace(
            tokens=_set_rows(c.tokens, col, tok),
            generated=_set_rows(c.generated, col, True),
            turn_ids=_set_rows(c.turn_ids, col, turn),
            old_logp=_set_rows(c.old_logp, col, logp),
            entropy=_set_rows(c.entropy, col, ent),
            logit=_set_rows(c.logit, col, logit),
        )
        resp = resp.at[:, i].set(tok)
        wrote = running & (c.length < s)
        logits, cache = policy.apply(params, tok[:, None], wrote.astype(jnp.int32), c.cache)
        next_logits = jnp.where(wrote[:, None], logits[:, 0].astype(jnp.float32), c.next_logits)
        c = c.replace(cache=cache, next_logits=next_logits, length=c.length + wrote)
        resp_len = resp_len + wrote
        window = jax.lax.dynamic_slice_in_dim(
            resp, jnp.maximum(i - n_close + 1, 0), n_close, axis=1
        )
        closed = (i >= n_close - 1) & jnp.all(window == close[None, :], axis=1)
        stopped = jnp.any(tok[:, None] == stops[None, :], axis=1) | closed | (c.length >= s)
        return i + 1, c, resp, wrote & ~stopped, resp_len

    resp0 = jnp.full((b, r), template.pad_id, jnp.int32)
    init = (jnp.int32(0), carry, resp0, carry.active, jnp.zeros((b,), jnp.int32))
    _, carry, resp, running, resp_len = jax.lax.while_loop(cond, body, init)
    carry = carry.replace(truncated_responses=carry.truncated_responses + running.astype(jnp.int32))
    return carry, resp, resp_len


def _record_step(carry: _Carry, turn: jax.Array, played: jax.Array, ts: Any) -> _Carry:
    """Records an environment step's outcome for rows that ``played`` this turn."""
    reward = jnp.where(played, ts.reward.astype(jnp.float32), 0.0)
    pos = jnp.where(played, carry.length - 1, -1)
    done = played & ts.done
    return carry.replace(
        turn_rewards=carry.turn_rewards.at[:, turn].set(reward),
        reward_pos=carry.reward_pos.at[:, turn].set(pos),
        success=carry.success | (played & ts.success),
        done=carry.done | done,
        num_turns=carry.num_turns + played,
        num_actions=jnp.where(played, ts.num_actions, carry.num_actions),
        invalid_actions=carry.invalid_actions + jnp.where(played, ts.invalid_action > 0, 0),
        active=carry.active & ~done,
    )


def _init_carry(
    policy: Policy, b: int, s: int, t: int, vocab: int, pad_id: int, cache_len: int | None = None
) -> _Carry:
    return _Carry(
        tokens=jnp.full((b, s), pad_id, jnp.int32),
        generated=jnp.zeros((b, s), bool),
        turn_ids=jnp.full((b, s), -1, jnp.int32),
        old_logp=jnp.zeros((b, s), jnp.float32),
        entropy=jnp.zeros((b, s), jnp.float32),
        logit=jnp.zeros((b, s), jnp.float32),
        length=jnp.zeros((b,), jnp.int32),
        next_logits=jnp.zeros((b, vocab), jnp.float32),
        cache=policy.init_cache(b, s if cache_len is None else cache_len),
        active=jnp.ones((b,), bool),
        turn_rewards=jnp.zeros((b, t), jnp.float32),
        reward_pos=jnp.full((b, t), -1, jnp.int32),
        success=jnp.zeros((b,), bool),
        done=jnp.zeros((b,), bool),
        num_turns=jnp.zeros((b,), jnp.int32),
        num_actions=jnp.zeros((b,), jnp.int32),
        invalid_actions=jnp.zeros((b,), jnp.int32),
        truncated_responses=jnp.zeros((b,), jnp.int32),
    )


def sequence_budget(template: TurnTemplate, max_obs_len: int, cfg: RolloutConfig) -> int:
    """Token slots ``S`` an episode may need: first prompt, T responses, T-1 observations."""
    first = len(template.first_prefix) + max_obs_len + len(template.first_suffix)
    later = len(template.turn_prefix) + max_obs_len + len(template.turn_suffix)
    return first + cfg.max_turns * cfg.max_response_tokens + (cfg.max_turns - 1) * later


def _finish(
    carry: _Carry, template: TurnTemplate, group_size: int, task_ids: jax.Array
) -> RolloutBuffer:
    b, s = carry.tokens.shape
    valid = jnp.arange(s)[None, :] < carry.length[:, None]
    roles = compute_roles(
        carry.tokens, carry.generated & valid, valid, template.answer_open, template.answer_close
    )
    return RolloutBuffer(
        tokens=carry.tokens,
        roles=roles,
        turn_ids=jnp.where(valid, carry.turn_ids, -1),
        generated=carry.generated & valid,
        old_logp=carry.old_logp,
        entropy=carry.entropy,
        logit=carry.logit,
        length=carry.length,
        turn_rewards=carry.turn_rewards,
        reward_pos=carry.reward_pos,
        episode_return=jnp.sum(carry.turn_rewards, axis=1),
        success=carry.success,
        done=carry.done,
        num_turns=carry.num_turns,
        num_actions=carry.num_actions,
        invalid_actions=carry.invalid_actions,
        truncated=~carry.done,
        truncated_responses=carry.truncated_responses,
        group_id=jnp.arange(b, dtype=jnp.int32) // group_size,
        task_id=jnp.repeat(task_ids.astype(jnp.int32), group_size),
    )


def _expand_tasks(tasks: Any, group_size: int) -> Any:
    return jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), group_size, axis=0), tasks)


@functools.partial(
    jax.jit, static_argnames=("policy", "env", "template", "cfg", "group_size", "vocab", "mesh")
)
def rollout_fused(
    params: Any,
    tasks: Any,
    task_ids: jax.Array,
    key: jax.Array,
    *,
    policy: Policy,
    env: Any,
    template: TurnTemplate,
    cfg: RolloutConfig,
    group_size: int,
    vocab: int,
    mesh: Mesh | None = None,
) -> RolloutBuffer:
    """Runs ``num_tasks x group_size`` episodes of a JAX environment in one compiled loop.

    Args:
      params: policy parameters (pytree).
      tasks: a batch of tasks (pytree with leading axis ``num_tasks``); each is repeated ``group_size``
        times, group after group.
      task_ids: int32 ``[num_tasks]`` dataset ids of the tasks.
      key: PRNG key; episode ``i`` resets with ``fold_in(key_reset, i)``, turn ``t`` samples with
        ``fold_in(key_sample, t)``.
      policy, env, template, cfg: static (hashable) policy functions, environment, token template and
        sampling settings.
      group_size: rollouts per task ``G``.
      vocab: the policy's vocabulary size (logits width).
      mesh: a device mesh (:func:`actfocus_jax.parallel.make_mesh`) to split the ``B`` episodes
        over its ``("data", "fsdp")`` axes (module docstring); ``params`` should then live on the
        same devices (e.g. :func:`actfocus_jax.parallel.shard_params`), and ``tasks``, ``task_ids``
        and ``key`` be host arrays or on those devices. None: no sharding constraints.
    Returns:
      a :class:`RolloutBuffer` with ``B = num_tasks * group_size`` rows, split over the mesh's batch
      axes on its first dimension when ``mesh`` is given.
    Raises:
      ValueError: with ``mesh``, if ``B`` is not divisible by ``data x fsdp``.
    """
    ep_tasks = _expand_tasks(tasks, group_size)
    b = jax.tree.leaves(ep_tasks)[0].shape[0]
    if mesh is not None:
        check_rollout_batch(b, mesh, group_size=group_size)
    s = sequence_budget(template, env.max_obs_len, cfg)
    key_reset, key_sample = jax.random.split(key)
    reset_keys, ep_tasks = _shard_rows((jax.random.split(key_reset, b), ep_tasks), mesh)
    env_state, ts = _shard_rows(jax.vmap(env.reset)(reset_keys, ep_tasks), mesh)
    carry = _shard_carry(
        _init_carry(policy, b, s, cfg.max_turns, vocab, template.pad_id), policy, mesh
    )
    chunk, chunk_len = _build_chunk(
        template.first_prefix, ts.obs_tokens, ts.obs_len, template.first_suffix, template.pad_id
    )
    carry = _shard_carry(
        _feed_chunk(policy, params, carry, chunk, chunk_len, jnp.int32(0)), policy, mesh
    )

    def cond(state):
        turn, c, _ = state
        return (turn < cfg.max_turns) & jnp.any(c.active)

    def body(state):
        turn, c, env_state = state
        played = c.active
        c, resp, resp_len = _generate_turn(
            policy, cfg, template, params, c, jax.random.fold_in(key_sample, turn), turn
        )
        parsed = jax.vmap(env.parse_actions)(resp, resp_len)
        new_state, ts = jax.vmap(env.step)(env_state, parsed)
        env_state = _select_rows(played, new_state, env_state)
        c = _record_step(c, turn, played, ts)
        more = c.active & (turn + 1 < cfg.max_turns)
        chunk, chunk_len = _build_chunk(
            template.turn_prefix, ts.obs_tokens, ts.obs_len, template.turn_suffix, template.pad_id
        )
        c = _feed_chunk(policy, params, c, chunk, jnp.where(more, chunk_len, 0), turn + 1)
        return turn + 1, _shard_carry(c, policy, mesh), _shard_rows(env_state, mesh)

    _, carry, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), carry, env_state))
    return _shard_rows(_finish(carry, template, group_size, task_ids), mesh)


@functools.partial(
    jax.jit, static_argnames=("policy", "template", "b", "s", "t", "vocab", "cache_len")
)
def _host_prefill(params, chunk, chunk_len, *, policy, template, b, s, t, vocab, cache_len):
    carry = _init_carry(policy, b, s, t, vocab, template.pad_id, cache_len)
    return _feed_chunk(policy, params, carry, chunk, chunk_len, jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("policy", "cache_len"))
def _host_resize(cache, *, policy, cache_len):
    return policy.resize_cache(cache, cache_len)


@functools.partial(jax.jit, static_argnames=("policy", "cfg", "template"))
def _host_generate(params, carry, key, turn, *, policy, cfg, template):
    return _generate_turn(policy, cfg, template, params, carry, key, turn)


@functools.partial(jax.jit, static_argnames=("policy",))
def _host_feed(params, carry, chunk, chunk_len, turn, *, policy):
    return _feed_chunk(policy, params, carry, chunk, chunk_len, turn)


@functools.partial(jax.jit, static_argnames=("env",))
def _host_env_reset(keys, tasks, *, env):
    return jax.vmap(env.reset)(keys, tasks)


@functools.partial(jax.jit, static_argnames=("env",))
def _host_env_step(env_state, responses, response_len, *, env):
    parsed = jax.vmap(env.parse_actions)(responses, response_len)
    return jax.vmap(env.step)(env_state, parsed)


_host_record = jax.jit(_record_step)
_host_build_chunk = jax.jit(_build_chunk, static_argnums=(0, 3, 4))
_host_finish = jax.jit(_finish, static_argnums=(1, 2))


@chex.dataclass
class _HostStep:
    """A host environment's step results stacked over rows (fields as in a JAX ``Timestep``)."""

    obs_tokens: chex.Array  # int32[B, O]
    obs_len: chex.Array  # int32[B]
    reward: chex.Array  # f32[B]
    done: chex.Array  # bool[B]
    success: chex.Array  # bool[B]
    invalid_action: chex.Array  # int32[B]
    num_actions: chex.Array  # int32[B]


def _select_rows(mask: jax.Array, new: Any, old: Any) -> Any:
    """Per-row ``where`` over two pytrees with leading axis ``B``."""
    return jax.tree.map(
        lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old
    )


def rollout_host(
    params: Any,
    tasks: Any,
    task_ids: Any,
    key: jax.Array,
    *,
    policy: Policy,
    env: Any,
    template: TurnTemplate,
    cfg: RolloutConfig,
    group_size: int,
    vocab: int,
    cache_block: int = 256,
) -> RolloutBuffer:
    """The same rollout as :func:`rollout_fused`, with the turn loop on the host.

    For a JAX environment (one with ``parse_actions`` and ``step`` over pytrees) the environment is
    stepped through jitted ``vmap``-ed calls, with the same keys as the fused path. For a host
    environment (``env.is_host_env`` True, e.g. WebShop) ``tasks`` is a list of task specs and the
    environment is stepped row by row in Python from the decoded responses.

    ``cache_block``: if the policy can resize its cache (:attr:`Policy.resize_cache`), the cache
    starts with what the first prompt and response need and grows in blocks of this many slots
    before a turn could overflow it, so attention reads the slots the episodes have used rather
    than the whole budget (WebShop: 9 turns of up to 384-token pages, ~4,000 slots, while episodes
    use ~1,000-2,000). Each cache size compiles the turn functions once. 0: the whole budget.
    """
    if cache_block < 0:
        raise ValueError(f"cache_block must be >= 0 (0: no growth), got {cache_block}")
    b_tasks = len(task_ids)
    b = b_tasks * group_size
    s = sequence_budget(template, env.max_obs_len, cfg)
    block = cache_block if policy.resize_cache is not None else 0

    def cache_size(need: int) -> int:
        """Slots for ``need`` tokens: the budget, or ``need`` rounded up to a block."""
        return s if not block else min(s, -(-need // block) * block)

    def fit(carry: _Carry, need: int, size: int) -> tuple[_Carry, int]:
        """Grows the cache to hold ``need`` tokens in every row (``size``: its current slots)."""
        new = cache_size(need)
        if new <= size:
            return carry, size
        return carry.replace(cache=_host_resize(carry.cache, policy=policy, cache_len=new)), new

    key_reset, key_sample = jax.random.split(key)
    host = getattr(env, "is_host_env", False)
    if host:
        episodes = [t for t in tasks for _ in range(group_size)]
        states, steps = zip(*(env.reset(task) for task in episodes), strict=True)
        states = list(states)
        ts = _stack_host_steps(steps, env.max_obs_len, template.pad_id)
    else:
        ep_tasks = _expand_tasks(tasks, group_size)
        env_state, ts = _host_env_reset(jax.random.split(key_reset, b), ep_tasks, env=env)
    chunk, chunk_len = _host_build_chunk(
        template.first_prefix,
        jnp.asarray(ts.obs_tokens),
        jnp.asarray(ts.obs_len),
        template.first_suffix,
        template.pad_id,
    )
    size = cache_size(int(jnp.max(chunk_len)) + cfg.max_response_tokens)
    carry = _host_prefill(
        params,
        chunk,
        chunk_len,
        policy=policy,
        template=template,
        b=b,
        s=s,
        t=cfg.max_turns,
        vocab=vocab,
        cache_len=size,
    )
    for turn in range(cfg.max_turns):
        if not bool(jnp.any(carry.active)):
            break
        carry, size = fit(carry, int(jnp.max(carry.length)) + cfg.max_response_tokens, size)
        played = carry.active
        t = jnp.int32(turn)
        carry, resp, resp_len = _host_generate(
            params,
            carry,
            jax.random.fold_in(key_sample, t),
            t,
            policy=policy,
            cfg=cfg,
            template=template,
        )
        if host:
            resp_np, len_np, played_np = np.asarray(resp), np.asarray(resp_len), np.asarray(played)
            results = []
            for i in range(b):
                if played_np[i]:
                    states[i], res = env.step(states[i], resp_np[i, : len_np[i]].tolist())
                else:
                    res = None
                results.append(res)
            ts = _stack_host_steps(results, env.max_obs_len, template.pad_id)
        else:
            new_state, ts = _host_env_step(env_state, resp, resp_len, env=env)
            env_state = _select_rows(played, new_state, env_state)
        carry = _host_record(carry, t, played, ts)
        more = carry.active & (turn + 1 < cfg.max_turns)
        chunk, chunk_len = _host_build_chunk(
            template.turn_prefix,
            jnp.asarray(ts.obs_tokens),
            jnp.asarray(ts.obs_len),
            template.turn_suffix,
            template.pad_id,
        )
        chunk_len = jnp.where(more, chunk_len, 0)
        carry, size = fit(carry, int(jnp.max(carry.length + chunk_len)), size)
        carry = _host_feed(params, carry, chunk, chunk_len, t + 1, policy=policy)
    return _host_finish(carry, template, group_size, jnp.asarray(task_ids))


def _stack_host_steps(steps: Sequence[Any], max_obs_len: int, pad_id: int) -> _HostStep:
    """Stacks per-row host results (objects with obs token ids, reward, done, info) into arrays."""
    n = len(steps)
    obs = np.full((n, max_obs_len), pad_id, np.int32)
    obs_len = np.zeros((n,), np.int32)
    reward = np.zeros((n,), np.float32)
    done = np.zeros((n,), bool)
    success = np.zeros((n,), bool)
    invalid = np.zeros((n,), np.int32)
    num_actions = np.zeros((n,), np.int32)
    for i, st in enumerate(steps):
        if st is None:
            continue
        ids = list(st.obs_tokens)
        if len(ids) > max_obs_len:
            raise ValueError(
                f"observation of {len(ids)} tokens exceeds the environment's max_obs_len={max_obs_len}; "
                "raise max_obs_len or shorten the observation"
            )
        obs[i, : len(ids)] = ids
        obs_len[i] = len(ids)
        reward[i] = st.reward
        done[i] = st.done
        success[i] = st.success
        invalid[i] = st.invalid_action
        num_actions[i] = st.num_actions
    return _HostStep(
        obs_tokens=jnp.asarray(obs),
        obs_len=jnp.asarray(obs_len),
        reward=jnp.asarray(reward),
        done=jnp.asarray(done),
        success=jnp.asarray(success),
        invalid_action=jnp.asarray(invalid),
        num_actions=jnp.asarray(num_actions),
    )


@functools.lru_cache(maxsize=32)
def transformer_policy(graphdef: Any, config: Any) -> Policy:
    """The :class:`Policy` of an ``nnx.split`` transformer (memoised, so jit caches are reused).

    Args:
      graphdef: the static graph definition of a :class:`~actfocus_jax.models.CausalLM`.
      config: its :class:`~actfocus_jax.models.ModelConfig`.
    """
    from actfocus_jax.models.transformer import forward_with_cache, init_cache, resize_cache

    return Policy(
        apply=functools.partial(forward_with_cache, graphdef),
        init_cache=functools.partial(init_cache, config),
        cache_axes=_kv_cache_axes,
        resize_cache=resize_cache,
    )


def _kv_cache_axes(cache: Any) -> Any:
    """Logical axes of a :class:`~actfocus_jax.models.transformer.KVCache`: ``k``/``v``
    ``[layers, batch, slots, kv_heads, head_dim]`` and ``length [batch]``."""
    kv = PartitionSpec("layers", "batch", None, "kv_heads", None)
    return cache.replace(k=kv, v=kv, length=PartitionSpec("batch"))
