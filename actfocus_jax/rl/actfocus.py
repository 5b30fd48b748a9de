"""ActFocus token weights (DESIGN.md sections 3 and 4).

ActFocus down-weights the policy-gradient loss on REASONING tokens and redistributes weight among
ACTION tokens toward the more uncertain (higher-energy) ones. For each trajectory, with ``n_A``
the number of action tokens in the softmax's scope (the whole trajectory, or one turn)::

    w_t = alpha                                                         REASONING
    w_t = clip((1 - beta) + beta * n_A * softmax_{s in scope}(e_s / tau)_t, 0, w_max)   ACTION
    w_t = 0                                                             PROMPT, PAD

Before clipping the action weights of a scope average exactly 1. ``normalize="preserve_sum"``
then rescales each trajectory so that the weights of its generated tokens sum to their count.
``alpha = 1, beta = 0`` gives weight exactly 1.0 on every generated token (plain PPO / GRPO).

The weights are computed inside the jitted train step from quantities recorded at rollout time
(no extra forward pass) and are wrapped in ``jax.lax.stop_gradient``.

The energy term assumes advantages centred per task, as GRPO's group baseline makes them. On
PPO's raw GAE advantages from a critic that has not learned the return (all of one sign), up to
``w_max`` times the push goes to the sampled high-energy action tokens, the action distribution
flattens and the sampled policy gets worse (README, "Why ActFocus hurts PPO" and the sections after
it); ``AlgoConfig.group_center_advantages`` centres PPO's advantages per task.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import chex
import jax
import jax.numpy as jnp

from actfocus_jax.rollout.roles import Role

__all__ = [
    "ENERGY_KINDS",
    "NORMALIZE_MODES",
    "SCOPES",
    "ActFocusConfig",
    "ActFocusStats",
    "actfocus_weights",
    "token_energies",
    "token_weights",
    "token_weights_and_stats",
]

ENERGY_KINDS = ("neg_logprob", "entropy", "neg_logit")
SCOPES = ("trajectory", "turn")
NORMALIZE_MODES = ("none", "preserve_sum")


def _concrete_float(value) -> float | None:
    """``float(value)`` for Python numbers / concrete arrays; ``None`` for traced values."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _validate(*, alpha, beta, tau, w_max, scope, normalize) -> None:
    """Raise ``ValueError`` for an invalid configuration (traced scalars are not checked)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    checks = (
        ("alpha", alpha, lambda v: v >= 0, ">= 0"),
        ("beta", beta, lambda v: v >= 0, ">= 0"),
        ("tau", tau, lambda v: v > 0, "> 0"),
        ("w_max", w_max, lambda v: v > 0, "> 0"),
    )
    for name, value, ok, rule in checks:
        v = _concrete_float(value)
        if v is not None and not ok(v):  # NaN fails every rule.
            raise ValueError(f"ActFocus {name} must be {rule}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ActFocusConfig:
    """ActFocus hyper-parameters (DESIGN.md section 4).

    Attributes:
      alpha: weight of REASONING tokens (``>= 0``).
      beta: mix between uniform (0) and energy-softmax (1) action weights (``>= 0``).
      tau: softmax temperature over action energies (``> 0``).
      w_max: upper clip of action weights (``> 0``).
      scope: ``"trajectory"`` or ``"turn"``: the set of action tokens a softmax runs over.
      normalize: ``"none"`` or ``"preserve_sum"``.
      energy: token energy, one of :data:`ENERGY_KINDS` (see :func:`token_energies`).
      weight_kl: also multiply the KL-to-reference term by the weights.
      weight_entropy: also multiply the entropy term by the weights.
      enabled: ``False`` gives weight 1 on all generated tokens (plain PPO / GRPO).
    """

    alpha: float = 0.1
    beta: float = 1.0
    tau: float = 1.0
    w_max: float = 5.0
    scope: str = "trajectory"
    normalize: str = "none"
    energy: str = "neg_logprob"
    weight_kl: bool = False
    weight_entropy: bool = False
    enabled: bool = True

    def __post_init__(self):
        _validate(
            alpha=self.alpha,
            beta=self.beta,
            tau=self.tau,
            w_max=self.w_max,
            scope=self.scope,
            normalize=self.normalize,
        )
        if self.energy not in ENERGY_KINDS:
            raise ValueError(f"energy must be one of {ENERGY_KINDS}, got {self.energy!r}")

    def weight_kwargs(self) -> dict:
        """Keyword arguments of :func:`token_weights` taken from this config."""
        return dict(
            alpha=self.alpha,
            beta=self.beta,
            tau=self.tau,
            w_max=self.w_max,
            scope=self.scope,
            normalize=self.normalize,
        )


@chex.dataclass
class ActFocusStats:
    """Batch statistics of ActFocus weights (all scalars, float32).

    Attributes:
      reasoning_mass_frac / action_mass_frac: sum of weights on REASONING / ACTION tokens divided by
        the sum over all generated tokens of the batch (0 if that sum is 0).
      reasoning_token_frac / action_token_frac: share of the generated tokens with that role.
      reasoning_weight_mean / action_weight_mean: mean weight over the tokens of that role.
      reasoning_energy_mean / action_energy_mean: mean energy over the tokens of that role.
      action_clip_frac: fraction of action tokens whose pre-clip weight lies outside
        ``[0, w_max]``.
      action_weight_max: largest action weight of the batch (0 without action tokens).
    """

    reasoning_mass_frac: jax.Array
    action_mass_frac: jax.Array
    reasoning_token_frac: jax.Array
    action_token_frac: jax.Array
    reasoning_weight_mean: jax.Array
    action_weight_mean: jax.Array
    reasoning_energy_mean: jax.Array
    action_energy_mean: jax.Array
    action_clip_frac: jax.Array
    action_weight_max: jax.Array


def token_energies(
    kind: str,
    *,
    logp: jax.Array | None = None,
    entropy: jax.Array | None = None,
    logit: jax.Array | None = None,
) -> jax.Array:
    """Per-token energy ``e_t`` (DESIGN.md section 3), float32 of the input's shape.

    * ``"neg_logprob"``: ``-logp`` where ``logp = log pi_old(y_t | y_<t)`` was recorded at rollout.
    * ``"entropy"``: ``entropy`` of ``pi_old(. | y_<t)`` recorded at rollout.
    * ``"neg_logit"``: ``-logit``, the raw logit of the sampled token ``y_t``.

    Raises:
      ValueError: unknown ``kind`` or the array it needs is missing.
    """
    needed = {
        "neg_logprob": ("logp", logp),
        "entropy": ("entropy", entropy),
        "neg_logit": ("logit", logit),
    }
    if kind not in needed:
        raise ValueError(f"unknown energy kind {kind!r}; valid: {', '.join(ENERGY_KINDS)}")
    name, arr = needed[kind]
    if arr is None:
        raise ValueError(f"energy kind {kind!r} needs the {name!r} array, which was not given")
    arr = jnp.asarray(arr).astype(jnp.float32)
    return arr if kind == "entropy" else -arr


def _action_weights_raw(roles, energies, turn_ids, *, beta, tau, scope):
    """Pre-clip action weights ``(1 - beta) + beta * n_A * softmax(e / tau)`` (0 off ACTION)."""
    is_act = roles == Role.ACTION
    fmax = jnp.finfo(jnp.float32).max
    x = jnp.where(is_act, energies.astype(jnp.float32), 0.0) / jnp.asarray(tau, jnp.float32)
    # Non-finite action energies become +-max float (NaN -> 0); non-action values never matter.
    x = jnp.nan_to_num(x, nan=0.0, posinf=fmax, neginf=-fmax)
    x = jnp.where(is_act, x, -jnp.inf)
    batch, length = roles.shape
    if scope == "trajectory":
        m = jnp.max(x, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows without action tokens
        z = jnp.where(is_act, jnp.exp(x - m), 0.0)
        total = jnp.sum(z, axis=-1, keepdims=True)
        n_a = jnp.sum(is_act, axis=-1, keepdims=True).astype(jnp.float32)
    else:
        # One segment per (row, turn id); turn ids are clipped into [0, L) (a trajectory has at
        # most L turns), non-action tokens go to an extra dummy segment.
        local = jnp.clip(jnp.asarray(turn_ids).astype(jnp.int32), 0, length - 1)
        seg = jnp.arange(batch, dtype=jnp.int32)[:, None] * length + local
        dummy = batch * length
        seg = jnp.where(is_act, seg, dummy).reshape(-1)
        nseg = dummy + 1
        seg_max = jax.ops.segment_max(x.reshape(-1), seg, num_segments=nseg)
        m = seg_max[seg].reshape(batch, length)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        z = jnp.where(is_act, jnp.exp(x - m), 0.0)
        total = jax.ops.segment_sum(z.reshape(-1), seg, num_segments=nseg)[seg].reshape(
            batch, length
        )
        n_a = jax.ops.segment_sum(is_act.reshape(-1).astype(jnp.float32), seg, num_segments=nseg)[
            seg
        ].reshape(batch, length)
    # (n_A * z) / Z rather than n_A * (z / Z): all-equal energies give exactly 1.
    scaled = jnp.where(is_act, (n_a * z) / jnp.where(total > 0, total, 1.0), 0.0)
    beta = jnp.asarray(beta, jnp.float32)
    raw = (1.0 - beta) + beta * scaled
    return jnp.where(is_act, raw, 0.0)


def _stats(roles, energies, weights, raw_action, w_max) -> ActFocusStats:
    is_r = roles == Role.REASONING
    is_a = roles == Role.ACTION
    f32 = jnp.float32
    n_r = jnp.sum(is_r).astype(f32)
    n_a = jnp.sum(is_a).astype(f32)
    n_gen = n_r + n_a
    mass_r = jnp.sum(jnp.where(is_r, weights, 0.0))
    mass_a = jnp.sum(jnp.where(is_a, weights, 0.0))
    mass = mass_r + mass_a

    def div(a, b):
        return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)

    e = energies.astype(f32)
    clipped = is_a & ((raw_action > w_max) | (raw_action < 0))
    return ActFocusStats(
        reasoning_mass_frac=div(mass_r, mass),
        action_mass_frac=div(mass_a, mass),
        reasoning_token_frac=div(n_r, n_gen),
        action_token_frac=div(n_a, n_gen),
        reasoning_weight_mean=div(mass_r, n_r),
        action_weight_mean=div(mass_a, n_a),
        reasoning_energy_mean=div(jnp.sum(jnp.where(is_r, e, 0.0)), n_r),
        action_energy_mean=div(jnp.sum(jnp.where(is_a, e, 0.0)), n_a),
        action_clip_frac=div(jnp.sum(clipped).astype(f32), n_a),
        action_weight_max=jnp.max(jnp.where(is_a, weights, 0.0), initial=0.0),
    )


@functools.partial(jax.jit, static_argnames=("scope", "normalize"))
def _weights_core(roles, energies, turn_ids, alpha, beta, tau, w_max, *, scope, normalize):
    """Jitted core of :func:`token_weights`: ``(weights, raw pre-clip action weights)``."""
    roles = roles.astype(jnp.int32)
    energies = jax.lax.stop_gradient(energies)
    raw = _action_weights_raw(roles, energies, turn_ids, beta=beta, tau=tau, scope=scope)
    is_act = roles == Role.ACTION
    is_reason = roles == Role.REASONING
    w = jnp.where(
        is_act,
        jnp.clip(raw, 0.0, jnp.asarray(w_max, jnp.float32)),
        jnp.where(is_reason, jnp.asarray(alpha, jnp.float32), 0.0),
    )
    if normalize == "preserve_sum":
        gen = is_act | is_reason
        mass = jnp.sum(jnp.where(gen, w, 0.0), axis=-1, keepdims=True)
        count = jnp.sum(gen, axis=-1, keepdims=True).astype(jnp.float32)
        scale = jnp.where(mass > 0, count / jnp.where(mass > 0, mass, 1.0), 1.0)
        w = w * scale
    return jax.lax.stop_gradient(w.astype(jnp.float32)), jax.lax.stop_gradient(raw)


def _checked_inputs(roles, energies, turn_ids, *, alpha, beta, tau, w_max, scope, normalize):
    _validate(alpha=alpha, beta=beta, tau=tau, w_max=w_max, scope=scope, normalize=normalize)
    roles = jnp.asarray(roles)
    energies = jnp.asarray(energies)
    if roles.ndim != 2:
        raise ValueError(f"roles must be [B, L], got shape {roles.shape}")
    if energies.shape != roles.shape:
        raise ValueError(f"energies shape {energies.shape} != roles shape {roles.shape}")
    if scope == "turn":
        if turn_ids is None:
            raise ValueError('scope="turn" needs turn_ids [B, L]')
        if jnp.shape(turn_ids) != roles.shape:
            raise ValueError(f"turn_ids shape {jnp.shape(turn_ids)} != roles shape {roles.shape}")
        turn_ids = jnp.asarray(turn_ids)
    else:
        turn_ids = None  # unused by the trajectory scope
    return roles, energies, turn_ids


@jax.jit
def _stats_jit(roles, energies, weights, raw, w_max):
    return jax.lax.stop_gradient(
        _stats(roles.astype(jnp.int32), energies, weights, raw, jnp.asarray(w_max, jnp.float32))
    )


def token_weights_and_stats(
    roles: jax.Array,
    energies: jax.Array,
    turn_ids: jax.Array | None = None,
    *,
    alpha: float,
    beta: float,
    tau: float,
    w_max: float,
    scope: str,
    normalize: str,
) -> tuple[jax.Array, ActFocusStats]:
    """:func:`token_weights` plus :class:`ActFocusStats` of the result (same arguments)."""
    roles, energies, turn_ids = _checked_inputs(
        roles,
        energies,
        turn_ids,
        alpha=alpha,
        beta=beta,
        tau=tau,
        w_max=w_max,
        scope=scope,
        normalize=normalize,
    )
    w, raw = _weights_core(
        roles, energies, turn_ids, alpha, beta, tau, w_max, scope=scope, normalize=normalize
    )
    return w, _stats_jit(roles, energies, w, raw, w_max)


def token_weights(
    roles: jax.Array,
    energies: jax.Array,
    turn_ids: jax.Array | None,
    *,
    alpha: float,
    beta: float,
    tau: float,
    w_max: float,
    scope: str,
    normalize: str,
) -> jax.Array:
    """ActFocus per-token loss weights (DESIGN.md section 4), ``jax.lax.stop_gradient``-ed.

    Args:
      roles: ``[B, L]`` int role codes (:class:`actfocus_jax.rollout.Role`).
      energies: ``[B, L]`` token energies (:func:`token_energies`); only ACTION positions are read,
        other positions may hold anything (including +-inf / NaN). Non-finite action energies
        are treated as +-max float32 (NaN as 0).
      turn_ids: ``[B, L]`` int turn index per token; needed for ``scope="turn"`` (may be ``None``
        for ``"trajectory"``). Action tokens with the same (row, turn id) share one softmax; ids
        are clipped into ``[0, L)``.
      alpha: REASONING weight (``>= 0``).
      beta: action mixing coefficient (``>= 0``; ``beta > 1`` can push weights below 0, which the
        clip then sets to 0).
      tau: softmax temperature (``> 0``).
      w_max: upper clip of action weights (``> 0``).
      scope: ``"trajectory"`` or ``"turn"``.
      normalize: ``"none"`` or ``"preserve_sum"``: after clipping, each row is rescaled so that its
        generated tokens' weights sum to their count (rows with zero weight mass are left as they
        are; the rescaled weights may exceed ``w_max``).

    Returns:
      float32 ``[B, L]`` weights: ``alpha`` on REASONING, the clipped energy-softmax weights on
      ACTION, 0 on PROMPT / PAD. Numerically safe: max-subtracted masked softmax; rows / turns
      without action tokens give no NaN.

    Raises:
      ValueError: invalid ``scope`` / ``normalize`` / hyper-parameters (concrete values only) or
        shapes.
    """
    roles, energies, turn_ids = _checked_inputs(
        roles,
        energies,
        turn_ids,
        alpha=alpha,
        beta=beta,
        tau=tau,
        w_max=w_max,
        scope=scope,
        normalize=normalize,
    )
    w, _ = _weights_core(
        roles, energies, turn_ids, alpha, beta, tau, w_max, scope=scope, normalize=normalize
    )
    return w


def actfocus_weights(
    config: ActFocusConfig,
    roles: jax.Array,
    turn_ids: jax.Array | None = None,
    *,
    logp: jax.Array | None = None,
    entropy: jax.Array | None = None,
    logit: jax.Array | None = None,
) -> tuple[jax.Array, ActFocusStats]:
    """Weights and stats from an :class:`ActFocusConfig` and the rollout-time quantities.

    ``logp`` / ``entropy`` / ``logit`` are the behaviour policy's values recorded at rollout (the
    one ``config.energy`` needs must be given). With ``config.enabled = False`` the weights are
    exactly 1.0 on generated tokens and 0 elsewhere (stats are still reported).
    """
    energies = token_energies(config.energy, logp=logp, entropy=entropy, logit=logit)
    if config.enabled:
        kwargs = config.weight_kwargs()
    else:
        # w_max >= 1 so that the uniform weight 1.0 is never clipped.
        kwargs = dict(
            config.weight_kwargs(),
            alpha=1.0,
            beta=0.0,
            w_max=max(float(config.w_max), 1.0),
            normalize="none",
        )
    return token_weights_and_stats(roles, energies, turn_ids, **kwargs)
