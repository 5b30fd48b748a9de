"""PPO / GRPO losses: clipped policy surrogate, loss aggregation, KL, entropy and value losses.

All functions are pure and ``jax.jit``-able; string / mode arguments are static. Token-level
arrays are ``[B, L]``; a ``mask`` / ``loss_mask`` (bool or 0-1) marks the loss tokens (the generated
tokens). Values at unmasked positions never reach the result, even when non-finite (every masked
reduction uses ``jnp.where`` rather than multiplication by the mask).

References:

* PPO clipped surrogate: Schulman et al. 2017, "Proximal Policy Optimization Algorithms";
  asymmetric clipping (``clip_low`` / ``clip_high``) as in DAPO / verl; dual clip from Ye et al.
  2020 ("Mastering Complex Control in MOBA Games with Deep RL") as in verl's
  ``compute_policy_loss`` (``clip_ratio_c``).
* Loss aggregation modes: verl's ``agg_loss`` (``token-mean``, ``seq-mean-token-mean``,
  ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``; the last from Dr. GRPO, Liu et al. 2025).
* KL estimators k1 / k2 / k3: J. Schulman, "Approximating KL Divergence" (2020 blog post); k3 is
  verl's ``low_var_kl`` and the estimator of GRPO (Shao et al. 2024).
* Clipped value loss: as in the PPO2 baselines / verl ``compute_value_loss``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

__all__ = [
    "KL_KINDS",
    "LOSS_AGG_MODES",
    "PolicyLossMetrics",
    "ValueLossMetrics",
    "aggregate",
    "entropy_loss",
    "kl_loss",
    "kl_penalty",
    "policy_loss",
    "value_loss",
]

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)

# Canonical KL estimator names and accepted aliases (verl's names).
KL_KINDS = ("k1", "k2", "k3")
_KL_ALIASES = {
    "k1": "k1",
    "kl": "k1",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
}

# Log-ratios are clamped to this range before exponentiation (as verl does) so that ratios stay
# finite in float32; |log ratio| > 20 means the policies disagree by a factor > 4.8e8 anyway.
LOG_RATIO_CLAMP = 20.0


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"unknown loss_agg mode {mode!r}; valid modes: {', '.join(LOSS_AGG_MODES)}"
        )


def _check_shapes(name_arrays: dict[str, jax.Array | None], shape) -> None:
    for name, a in name_arrays.items():
        if a is not None and tuple(a.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def aggregate(
    per_token: jax.Array,
    mask: jax.Array,
    mode: str = "token-mean",
    *,
    norm_length: float | None = None,
) -> jax.Array:
    """Aggregate a per-token loss ``[B, L]`` over the masked tokens into a scalar.

    Modes (``n_b`` = number of loss tokens of row ``b``, ``S_b`` = their sum):

    * ``"token-mean"``: ``sum_b S_b / sum_b n_b``, i.e. every loss token of the batch counts equally.
      The denominator is the token count: ActFocus weights multiply ``per_token`` beforehand and
      do not change it.
    * ``"seq-mean-token-mean"``: ``mean_b (S_b / n_b)``.
    * ``"seq-mean-token-sum"``: ``mean_b S_b``.
    * ``"seq-mean-token-sum-norm"``: ``mean_b (S_b / norm_length)`` with a fixed ``norm_length``
      (default: the padded length ``L``), Dr. GRPO's constant normaliser (verl's
      ``loss_scale_factor``).

    Empty rows (``n_b = 0``) contribute 0 and **are counted** in the ``B`` of the ``seq-mean``
    modes (current verl convention: the sequence denominator is the (micro)batch size, which keeps
    it constant across micro-batches). A batch without any loss token gives 0 in every mode (no NaN).

    Args:
      per_token: ``[B, L]`` per-token loss.
      mask: ``[B, L]`` bool / 0-1 loss mask.
      mode: one of :data:`LOSS_AGG_MODES`.
      norm_length: divisor of ``seq-mean-token-sum-norm`` (ignored by other modes).

    Returns:
      scalar loss (dtype of ``per_token``).
    """
    _check_mode(mode)
    per_token = jnp.asarray(per_token)
    if not jnp.issubdtype(per_token.dtype, jnp.floating):
        per_token = per_token.astype(jnp.float32)
    mask = jnp.asarray(mask).astype(bool)
    if per_token.ndim != 2:
        raise ValueError(f"per_token must be [B, L], got shape {per_token.shape}")
    _check_shapes({"mask": mask}, per_token.shape)
    dtype = per_token.dtype
    masked = jnp.where(mask, per_token, jnp.zeros((), dtype))
    if mode == "token-mean":
        count = jnp.sum(mask).astype(dtype)
        return jnp.sum(masked) / jnp.maximum(count, 1)
    seq_sum = jnp.sum(masked, axis=-1)
    if mode == "seq-mean-token-mean":
        seq_count = jnp.sum(mask, axis=-1).astype(dtype)
        seq_loss = seq_sum / jnp.maximum(seq_count, 1)
    elif mode == "seq-mean-token-sum":
        seq_loss = seq_sum
    else:  # seq-mean-token-sum-norm
        norm = per_token.shape[-1] if norm_length is None else norm_length
        seq_loss = seq_sum / jnp.asarray(norm, dtype)
    return jnp.mean(seq_loss)


@chex.dataclass
class PolicyLossMetrics:
    """Diagnostics of :func:`policy_loss` (per-token arrays are ``[B, L]``, 0 / 1 off the mask).

    Attributes:
      ratio: ``pi / pi_old`` per token (1 at unmasked positions).
      pg_loss_per_token: unweighted clipped surrogate loss per token (0 off the mask).
      weighted_pg_loss_per_token: the same times the ActFocus weights (= unweighted if none).
      pg_loss_unweighted: the unweighted loss aggregated with the same mode.
      clip_frac: fraction of loss tokens where the clipped term is active (``pg2 > pg1``).
      clip_frac_lower: fraction of loss tokens where the dual clip is active (0 without it).
      approx_kl: mean k1 estimate of ``KL(pi_old || pi)``, ``mean(old_logp - logp)`` (verl's
        ``ppo_kl``).
      approx_kl_k3: mean k3 estimate of the same KL, ``(ratio - 1) - log(ratio)`` (non-negative,
        low variance).
      ratio_mean / ratio_min / ratio_max: over loss tokens (1 if there is none).
      weight_mean: mean ActFocus weight over loss tokens (1 without weights).
      num_tokens: number of loss tokens.
    """

    ratio: jax.Array
    pg_loss_per_token: jax.Array
    weighted_pg_loss_per_token: jax.Array
    pg_loss_unweighted: jax.Array
    clip_frac: jax.Array
    clip_frac_lower: jax.Array
    approx_kl: jax.Array
    approx_kl_k3: jax.Array
    ratio_mean: jax.Array
    ratio_min: jax.Array
    ratio_max: jax.Array
    weight_mean: jax.Array
    num_tokens: jax.Array


def _masked_token_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    count = jnp.sum(mask).astype(x.dtype)
    return jnp.sum(jnp.where(mask, x, jnp.zeros((), x.dtype))) / jnp.maximum(count, 1)


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    loss_mask: jax.Array,
    *,
    weights: jax.Array | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_agg: str = "token-mean",
    dual_clip: float | None = None,
    loss_agg_norm: float | None = None,
) -> tuple[jax.Array, PolicyLossMetrics]:
    """PPO clipped surrogate policy loss with optional ActFocus token weights.

    Per loss token (Schulman et al. 2017)::

        ratio = exp(logp - old_logp)              (log-ratio clamped to +-20 first, as verl)
        pg1   = -A * ratio
        pg2   = -A * clip(ratio, 1 - clip_low, 1 + clip_high)
        pg    = max(pg1, pg2)
        if dual_clip = c (> 1) and A < 0:  pg = min(pg, -A * c)     (verl's ``clip_ratio_c``)
        loss  = aggregate(weights * pg, loss_mask, loss_agg)

    The ActFocus ``weights`` multiply the per-token loss before aggregation and leave the
    denominator of every mode unchanged (DESIGN.md section 4/5). Weights of exactly 1.0 reproduce
    the unweighted loss bit for bit.

    Args:
      logp: ``[B, L]`` log-probs of the sampled tokens under the current policy (differentiable).
      old_logp: ``[B, L]`` log-probs under the behaviour (rollout) policy.
      advantages: ``[B, L]`` per-token advantages.
      loss_mask: ``[B, L]`` bool / 0-1 loss tokens.
      weights: optional ``[B, L]`` per-token weights (e.g. ``actfocus.token_weights``); treated as
        constants only if the caller stops their gradient (``token_weights`` does).
      clip_low, clip_high: ratio clip range ``[1 - clip_low, 1 + clip_high]``.
      loss_agg: aggregation mode, see :func:`aggregate`.
      dual_clip: dual-clip constant ``c > 1`` or ``None`` (off).
      loss_agg_norm: ``norm_length`` of ``seq-mean-token-sum-norm``.

    Returns:
      ``(loss, metrics)``: scalar loss and :class:`PolicyLossMetrics`.
    """
    _check_mode(loss_agg)
    if dual_clip is not None and not isinstance(dual_clip, jax.core.Tracer) and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    logp = jnp.asarray(logp)
    old_logp = jnp.asarray(old_logp)
    advantages = jnp.asarray(advantages)
    mask = jnp.asarray(loss_mask).astype(bool)
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, L], got shape {logp.shape}")
    _check_shapes(
        {"old_logp": old_logp, "advantages": advantages, "loss_mask": mask, "weights": weights},
        logp.shape,
    )
    dtype = logp.dtype
    zero = jnp.zeros((), dtype)
    one = jnp.ones((), dtype)
    old_logp = old_logp.astype(dtype)
    advantages = jnp.where(mask, advantages.astype(dtype), zero)

    log_ratio = jnp.where(mask, logp - old_logp, zero)
    log_ratio = jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = jnp.maximum(pg1, pg2)
    clip_frac = _masked_token_mean((pg2 > pg1).astype(dtype), mask)
    if dual_clip is not None:
        pg3 = -advantages * dual_clip
        dual_active = (advantages < 0) & (pg > pg3)
        pg = jnp.where(advantages < 0, jnp.minimum(pg, pg3), pg)
        clip_frac_lower = _masked_token_mean(dual_active.astype(dtype), mask)
    else:
        clip_frac_lower = jnp.zeros((), dtype)
    pg = jnp.where(mask, pg, zero)

    if weights is None:
        weighted = pg
        weight_mean = one
    else:
        w = jnp.asarray(weights).astype(dtype)
        weighted = jnp.where(mask, pg * w, zero)
        weight_mean = jnp.where(jnp.any(mask), _masked_token_mean(w, mask), one)

    loss = aggregate(weighted, mask, loss_agg, norm_length=loss_agg_norm)
    unweighted = (
        loss if weights is None else aggregate(pg, mask, loss_agg, norm_length=loss_agg_norm)
    )

    # Diagnostics (no gradient).
    sg_log_ratio = jax.lax.stop_gradient(log_ratio)
    sg_ratio = jax.lax.stop_gradient(ratio)
    any_tok = jnp.any(mask)
    metrics = PolicyLossMetrics(
        ratio=sg_ratio,
        pg_loss_per_token=jax.lax.stop_gradient(pg),
        weighted_pg_loss_per_token=jax.lax.stop_gradient(weighted),
        pg_loss_unweighted=jax.lax.stop_gradient(unweighted),
        clip_frac=jax.lax.stop_gradient(clip_frac),
        clip_frac_lower=jax.lax.stop_gradient(clip_frac_lower),
        approx_kl=_masked_token_mean(-sg_log_ratio, mask),
        approx_kl_k3=_masked_token_mean(jnp.expm1(sg_log_ratio) - sg_log_ratio, mask),
        ratio_mean=jnp.where(any_tok, _masked_token_mean(sg_ratio, mask), one),
        ratio_min=jnp.where(any_tok, jnp.min(jnp.where(mask, sg_ratio, jnp.inf)), one),
        ratio_max=jnp.where(any_tok, jnp.max(jnp.where(mask, sg_ratio, -jnp.inf)), one),
        weight_mean=jax.lax.stop_gradient(weight_mean),
        num_tokens=jnp.sum(mask).astype(jnp.int32),
    )
    return loss, metrics


def kl_penalty(
    logp: jax.Array,
    ref_logp: jax.Array,
    kind: str = "k3",
    *,
    clamp: float | None = None,
) -> jax.Array:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi`` (Schulman's blog).

    With ``log_r = ref_logp - logp`` (log of ``pi_ref / pi`` at the sampled token):

    * ``"k1"`` (alias ``"kl"``): ``-log_r = logp - ref_logp`` (unbiased, high variance, can be < 0).
    * ``"k2"`` (alias ``"mse"``): ``0.5 * log_r**2`` (biased, low variance, >= 0).
    * ``"k3"`` (alias ``"low_var_kl"``): ``exp(log_r) - log_r - 1`` (unbiased, low variance, >= 0);
      ``log_r`` is clamped to +-20 before ``exp`` as in verl.

    Args:
      logp, ref_logp: ``[...]`` log-probs of the sampled tokens under the policy / reference.
      kind: estimator name.
      clamp: if given, the estimate is clipped to ``[-clamp, clamp]`` (verl clamps k3 to +-10).

    Returns:
      per-token estimate, same shape as ``logp``.
    """
    if kind not in _KL_ALIASES:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(sorted(_KL_ALIASES))}")
    kind = _KL_ALIASES[kind]
    logp = jnp.asarray(logp)
    ref_logp = jnp.asarray(ref_logp).astype(logp.dtype)
    log_r = ref_logp - logp
    if kind == "k1":
        kl = -log_r
    elif kind == "k2":
        kl = 0.5 * jnp.square(log_r)
    else:
        log_r = jnp.clip(log_r, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = jnp.exp(log_r) - log_r - 1.0
    if clamp is not None:
        kl = jnp.clip(kl, -clamp, clamp)
    return kl


def kl_loss(
    logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    *,
    kind: str = "k3",
    loss_agg: str = "token-mean",
    weights: jax.Array | None = None,
    clamp: float | None = None,
    norm_length: float | None = None,
) -> jax.Array:
    """Aggregated KL-to-reference loss term (GRPO's in-loss KL, Shao et al. 2024).

    ``aggregate(weights * kl_penalty(logp, ref_logp, kind), mask, loss_agg)``. ``weights`` are
    ``None`` by default: ActFocus weights multiply the KL term only when the
    ``ActFocusConfig.weight_kl`` flag asks for it (DESIGN.md section 4). The caller multiplies by
    the KL coefficient.
    """
    mask = jnp.asarray(mask).astype(bool)
    kl = kl_penalty(logp, ref_logp, kind, clamp=clamp)
    kl = jnp.where(mask, kl, jnp.zeros((), kl.dtype))
    if weights is not None:
        _check_shapes({"weights": weights}, kl.shape)
        kl = jnp.where(mask, kl * jnp.asarray(weights).astype(kl.dtype), jnp.zeros((), kl.dtype))
    return aggregate(kl, mask, loss_agg, norm_length=norm_length)


def entropy_loss(
    entropy: jax.Array,
    mask: jax.Array,
    loss_agg: str = "token-mean",
    *,
    weights: jax.Array | None = None,
    norm_length: float | None = None,
) -> jax.Array:
    """Aggregated policy entropy ``aggregate(weights * entropy, mask, loss_agg)`` (as verl).

    This is the quantity to *maximise*: the total loss is ``pg_loss - entropy_coef * entropy_loss``.
    ``weights`` (``None`` by default) are the optional ActFocus weights
    (``ActFocusConfig.weight_entropy``).
    """
    entropy = jnp.asarray(entropy)
    mask = jnp.asarray(mask).astype(bool)
    if weights is not None:
        _check_shapes({"weights": weights}, entropy.shape)
        entropy = jnp.where(
            mask, entropy * jnp.asarray(weights).astype(entropy.dtype), jnp.zeros((), entropy.dtype)
        )
    return aggregate(entropy, mask, loss_agg, norm_length=norm_length)


@chex.dataclass
class ValueLossMetrics:
    """Diagnostics of :func:`value_loss`.

    Attributes:
      value_loss_per_token: ``[B, L]`` per-token (clipped) value loss, 0 off the mask.
      clip_frac: fraction of loss tokens where the clipped loss is the larger one.
      value_mean: mean predicted value over loss tokens.
      return_mean: mean return over loss tokens.
      explained_variance: ``1 - Var(R - V) / Var(R)`` over loss tokens (0 if ``Var(R) = 0``).
    """

    value_loss_per_token: jax.Array
    clip_frac: jax.Array
    value_mean: jax.Array
    return_mean: jax.Array
    explained_variance: jax.Array


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip_range: float | None = 0.2,
    loss_agg: str = "token-mean",
    norm_length: float | None = None,
) -> tuple[jax.Array, ValueLossMetrics]:
    """Clipped critic loss (PPO2 / verl)::

        v_clip = clip(values, old_values - clip_range, old_values + clip_range)
        loss_t = 0.5 * max((values - R)^2, (v_clip - R)^2)

    ``clip_range=None`` gives the unclipped ``0.5 * (values - R)^2``.

    Args:
      values: ``[B, L]`` current critic values (differentiable).
      old_values: ``[B, L]`` critic values at rollout time.
      returns: ``[B, L]`` GAE returns.
      mask: ``[B, L]`` loss tokens.

    Returns:
      ``(loss, metrics)``.
    """
    values = jnp.asarray(values)
    dtype = values.dtype
    zero = jnp.zeros((), dtype)
    mask = jnp.asarray(mask).astype(bool)
    _check_shapes({"old_values": old_values, "returns": returns, "mask": mask}, values.shape)
    old_values = jnp.where(mask, jnp.asarray(old_values).astype(dtype), zero)
    returns = jnp.where(mask, jnp.asarray(returns).astype(dtype), zero)
    v = jnp.where(mask, values, zero)
    loss1 = jnp.square(v - returns)
    if clip_range is None:
        per_token = 0.5 * loss1
        clip_frac = jnp.zeros((), dtype)
    else:
        v_clip = jnp.clip(v, old_values - clip_range, old_values + clip_range)
        loss2 = jnp.square(v_clip - returns)
        per_token = 0.5 * jnp.maximum(loss1, loss2)
        clip_frac = _masked_token_mean((loss2 > loss1).astype(dtype), mask)
    per_token = jnp.where(mask, per_token, zero)
    loss = aggregate(per_token, mask, loss_agg, norm_length=norm_length)

    sg_v = jax.lax.stop_gradient(v)
    ret_mean = _masked_token_mean(returns, mask)
    var_r = _masked_token_mean(jnp.square(returns - ret_mean), mask)
    err = returns - sg_v
    err_mean = _masked_token_mean(err, mask)
    var_err = _masked_token_mean(jnp.square(err - err_mean), mask)
    ev = jnp.where(var_r > 0, 1.0 - var_err / jnp.where(var_r > 0, var_r, 1.0), zero)
    metrics = ValueLossMetrics(
        value_loss_per_token=jax.lax.stop_gradient(per_token),
        clip_frac=jax.lax.stop_gradient(clip_frac),
        value_mean=_masked_token_mean(sg_v, mask),
        return_mean=ret_mean,
        explained_variance=ev,
    )
    return loss, metrics
