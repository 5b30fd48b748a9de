"""Gradient-based Action Bottleneck analysis (offline; not used by the training path).

For a policy ``(graphdef, params)`` and a batch, the unclipped policy-gradient surrogate at ratio 1
(the on-policy policy gradient) is, with ``N`` the number of generated tokens of the batch,

    L(theta) = -(1 / N) * sum_t mask_t * A_t * exp(logp_t(theta) - sg(logp_t(theta)))

whose gradient is ``-(1/N) sum_t mask_t A_t grad logp_t``. Restricting the loss to the tokens of role
``k`` (``mask = roles == k``; the denominator stays ``N``) gives the role gradient ``g_k``; since
the loss is linear in the mask, ``g_REASONING + g_ACTION = g_full`` exactly (up to float rounding).
With ``ratio="importance"`` the ratio is ``exp(logp - old_logp)`` instead (unclipped), which equals
the above when ``params`` is the behaviour policy.

We report per role: ``||g_k||``, the cosine ``cos(g_k, g_full)``, the contribution
``<g_k, g_full> / ||g_full||^2`` (the roles' contributions sum to 1), the number of role tokens and
``||g_k|| / n_k`` (gradient norm per token; 0 for a role without tokens, whose gradient is exactly 0).
With ``group_size`` the same statistics are computed for each group of ``G`` rows separately (each
group's loss normalised by its own generated-token count): the design's "norm of the group's policy
gradient restricted to role k".

Role gradients come from one forward pass: ``jax.vjp`` of the per-token log-probs
(:func:`actfocus_jax.models.apply` + :func:`actfocus_jax.models.token_logprobs`), pulled back once
per mask (not ``vmap``-ed: see :func:`_role_grads`); :func:`surrogate_loss` is the same loss for
``jax.grad``.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp

from actfocus_jax.models.sampling import token_logprobs
from actfocus_jax.models.transformer import apply
from actfocus_jax.rollout.roles import Role

__all__ = [
    "GRADIENT_SCOPES",
    "RATIO_MODES",
    "RoleGradientStats",
    "grouped_role_gradient_stats",
    "role_gradient_stats",
    "role_gradients",
    "surrogate_loss",
]

#: Order of the leading axis of :func:`role_gradients` and of the per-role stats arrays' last axis.
GRADIENT_SCOPES = ("full", "reasoning", "action")
RATIO_MODES = ("at_one", "importance")


@chex.dataclass
class RoleGradientStats:
    """Gradient statistics; per-role arrays have a trailing axis (REASONING, ACTION).

    With ``group_size`` every field has a leading group axis ``[n_groups]``.

    Attributes:
      full_norm: ``||g_full||``.
      norm: ``[2]`` ``||g_k||``.
      cosine: ``[2]`` ``cos(g_k, g_full)`` (0 where either norm is 0).
      contribution: ``[2]`` ``<g_k, g_full> / ||g_full||^2`` (sums to 1; 0 if ``g_full = 0``).
      num_tokens: ``[2]`` role-k tokens (float32).
      norm_per_token: ``[2]`` ``||g_k|| / n_k`` (0 without tokens).
      linearity_error: ``||g_R + g_A - g_full|| / max(||g_full||, tiny)`` (a self-check).
    """

    full_norm: chex.Array
    norm: chex.Array
    cosine: chex.Array
    contribution: chex.Array
    num_tokens: chex.Array
    norm_per_token: chex.Array
    linearity_error: chex.Array


def _masks(roles, valid):
    roles = roles.astype(jnp.int32)
    r = (roles == Role.REASONING) & valid
    a = (roles == Role.ACTION) & valid
    return r | a, r, a


def _logp_fn(graphdef, tokens, valid, temperature):
    def fn(params):
        logits = apply(graphdef, params, tokens, attention_mask=valid)
        return token_logprobs(logits, tokens, valid, temperature)[0]

    return fn


def _coef(logp, old_logp, advantages, gen, importance):
    """``d L / d logp_t`` of the full surrogate (before role masking), stop-gradient."""
    n = jnp.maximum(jnp.sum(gen), 1).astype(jnp.float32)
    ratio = jnp.exp(jnp.where(gen, logp - old_logp.astype(jnp.float32), 0.0))
    ratio = jnp.where(importance, ratio, 1.0)
    c = -advantages.astype(jnp.float32) * ratio / n
    return jax.lax.stop_gradient(jnp.where(gen, c, 0.0))


def _check_ratio(ratio, old_logp):
    if ratio not in RATIO_MODES:
        raise ValueError(f"ratio must be one of {RATIO_MODES}, got {ratio!r}")
    if ratio == "importance" and old_logp is None:
        raise ValueError('ratio="importance" needs old_logp')


def surrogate_loss(
    params: Any,
    graphdef: Any,
    tokens: jax.Array,
    valid: jax.Array,
    roles: jax.Array,
    advantages: jax.Array,
    old_logp: jax.Array | None = None,
    *,
    role: Role | None = None,
    ratio: str = "at_one",
    temperature: float = 1.0,
) -> jax.Array:
    """The (unclipped) surrogate restricted to ``role`` (``None`` = all generated tokens).

    ``-(1/N) sum_t [roles_t == role] A_t ratio_t`` with ``N`` the number of generated tokens of the
    batch (independent of ``role``). Differentiate with ``jax.grad`` (argument 0).
    """
    _check_ratio(ratio, old_logp)
    valid = valid.astype(bool)
    gen, _, _ = _masks(roles, valid)
    mask = gen if role is None else gen & (roles.astype(jnp.int32) == int(role))
    logp = _logp_fn(graphdef, tokens, valid, temperature)(params)
    ref = jax.lax.stop_gradient(logp) if ratio == "at_one" else old_logp.astype(jnp.float32)
    r = jnp.exp(jnp.where(mask, logp - ref, 0.0))
    n = jnp.maximum(jnp.sum(gen), 1).astype(jnp.float32)
    return -jnp.sum(jnp.where(mask, advantages.astype(jnp.float32) * r, 0.0)) / n


@functools.partial(jax.jit, static_argnums=0)
def _role_grads(
    graphdef, params, tokens, valid, roles, advantages, old_logp, temperature, importance
):
    """Stacked gradients (leading axis :data:`GRADIENT_SCOPES`) and role token counts ``[2]``."""
    valid = valid.astype(bool)
    gen, r, a = _masks(roles, valid)
    logp, vjp = jax.vjp(_logp_fn(graphdef, tokens, valid, temperature), params)
    c = _coef(logp, old_logp, advantages, gen, importance)
    # Three pullbacks of the one forward pass, one after the other. Not ``jax.vmap(vjp)``: with
    # jaxlib 0.10.2 XLA:CPU's YNNPACK fusions miscompile the vmapped pullback (a broadcast of a
    # ``[B, L, D]`` residual along the new cotangent axis, multiplied, reduced over ``D`` and
    # broadcast back, e.g. RMSNorm's input gradient), giving role gradients off by 10-30% from
    # ``jax.grad`` at B x L = 8 x 264 (exact with ``--xla_cpu_experimental_ynn_fusion_type=``).
    cots = (c, jnp.where(r, c, 0.0), jnp.where(a, c, 0.0))
    grads = jax.tree.map(lambda *g: jnp.stack(g), *(vjp(x)[0] for x in cots))
    counts = jnp.stack([jnp.sum(r), jnp.sum(a)]).astype(jnp.float32)
    return grads, counts


def _prepared(tokens, valid, roles, advantages, old_logp, ratio):
    _check_ratio(ratio, old_logp)
    if old_logp is None:
        old_logp = jnp.zeros(jnp.shape(tokens), jnp.float32)
    return (
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(valid, bool),
        jnp.asarray(roles),
        jnp.asarray(advantages, jnp.float32),
        jnp.asarray(old_logp, jnp.float32),
    )


def role_gradients(
    graphdef: Any,
    params: Any,
    tokens: jax.Array,
    valid: jax.Array,
    roles: jax.Array,
    advantages: jax.Array,
    old_logp: jax.Array | None = None,
    *,
    ratio: str = "at_one",
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Gradients of the surrogate: ``{"full": g, "reasoning": g_R, "action": g_A}`` (params pytrees).

    Args:
      graphdef, params: ``nnx.split`` of a :class:`~actfocus_jax.models.CausalLM`.
      tokens: int32 ``[B, L]``; valid: bool ``[B, L]``; roles: int ``[B, L]``.
      advantages: float ``[B, L]`` per-token advantages (only generated tokens are read).
      old_logp: float ``[B, L]`` behaviour log-probs (needed for ``ratio="importance"``).
      ratio: ``"at_one"`` (policy gradient at the current params) or ``"importance"``.
      temperature: divides the logits, as at rollout.
    """
    arrays = _prepared(tokens, valid, roles, advantages, old_logp, ratio)
    grads, _ = _role_grads(
        graphdef, params, *arrays, jnp.float32(temperature), jnp.bool_(ratio == "importance")
    )
    return {
        name: jax.tree.map(lambda g, i=i: g[i], grads) for i, name in enumerate(GRADIENT_SCOPES)
    }


_BLOCK = 1024


@jax.jit
def _stats_from_grads(grads, counts) -> RoleGradientStats:
    """Stats from stacked gradients (leading axis = :data:`GRADIENT_SCOPES`)."""
    flat = jnp.concatenate(
        [g.reshape(3, -1).astype(jnp.float32) for g in jax.tree.leaves(grads)], 1
    )
    # Two-level float32 sums over the P parameters (blocks of _BLOCK, then the blocks): one dot
    # product over all of P accumulates sequentially on some backends (XLA:CPU without its YNNPACK
    # fusions: 1e-4 relative error at P = 50k, the squares all being positive).
    pad = -flat.shape[1] % _BLOCK
    blocks = jnp.pad(flat, ((0, 0), (0, pad))).reshape(3, -1, _BLOCK)
    gram = jnp.sum(jnp.einsum("ikm,jkm->kij", blocks, blocks), axis=0)  # [3, 3]
    resid = blocks[1] + blocks[2] - blocks[0]
    resid_sq = jnp.sum(jnp.sum(resid * resid, axis=1))
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    full = norms[0]
    dots = gram[0, 1:]

    def div(a, b):
        return jnp.where(b > 0, a / jnp.where(b > 0, b, 1.0), 0.0)

    return RoleGradientStats(
        full_norm=full,
        norm=norms[1:],
        cosine=jnp.clip(div(dots, full * norms[1:]), -1.0, 1.0),
        contribution=div(dots, full * full),
        num_tokens=counts,
        norm_per_token=div(norms[1:], counts),
        linearity_error=jnp.sqrt(resid_sq) / jnp.maximum(full, 1e-30),
    )


def role_gradient_stats(
    graphdef: Any,
    params: Any,
    tokens: jax.Array,
    valid: jax.Array,
    roles: jax.Array,
    advantages: jax.Array,
    old_logp: jax.Array | None = None,
    *,
    group_size: int | None = None,
    ratio: str = "at_one",
    temperature: float = 1.0,
) -> RoleGradientStats:
    """:class:`RoleGradientStats` of the batch, or of each group (``group_size``; rows group after
    group, leading axis ``[B // G]``). Arguments as in :func:`role_gradients`.

    With ``group_size`` this is the first half of :func:`grouped_role_gradient_stats`: groups are
    processed one after the other (one compiled program for all groups), so memory stays at a few
    parameter-sized gradients whatever the number of groups.
    """
    args = (graphdef, params, tokens, valid, roles, advantages, old_logp)
    if group_size is not None:
        return grouped_role_gradient_stats(
            *args, group_size=group_size, ratio=ratio, temperature=temperature
        )[0]
    arrays = _prepared(*args[2:], ratio)
    scalars = (jnp.float32(temperature), jnp.bool_(ratio == "importance"))
    return _stats_from_grads(*_role_grads(graphdef, params, *arrays, *scalars))


def grouped_role_gradient_stats(
    graphdef: Any,
    params: Any,
    tokens: jax.Array,
    valid: jax.Array,
    roles: jax.Array,
    advantages: jax.Array,
    old_logp: jax.Array | None = None,
    *,
    group_size: int,
    ratio: str = "at_one",
    temperature: float = 1.0,
) -> tuple[RoleGradientStats, RoleGradientStats]:
    """``(per_group, batch)``: the statistics of each group of ``group_size`` rows (as
    :func:`role_gradient_stats` with ``group_size``) and of the whole batch (as
    :func:`role_gradient_stats` without it), from one pass over the groups.

    The batch gradient is assembled from the groups' gradients: a group's surrogate is normalised by
    its own generated-token count ``n_g``, the batch's by ``N = sum_g n_g``, so
    ``g_batch = sum_g (n_g / N) g_group`` (exactly, for every scope). Memory stays at a few
    parameter-sized gradients whatever the batch size, so the batch statistic of a large rollout
    buffer costs no more memory than one group.
    """
    arrays = _prepared(tokens, valid, roles, advantages, old_logp, ratio)
    b = arrays[0].shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(f"batch {b} is not a multiple of group_size {group_size}")
    scalars = (jnp.float32(temperature), jnp.bool_(ratio == "importance"))
    gen_all = _masks(arrays[2], arrays[1])[0]
    per_group, total, counts = [], None, jnp.zeros((2,), jnp.float32)
    n_total = jnp.maximum(jnp.sum(gen_all), 1).astype(jnp.float32)
    for start in range(0, b, group_size):
        rows = tuple(x[start : start + group_size] for x in arrays)
        grads, c = _role_grads(graphdef, params, *rows, *scalars)
        per_group.append(_stats_from_grads(grads, c))
        n_g = jnp.sum(gen_all[start : start + group_size]).astype(jnp.float32)
        part = jax.tree.map(lambda g, w=n_g / n_total: g * w, grads)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
        counts = counts + c
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_group)
    return stacked, _stats_from_grads(total, counts)
