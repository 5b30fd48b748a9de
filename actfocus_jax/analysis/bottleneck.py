"""The Action Bottleneck statistic (DESIGN.md section 3).

For a group of ``G`` rollouts of one task with episode rewards ``r_1..r_G`` and a role ``k`` in
{REASONING, ACTION}, the score of rollout ``i`` is

* ``variant="sum"``:  ``S_i^k = sum of e_t over the role-k tokens of rollout i``;
* ``variant="mean"``: ``S_i^k = mean of e_t over those tokens``;

with ``e_t`` a token energy (:func:`actfocus_jax.rl.actfocus.token_energies`: ``neg_logprob`` from
the rollout-time ``old_logp``, ``entropy``, or ``neg_logit`` from the rollout-time ``logit``), and the
group's statistic is ``rho^k = Pearson(S^k, r)``. Over all *eligible* groups (reward variance > 0)
we report ``mean |rho^k|``, the token share of role ``k`` among the generated tokens of those groups,
and the per-token density ``mean|rho^k| / share^k``; optionally per turn (tokens restricted to turn
``t``; the reward stays the episode return).

Conventions (every degenerate case gives a finite number, never NaN):

* **Layout.** Rows are laid out group after group (rows ``g*G .. g*G+G-1`` are group ``g``), as in
  :class:`~actfocus_jax.rollout.buffer.RolloutBuffer`; ``B`` must be a multiple of ``G``.
* **Eligible group.** ``max(r) - min(r) > 1e-5 * max(|max r|, |min r|)`` over the group's rows in
  scope ("variance > 0", with a relative tolerance :data:`CONSTANT_RTOL` for float32 rounding).
  In the full-trajectory scope every row of the group is in scope; in the turn-``t`` scope a row is in scope when it has at least one generated token in turn ``t`` (rows that
  never reached turn ``t`` have no turn ``t``; counting them as ``S = 0`` would correlate episode
  length, not energies, with the reward). On data where every row generates in turn 0 and nowhere
  else, the turn-0 statistic therefore equals the full one.
* **Participants.** ``variant="sum"``: every in-scope row (a row without role-k tokens has
  ``S = 0``, the empty sum). ``variant="mean"``: in-scope rows with at least one role-k token (the
  mean over no tokens is undefined, so the row is left out of that role's correlation).
* **Degenerate correlation.** If among the participants ``S^k`` or ``r`` is constant (same
  relative tolerance: equal sums that differ only by float32 rounding are constant) or there are fewer than 2 participants, ``rho^k = 0`` and the group is flagged
  ``degenerate`` for role ``k``; it still counts in ``mean |rho^k|`` (the role carries no linear
  signal in that group). Both roles are thus averaged over the same set of groups.
* **Empty reports.** Without eligible groups, ``mean_abs_rho``, ``share`` and ``density`` are 0 and
  ``n_groups`` is 0; a role with share 0 has density 0.

Under the null hypothesis (energies independent of the reward) ``|rho|`` is not 0 but about
``sqrt(2 / (pi (n - 1)))`` for ``n`` participants, so ``density`` of a rare role is inflated by that
floor; :func:`bottleneck_report` therefore also gives a within-group permutation estimate of the
null ``mean |rho|`` and the excess density ``(mean|rho| - null) / share``.

The jit-able core is :func:`bottleneck_core` (arrays in, :class:`BottleneckStats` out);
:func:`bottleneck_stats` is its host entry point (takes a buffer, a train batch or a dict);
:func:`bottleneck_report` adds percentile-bootstrap CIs over groups (:func:`bootstrap_ci`);
:func:`bottleneck_metrics` / :func:`batch_bottleneck_metrics` are the cheap per-step summary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from actfocus_jax.rl.actfocus import ENERGY_KINDS, token_energies
from actfocus_jax.rollout.roles import Role

__all__ = [
    "ANALYSIS_ROLES",
    "CONSTANT_RTOL",
    "ROLE_NAMES",
    "VARIANTS",
    "BottleneckStats",
    "batch_bottleneck_metrics",
    "bootstrap_ci",
    "bottleneck_core",
    "bottleneck_metrics",
    "bottleneck_report",
    "bottleneck_stats",
    "buffer_field",
    "group_pearson",
    "rollout_scores",
]

#: Roles of the trailing role axis of every per-role array, in this order.
ANALYSIS_ROLES = (Role.REASONING, Role.ACTION)
ROLE_NAMES = ("reasoning", "action")
VARIANTS = ("sum", "mean")

_FMAX = float(np.finfo(np.float32).max)
#: Relative spread below which scores / rewards count as constant (see :func:`group_pearson`).
CONSTANT_RTOL = 1e-5


@chex.dataclass
class BottleneckStats:
    """Bottleneck statistic of one batch (``n`` = number of groups, ``G`` = group size).

    Every per-role array has a trailing axis of size 2 ordered as :data:`ANALYSIS_ROLES`
    (REASONING, ACTION). With ``per_turn``, ``per_turn`` holds the same fields with a leading turn
    axis ``[T, ...]`` (turn ``t`` restricts tokens to ``turn_ids == t``), else ``None``.

    Attributes:
      rho: float32 ``[n, 2]`` Pearson correlation per group (0 for ineligible / degenerate groups).
      eligible: bool ``[n]`` the group's rewards (over in-scope rows) are not all equal.
      degenerate: bool ``[n, 2]`` eligible, but ``rho`` was set to 0 (constant ``S`` or rewards
        among the participants, or fewer than 2 participants).
      scores: float32 ``[n, G, 2]`` ``S_i^k`` (0 where the row does not participate).
      participates: bool ``[n, G, 2]`` row ``i`` enters role ``k``'s correlation.
      rewards: float32 ``[n, G]`` episode rewards.
      role_tokens: float32 ``[n, 2]`` role-k tokens of the group (in scope).
      gen_tokens: float32 ``[n]`` generated tokens of the group (in scope).
      mean_abs_rho: float32 ``[2]`` mean of ``|rho|`` over eligible groups.
      share: float32 ``[2]`` role-k tokens / generated tokens, summed over eligible groups.
      density: float32 ``[2]`` ``mean_abs_rho / share`` (0 where share is 0).
      n_groups: int32 ``[]`` number of eligible groups.
      n_degenerate: int32 ``[2]`` eligible groups flagged degenerate.
      per_turn: the same statistics per turn, or ``None``.
    """

    rho: chex.Array
    eligible: chex.Array
    degenerate: chex.Array
    scores: chex.Array
    participates: chex.Array
    rewards: chex.Array
    role_tokens: chex.Array
    gen_tokens: chex.Array
    mean_abs_rho: chex.Array
    share: chex.Array
    density: chex.Array
    n_groups: chex.Array
    n_degenerate: chex.Array
    per_turn: Any = None


# ------------------------------------------------------------------------------ jit-able core
def _safe_div(a, b):
    return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)


def group_pearson(
    x: jax.Array, y: jax.Array, w: jax.Array, *, rtol: float = CONSTANT_RTOL
) -> tuple[jax.Array, jax.Array]:
    """Pearson correlation over the last axis, restricted to ``w`` (bool), NaN-free.

    Args:
      x, y: ``[..., G]`` values.
      w: bool ``[..., G]`` which entries take part.
      rtol: values whose spread ``max - min`` is at most ``rtol * max(|max|, |min|)`` count as
        constant (float32 rounding of mathematically equal sums must not produce a correlation).

    Returns:
      ``(rho, ok)``: ``rho [...]`` in ``[-1, 1]``, 0 where ``ok`` is False; ``ok`` is True where at
      least 2 entries take part and neither ``x`` nor ``y`` is constant over them.
    """
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    wf = w.astype(jnp.float32)
    n = jnp.sum(wf, axis=-1)

    def centred(v):  # centred and scaled to max |.| = 1 (Pearson is scale-free; no overflow)
        m = _safe_div(jnp.sum(wf * v, axis=-1), n)
        c = jnp.where(w, v - m[..., None], 0.0)
        scale = jnp.max(jnp.abs(c), axis=-1, keepdims=True)
        return _safe_div(c, scale)

    def varies(v):
        hi = jnp.max(jnp.where(w, v, -jnp.inf), axis=-1)
        lo = jnp.min(jnp.where(w, v, jnp.inf), axis=-1)
        return (hi - lo) > rtol * jnp.maximum(jnp.abs(hi), jnp.abs(lo))

    cx, cy = centred(x), centred(y)
    denom = jnp.sqrt(jnp.sum(cx * cx, axis=-1)) * jnp.sqrt(jnp.sum(cy * cy, axis=-1))
    ok = (n >= 2) & varies(x) & varies(y) & (denom > 0) & jnp.isfinite(denom)
    rho = jnp.clip(_safe_div(jnp.sum(cx * cy, axis=-1), jnp.where(ok, denom, 0.0)), -1.0, 1.0)
    return jnp.where(ok, rho, 0.0), ok


def rollout_scores(
    roles: jax.Array, energies: jax.Array, scope: jax.Array | None = None, *, variant: str = "sum"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-rollout role scores ``S_i^k``.

    Args:
      roles: int ``[B, L]`` role codes.
      energies: ``[B, L]`` token energies (only generated positions in scope are read; non-finite
        values are clamped to +-max float32, NaN to 0).
      scope: bool ``[B, L]`` tokens considered (e.g. one turn); ``None`` = all.
      variant: ``"sum"`` or ``"mean"``.

    Returns:
      ``(scores [B, 2], role_counts [B, 2], gen_counts [B])`` (float32): scores are 0 for a row
      without role-k tokens in scope (both variants).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    roles = roles.astype(jnp.int32)
    if scope is None:
        scope = jnp.ones(roles.shape, bool)
    e = jnp.nan_to_num(energies.astype(jnp.float32), nan=0.0, posinf=_FMAX, neginf=-_FMAX)
    masks = jnp.stack([(roles == k) & scope for k in ANALYSIS_ROLES], axis=-1)  # [B, L, 2]
    sums = jnp.sum(jnp.where(masks, e[..., None], 0.0), axis=1)
    counts = jnp.sum(masks, axis=1).astype(jnp.float32)
    gen = jnp.sum(counts, axis=-1)
    scores = sums if variant == "sum" else _safe_div(sums, counts)
    return scores, counts, gen


def _scope_stats(roles, energies, rewards, scope, row_in_scope, *, group_size, variant):
    """Statistics for one token scope; ``row_in_scope [B]`` marks the rows of the scope."""
    b = roles.shape[0]
    n = b // group_size
    scores, counts, gen = rollout_scores(roles, energies, scope, variant=variant)
    if variant == "sum":
        part = jnp.broadcast_to(row_in_scope[:, None], counts.shape)
    else:
        part = row_in_scope[:, None] & (counts > 0)
    scores = jnp.where(part, scores, 0.0)
    rg = rewards.astype(jnp.float32).reshape(n, group_size)
    sg = scores.reshape(n, group_size, 2)
    pg = part.reshape(n, group_size, 2)
    rows = row_in_scope.reshape(n, group_size)
    hi = jnp.max(jnp.where(rows, rg, -jnp.inf), axis=-1)
    lo = jnp.min(jnp.where(rows, rg, jnp.inf), axis=-1)
    eligible = (hi - lo) > CONSTANT_RTOL * jnp.maximum(jnp.abs(hi), jnp.abs(lo))
    # Pearson over the group axis, one correlation per (group, role).
    r_by_role = jnp.broadcast_to(rg[:, None, :], (n, 2, group_size))
    rho, ok = group_pearson(jnp.moveaxis(sg, -1, -2), r_by_role, jnp.moveaxis(pg, -1, -2))
    rho = jnp.where(eligible[:, None], rho, 0.0)
    degenerate = eligible[:, None] & ~ok
    role_tokens = jnp.where(rows[..., None], counts.reshape(n, group_size, 2), 0.0).sum(1)
    gen_tokens = jnp.where(rows, gen.reshape(n, group_size), 0.0).sum(1)
    el = eligible.astype(jnp.float32)
    n_groups = jnp.sum(eligible).astype(jnp.int32)
    mean_abs = _safe_div(jnp.sum(el[:, None] * jnp.abs(rho), axis=0), n_groups.astype(jnp.float32))
    share = _safe_div(jnp.sum(el[:, None] * role_tokens, axis=0), jnp.sum(el * gen_tokens))
    return BottleneckStats(
        rho=rho,
        eligible=eligible,
        degenerate=degenerate,
        scores=sg,
        participates=pg,
        rewards=rg,
        role_tokens=role_tokens,
        gen_tokens=gen_tokens,
        mean_abs_rho=mean_abs,
        share=share,
        density=_safe_div(mean_abs, share),
        n_groups=n_groups,
        n_degenerate=jnp.sum(degenerate, axis=0).astype(jnp.int32),
        per_turn=None,
    )


@functools.partial(jax.jit, static_argnames=("group_size", "variant", "num_turns"))
def bottleneck_core(
    roles: jax.Array,
    energies: jax.Array,
    rewards: jax.Array,
    turn_ids: jax.Array | None = None,
    *,
    group_size: int,
    variant: str = "sum",
    num_turns: int = 0,
) -> BottleneckStats:
    """Jitted core: :class:`BottleneckStats` from arrays (see the module docstring).

    Args:
      roles: int ``[B, L]`` role codes; ``B`` a multiple of ``group_size``.
      energies: ``[B, L]`` token energies.
      rewards: ``[B]`` episode rewards.
      turn_ids: int ``[B, L]`` turn of each token (needed when ``num_turns > 0``).
      group_size: ``G``.
      variant: ``"sum"`` or ``"mean"``.
      num_turns: number of turns ``T`` of the per-turn statistics (0 = none).
    """
    b = roles.shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(f"batch {b} is not a multiple of group_size {group_size}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    roles = roles.astype(jnp.int32)
    kw = dict(group_size=group_size, variant=variant)
    full = _scope_stats(roles, energies, rewards, None, jnp.ones((b,), bool), **kw)
    if num_turns > 0:
        if turn_ids is None:
            raise ValueError("per-turn statistics need turn_ids")
        gen = (roles == Role.REASONING) | (roles == Role.ACTION)

        def one_turn(t):
            scope = turn_ids == t
            return _scope_stats(roles, energies, rewards, scope, jnp.any(scope & gen, axis=1), **kw)

        full = full.replace(per_turn=jax.vmap(one_turn)(jnp.arange(num_turns, dtype=jnp.int32)))
    return full


# ------------------------------------------------------------------------------- host entry points
def buffer_field(data, *names):
    """The first of ``names`` that ``data`` (a rollout buffer or a mapping of its arrays) has and
    that is not None, else None."""
    for name in names:
        if isinstance(data, Mapping):
            if name in data and data[name] is not None:
                return data[name]
        elif getattr(data, name, None) is not None:
            return getattr(data, name)
    return None


def _inputs(data, energy: str):
    """``(roles, energies, rewards, turn_ids)`` from a buffer / train batch / mapping."""
    roles = buffer_field(data, "roles")
    rewards = buffer_field(data, "episode_return", "rewards")
    if roles is None or rewards is None:
        raise ValueError("need `roles` and `episode_return` (or `rewards`)")
    energies = buffer_field(data, "energies") if energy == "given" else None
    if energy != "given":
        energies = token_energies(
            energy,
            logp=buffer_field(data, "old_logp", "logp"),
            entropy=buffer_field(data, "entropy"),
            logit=buffer_field(data, "logit"),
        )
    if energies is None:
        raise ValueError('energy="given" needs an `energies` array')
    return (
        jnp.asarray(roles),
        jnp.asarray(energies),
        jnp.asarray(rewards),
        buffer_field(data, "turn_ids"),
    )


def _check_groups(data, group_size: int) -> None:
    """If ``group_id`` is present (and concrete), rows of a block of ``G`` must share it."""
    gid = buffer_field(data, "group_id")
    if gid is None or isinstance(gid, jax.core.Tracer):
        return
    gid = np.asarray(gid)
    if gid.size % group_size:
        raise ValueError(f"batch {gid.size} is not a multiple of group_size {group_size}")
    blocks = gid.reshape(-1, group_size)
    if np.any(blocks != blocks[:, :1]):
        raise ValueError("rows are not laid out group after group (group_id varies inside a block)")


def bottleneck_stats(
    buffer_or_arrays: Any,
    group_size: int,
    *,
    energy: str = "neg_logprob",
    variant: str = "sum",
    per_turn: bool = False,
    num_turns: int | None = None,
) -> BottleneckStats:
    """The bottleneck statistic of a batch (host entry point of :func:`bottleneck_core`).

    Args:
      buffer_or_arrays: a :class:`~actfocus_jax.rollout.buffer.RolloutBuffer`, a train batch, or a
        mapping with ``roles [B, L]``, ``episode_return`` (or ``rewards``) ``[B]``, the array the
        energy needs (``old_logp`` / ``entropy`` / ``logit``, or ``energies`` with
        ``energy="given"``), and ``turn_ids [B, L]`` for ``per_turn``. A ``group_id`` field, when
        present, is checked against the group-after-group layout.
      group_size: rollouts per group ``G``.
      energy: one of :data:`~actfocus_jax.rl.actfocus.ENERGY_KINDS`, or ``"given"``.
      variant: ``"sum"`` or ``"mean"``.
      per_turn: also compute the statistics per turn (``stats.per_turn``, leading axis ``T``).
      num_turns: ``T``; default ``max(turn_ids) + 1`` (needs concrete ``turn_ids``).
    """
    if energy != "given" and energy not in ENERGY_KINDS:
        raise ValueError(f"energy must be one of {ENERGY_KINDS} or 'given', got {energy!r}")
    _check_groups(buffer_or_arrays, group_size)
    roles, energies, rewards, turn_ids = _inputs(buffer_or_arrays, energy)
    t = 0
    if per_turn:
        if turn_ids is None:
            raise ValueError("per_turn=True needs turn_ids")
        turn_ids = jnp.asarray(turn_ids, jnp.int32)
        t = int(num_turns) if num_turns is not None else int(jnp.max(turn_ids)) + 1
        t = max(t, 1)
    return bottleneck_core(
        roles,
        energies,
        rewards,
        turn_ids if per_turn else None,
        group_size=group_size,
        variant=variant,
        num_turns=t,
    )


def bootstrap_ci(
    values: Any,
    *,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    num_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Percentile-bootstrap ``1 - alpha`` confidence interval, resampling along axis 0.

    Draws ``num_resamples`` samples of ``n`` units with replacement (``n = len(values)``), evaluates
    the statistic on each, and returns the ``alpha / 2`` and ``1 - alpha / 2`` quantiles of those
    values (NumPy's linear interpolation). The percentile method is simple and transformation-
    invariant; it slightly under-covers for small ``n`` and skewed statistics.

    Args:
      values: array ``[n, ...]`` (e.g. ``|rho|`` per group, or several per-group columns).
      statistic: vectorised statistic mapping a resampled stack ``[R, n, ...]`` to ``[R]`` or
        ``[R, m]``; default the mean over axis 1.
      num_resamples: ``R``.
      alpha: ``0.05`` gives a 95% interval.
      seed: NumPy ``default_rng`` seed.

    Returns:
      ``(lo, hi)`` floats (or arrays ``[m]``); NaN when ``n == 0``.
    """
    x = np.asarray(values, dtype=np.float64)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if statistic is None:
        statistic = lambda s: s.mean(axis=1)
    n = x.shape[0]
    if n == 0:
        probe = np.asarray(statistic(np.zeros((1, 1, *x.shape[1:]))))
        nan = np.full(probe.shape[1:], np.nan)
        return (float("nan"), float("nan")) if nan.ndim == 0 else (nan, nan.copy())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(num_resamples, n))
    stats = np.asarray(statistic(x[idx]), dtype=np.float64)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2], axis=0)
    if np.ndim(lo) == 0:
        return float(lo), float(hi)
    return lo, hi


def _pearson_np(x: np.ndarray, y: np.ndarray, w: np.ndarray, rtol: float = CONSTANT_RTOL):
    """NumPy float64 twin of :func:`group_pearson` (last axis), used for permutation nulls."""
    wf = w.astype(np.float64)
    n = wf.sum(-1)
    ns = np.maximum(n, 1)
    cx = np.where(w, x - (wf * x).sum(-1, keepdims=True) / ns[..., None], 0.0)
    cy = np.where(w, y - (wf * y).sum(-1, keepdims=True) / ns[..., None], 0.0)
    den = np.sqrt((cx * cx).sum(-1) * (cy * cy).sum(-1))

    def varies(v):
        hi, lo = np.where(w, v, -np.inf).max(-1), np.where(w, v, np.inf).min(-1)
        return (hi - lo) > rtol * np.maximum(np.abs(hi), np.abs(lo))

    ok = (n >= 2) & varies(x) & varies(y) & (den > 0)
    return np.where(ok, np.clip((cx * cy).sum(-1) / np.where(ok, den, 1.0), -1, 1), 0.0)


def _null_abs_rho(scores, part, rewards, num_permutations: int, rng) -> np.ndarray:
    """Mean ``|rho|`` per role with rewards permuted within each group (``[2]``)."""
    n, g, _ = scores.shape
    if n == 0 or num_permutations <= 0:
        return np.zeros(2)
    perm = np.argsort(rng.random((num_permutations, n, g)), axis=-1)
    r = np.take_along_axis(np.broadcast_to(rewards, (num_permutations, n, g)), perm, axis=-1)
    x = np.moveaxis(scores, -1, -2)[None]  # [1, n, 2, g]
    w = np.moveaxis(part, -1, -2)[None]
    rho = _pearson_np(x, r[:, :, None, :], w)  # [P, n, 2]
    return np.abs(rho).mean(axis=(0, 1))


def _scope_report(st, *, num_resamples, alpha, seed, num_permutations) -> dict:
    """Host summary (with CIs) of one scope of a :class:`BottleneckStats` (NumPy fields)."""
    el = np.asarray(st.eligible, bool)
    abs_rho = np.abs(np.asarray(st.rho, np.float64))[el]  # [n, 2]
    tok = np.asarray(st.role_tokens, np.float64)[el]
    gen = np.asarray(st.gen_tokens, np.float64)[el]
    cols = np.concatenate([abs_rho, tok, gen[:, None]], axis=1)  # [n, 5]

    def stat(s):  # [R, n, 5] -> [R, 5]: mean|rho| (2), density (2), action - reasoning |rho|
        m = s[..., :2].mean(axis=1)
        g = s[..., 4].sum(axis=1)
        share = np.where(g[:, None] > 0, s[..., 2:4].sum(axis=1) / np.maximum(g, 1)[:, None], 0)
        dens = np.where(share > 0, m / np.where(share > 0, share, 1), 0.0)
        return np.concatenate([m, dens, m[:, 1:] - m[:, :1]], axis=1)

    lo, hi = bootstrap_ci(cols, statistic=stat, num_resamples=num_resamples, alpha=alpha, seed=seed)
    rng = np.random.default_rng(seed + 1)
    null = _null_abs_rho(
        np.asarray(st.scores, np.float64)[el],
        np.asarray(st.participates, bool)[el],
        np.asarray(st.rewards, np.float64)[el],
        num_permutations,
        rng,
    )
    mean_abs = np.asarray(st.mean_abs_rho, np.float64)
    share = np.asarray(st.share, np.float64)
    density = np.asarray(st.density, np.float64)
    out: dict[str, Any] = {
        "n_groups": int(st.n_groups),
        "n_groups_total": int(el.size),
    }
    for k, name in enumerate(ROLE_NAMES):
        excess = (mean_abs[k] - null[k]) / share[k] if share[k] > 0 else 0.0
        out[name] = {
            "mean_abs_rho": float(mean_abs[k]),
            "mean_abs_rho_ci": (float(lo[k]), float(hi[k])),
            "share": float(share[k]),
            "density": float(density[k]),
            "density_ci": (float(lo[2 + k]), float(hi[2 + k])),
            "null_mean_abs_rho": float(null[k]),
            "excess_density": float(excess),
            "n_degenerate": int(np.asarray(st.n_degenerate)[k]),
        }
    out["action_minus_reasoning_mean_abs_rho"] = float(mean_abs[1] - mean_abs[0])
    out["action_minus_reasoning_mean_abs_rho_ci"] = (float(lo[4]), float(hi[4]))
    out["density_ratio"] = float(density[1] / density[0]) if density[0] > 0 else 0.0
    return out


def _index(st: BottleneckStats, t: int) -> BottleneckStats:
    return jax.tree.map(lambda a: a[t], st.replace(per_turn=None))


def bottleneck_report(
    buffer_or_arrays: Any,
    group_size: int,
    *,
    energies: Sequence[str] = ENERGY_KINDS,
    variants: Sequence[str] = ("sum", "mean"),
    per_turn: bool = True,
    num_turns: int | None = None,
    num_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    num_permutations: int = 100,
) -> dict:
    """Full host report: every energy x variant, per role, with bootstrap CIs over groups.

    Returns ``report[energy][variant]`` = ``{"n_groups", "n_groups_total", "reasoning": {...},
    "action": {...}, "action_minus_reasoning_mean_abs_rho"(+"_ci"), "density_ratio" (action /
    reasoning density; 0 if the latter is 0),
    "per_turn": [per-turn dicts with a "turn" key]}`` where each role dict holds ``mean_abs_rho``,
    ``mean_abs_rho_ci``, ``share``, ``density``, ``density_ci`` (percentile bootstrap over eligible
    groups, :func:`bootstrap_ci`; the density resamples groups and recomputes both mean |rho| and
    the token share), ``null_mean_abs_rho`` (rewards permuted within groups, ``num_permutations``
    times), ``excess_density = (mean_abs_rho - null) / share`` and ``n_degenerate``. Energies whose
    input array is missing are listed under ``report["skipped"]``. ``per_turn`` is dropped (empty)
    without ``turn_ids``.
    """
    report: dict[str, Any] = {"group_size": group_size, "alpha": alpha, "skipped": []}
    has_turns = buffer_field(buffer_or_arrays, "turn_ids") is not None
    kw = dict(
        num_resamples=num_resamples, alpha=alpha, seed=seed, num_permutations=num_permutations
    )
    for energy in energies:
        try:
            _inputs(buffer_or_arrays, energy)
        except ValueError:
            report["skipped"].append(energy)
            continue
        report[energy] = {}
        for variant in variants:
            st = bottleneck_stats(
                buffer_or_arrays,
                group_size,
                energy=energy,
                variant=variant,
                per_turn=per_turn and has_turns,
                num_turns=num_turns,
            )
            st = jax.device_get(st)
            entry = _scope_report(st, **kw)
            entry["per_turn"] = []
            if st.per_turn is not None:
                for t in range(np.shape(st.per_turn.n_groups)[0]):
                    turn = _scope_report(_index(st.per_turn, t), **kw)
                    entry["per_turn"].append({"turn": t, **turn})
            report[energy][variant] = entry
    return report


def bottleneck_metrics(
    roles: jax.Array,
    energies: jax.Array,
    rewards: jax.Array,
    *,
    group_size: int,
    variant: str = "sum",
) -> dict[str, jax.Array]:
    """Cheap jit-able per-batch summary (float32 scalars; see :func:`batch_bottleneck_metrics`)."""
    st = bottleneck_core(roles, energies, rewards, group_size=group_size, variant=variant)
    n_total = roles.shape[0] // group_size
    out = {}
    for k, name in enumerate(ROLE_NAMES):
        out[f"{name}_mean_abs_rho"] = st.mean_abs_rho[k]
        out[f"{name}_share"] = st.share[k]
        out[f"{name}_density"] = st.density[k]
    out["density_ratio"] = _safe_div(st.density[1], st.density[0])
    out["n_groups"] = st.n_groups.astype(jnp.float32)
    out["eligible_frac"] = st.n_groups.astype(jnp.float32) / n_total
    return out


def batch_bottleneck_metrics(
    buffer_or_arrays: Any,
    group_size: int,
    *,
    energy: str = "neg_logprob",
    variant: str = "sum",
    prefix: str = "bottleneck/",
) -> dict[str, float]:
    """Per-step bottleneck summary for the trainer's log: ``{prefix + name: float}``.

    Names: ``{reasoning,action}_{mean_abs_rho,share,density}``, ``density_ratio`` (action density
    / reasoning density, 0 if the latter is 0), ``n_groups`` (eligible groups) and
    ``eligible_frac``. One small jitted reduction over the batch; no bootstrap (see
    :func:`bottleneck_report` for CIs). Inside a jitted step use :func:`bottleneck_metrics`.
    """
    roles, energies, rewards, _ = _inputs(buffer_or_arrays, energy)
    m = bottleneck_metrics(roles, energies, rewards, group_size=group_size, variant=variant)
    return {prefix + k: float(v) for k, v in jax.device_get(m).items()}
