"""The jitted RL update: ``(train_state, batch, key) -> (train_state, metrics)`` (DESIGN.md section 5).

One call runs ``epochs x num_minibatches`` optimiser steps on a rollout batch, as pure functions under
one ``jit`` (PureJaxRL style):

1. With the parameters at entry (no gradient): critic values (PPO) and reference log-probs (when the
   KL coefficient is > 0).
2. Advantages: GRPO / Dr. GRPO / RLOO on episode returns, broadcast to the generated tokens; or PPO's
   token-level GAE over generated tokens with each turn's reward on its response's last token.
3. ActFocus weights from the rollout-time energies (stop-gradient; computed once per batch, so they are
   free: no extra forward pass).
4. For each epoch, a random permutation of the rows split into minibatches; for each minibatch the
   weighted clipped surrogate (+ KL, entropy) and, for PPO, the clipped value loss; AdamW with global
   norm clipping (optax).

All intermediates a researcher inspects come back in :class:`StepMetrics` (scalars averaged over the
minibatches, plus per-token arrays of the batch in :class:`TokenIntermediates`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from actfocus_jax.models.sampling import token_logprobs
from actfocus_jax.models.transformer import apply, apply_values
from actfocus_jax.rl.actfocus import (
    ActFocusConfig,
    ActFocusStats,
    actfocus_weights,
    token_energies,
)
from actfocus_jax.rl.advantages import (
    broadcast_to_tokens,
    gae,
    grpo_advantages,
    grpo_turn_advantages,
    masked_group_center,
    masked_whiten,
)
from actfocus_jax.rl.losses import (
    LOSS_AGG_MODES,
    entropy_loss,
    kl_loss,
    kl_penalty,
    policy_loss,
    value_loss,
)
from actfocus_jax.rollout.buffer import RolloutBuffer
from actfocus_jax.rollout.roles import Role

__all__ = [
    "AlgoConfig",
    "StepMetrics",
    "TokenIntermediates",
    "TrainBatch",
    "TrainState",
    "TrainStatics",
    "batch_from_buffer",
    "init_train_state",
    "make_optimizer",
    "train_step",
    "trim_batch",
]

ALGOS = ("grpo", "ppo")


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """Hyper-parameters of the update (every field is a command-line flag in the trainer).

    Attributes:
      algo: ``"grpo"`` or ``"ppo"``.
      group_size: rollouts per task (rows are laid out group after group).
      normalize_std / leave_one_out / adv_eps: GRPO variants (Dr. GRPO: ``normalize_std=False``;
        RLOO: ``leave_one_out=True``).
      gamma / lam: GAE discount and trace parameters (PPO).
      clip_low / clip_high / dual_clip: surrogate clipping (asymmetric allowed; dual clip c > 1).
      loss_agg / loss_agg_norm: aggregation mode and fixed length of ``seq-mean-token-sum-norm``.
      kl_coef / kl_kind / kl_in_reward: KL to the frozen reference (0 disables it and no reference is
        kept); in the loss, or (PPO only) subtracted from the token rewards.
      entropy_coef: entropy bonus coefficient (loss ``-= coef * entropy``).
      vf_coef / value_clip: critic loss coefficient and value clip range (PPO).
      epochs / num_minibatches: passes over the batch and minibatches per pass.
      temperature: sampling temperature (log-probs are of the scaled distribution, as at rollout).
      turn_baseline: GRPO with a per-turn group baseline (``grpo_turn_advantages``): a token of
        turn ``t`` is compared with the rollouts of its group that reached turn ``t``.
      shuffle_advantages: a control (GRPO only): permute the episodes' advantages across the batch
        before the update, so the update has the real run's sizes and token statistics but no
        reward signal; a run with it measures drift (what updates of this size do without signal).
      critic_warmup_steps: PPO only: for the first ``n`` train steps (``TrainState.step < n``) only
        the critic is updated; the policy and its optimiser state are kept (verl's
        ``critic_warmup``), and its backward pass is skipped (``lax.cond``: the policy loss is
        still computed and logged, ``grad_norm`` is 0). A fresh value head predicts ~0, so
        without it PPO's first advantages are the raw returns, far from centred.
      whiten_advantages: PPO only: whiten the GAE advantages over the batch's loss tokens
        (:func:`~actfocus_jax.rl.advantages.masked_whiten`: zero mean, unit variance; verl and TRL
        do this by default). Without it, a critic that misses the mean return leaves every token's
        advantage with the same sign.
      group_center_advantages: PPO only: subtract from the GAE advantages of each task group
        (the ``group_size`` rollouts of one task) their token-weighted mean
        (:func:`~actfocus_jax.rl.advantages.masked_group_center`; no scaling), so that every
        task's advantages are centred as GRPO's group baseline centres its episodes, whatever
        the critic predicts; exclusive with ``whiten_advantages``.
      actfocus: ActFocus weighting (``enabled=False`` = plain PPO / GRPO).
    """

    algo: str = "grpo"
    group_size: int = 8
    normalize_std: bool = True
    leave_one_out: bool = False
    adv_eps: float = 1e-6
    gamma: float = 1.0
    lam: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    loss_agg: str = "token-mean"
    loss_agg_norm: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    vf_coef: float = 0.5
    value_clip: float | None = 0.2
    epochs: int = 1
    num_minibatches: int = 1
    temperature: float = 1.0
    turn_baseline: bool = False
    shuffle_advantages: bool = False
    critic_warmup_steps: int = 0
    whiten_advantages: bool = False
    group_center_advantages: bool = False
    actfocus: ActFocusConfig = dataclasses.field(default_factory=ActFocusConfig)

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {self.loss_agg!r}")
        if self.group_size < 1 or (self.algo == "grpo" and self.group_size < 2):
            raise ValueError(
                f"group_size={self.group_size}: GRPO needs >= 2 rollouts per task to form a baseline"
            )
        if self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError("epochs and num_minibatches must be >= 1")
        if self.kl_in_reward and self.algo != "ppo":
            raise ValueError(
                "kl_in_reward applies to PPO only; for GRPO the KL term is in the loss"
            )
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError("kl_coef and entropy_coef must be >= 0")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError("need 0 <= clip_low < 1 and clip_high >= 0")
        if self.turn_baseline and (self.algo != "grpo" or self.leave_one_out):
            raise ValueError(
                "turn_baseline is a GRPO group-mean baseline: use it with algo=grpo and "
                "leave_one_out=False"
            )
        if self.turn_baseline and self.shuffle_advantages:
            raise ValueError(
                "shuffle_advantages permutes episode advantages; turn_baseline has none"
            )
        if self.shuffle_advantages and self.algo != "grpo":
            raise ValueError(
                "shuffle_advantages is a GRPO control (episode-level advantages); PPO's per-token "
                "GAE advantages cannot be permuted across episodes of different lengths"
            )
        if self.critic_warmup_steps < 0:
            raise ValueError(f"critic_warmup_steps must be >= 0, got {self.critic_warmup_steps}")
        if self.critic_warmup_steps and self.algo != "ppo":
            raise ValueError(
                "critic_warmup_steps trains PPO's critic alone first; GRPO has no critic "
                "(set it to 0, or use algo=ppo)"
            )
        if self.whiten_advantages and self.algo != "ppo":
            raise ValueError(
                "whiten_advantages whitens PPO's GAE advantages; GRPO's are already normalised per "
                "group (normalize_std)"
            )
        if self.group_center_advantages and (self.algo != "ppo" or self.whiten_advantages):
            raise ValueError(
                "group_center_advantages centres PPO's GAE advantages per task group: use it "
                "with algo=ppo and without whiten_advantages (GRPO's advantages are already "
                "centred per group)"
            )
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0


def make_optimizer(
    learning_rate: float | optax.Schedule = 1e-5,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    kind: str = "adamw",
) -> optax.GradientTransformation:
    """AdamW (or SGD with momentum ``b1``) after global-norm gradient clipping
    (``max_grad_norm <= 0`` disables clipping).

    ``kind="sgd"`` exists for optimiser probes: Adam's per-parameter normalisation turns a tiny but
    consistent gradient (e.g. on near-deterministic template tokens) into a full ``learning_rate``
    step, which SGD does not; a larger ``eps`` damps the same effect within Adam.
    """
    if kind not in ("adamw", "sgd"):
        raise ValueError(f'optimizer kind must be "adamw" or "sgd", got {kind!r}')
    parts = []
    if max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    if kind == "adamw":
        parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    else:
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay))
        parts.append(optax.sgd(learning_rate, momentum=b1 or None))
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class TrainStatics:
    """Static (hashable) parts of the update: graph definitions, optimisers, config."""

    policy_graphdef: Any
    critic_graphdef: Any
    optimizer: optax.GradientTransformation
    critic_optimizer: optax.GradientTransformation | None
    config: AlgoConfig


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree: jit, orbax and sharding see arrays)."""

    step: jax.Array
    params: Any
    opt_state: Any
    critic_params: Any = None
    critic_opt_state: Any = None
    ref_params: Any = None


def init_train_state(
    policy: nnx.Module, statics: TrainStatics, critic: nnx.Module | None = None
) -> TrainState:
    """Initial state: policy params, optimiser state, and for PPO the critic; for KL a frozen copy."""
    _, params = nnx.split(policy)
    cfg = statics.config
    critic_params = critic_opt = None
    if cfg.algo == "ppo":
        if critic is None:
            raise ValueError("PPO needs a critic (see models.value_model_from_policy)")
        # A copy: the critic may share arrays with the policy (nnx.clone), and both are donated.
        critic_params = jax.tree.map(jnp.copy, nnx.split(critic)[1])
        critic_opt = statics.critic_optimizer.init(critic_params)
    ref = jax.tree.map(jnp.copy, params) if cfg.uses_reference else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=statics.optimizer.init(params),
        critic_params=critic_params,
        critic_opt_state=critic_opt,
        ref_params=ref,
    )


@chex.dataclass
class TrainBatch:
    """Model inputs and rollout-time quantities of a batch of ``B`` rows of ``L`` tokens."""

    tokens: chex.Array  # int32[B, L]
    valid: chex.Array  # bool[B, L]
    loss_mask: chex.Array  # bool[B, L] generated tokens
    roles: chex.Array  # int8[B, L]
    turn_ids: chex.Array  # int32[B, L]
    old_logp: chex.Array  # f32[B, L]
    entropy: chex.Array  # f32[B, L] sampling entropy
    logit: chex.Array  # f32[B, L] raw logit of the sampled token
    token_rewards: chex.Array  # f32[B, L] turn rewards on each response's last token
    episode_return: chex.Array  # f32[B]


def batch_from_buffer(buf: RolloutBuffer) -> TrainBatch:
    """The training view of a :class:`RolloutBuffer`."""
    return TrainBatch(
        tokens=buf.tokens,
        valid=buf.valid,
        loss_mask=buf.generated,
        roles=buf.roles,
        turn_ids=buf.turn_ids,
        old_logp=buf.old_logp,
        entropy=buf.entropy,
        logit=buf.logit,
        token_rewards=buf.token_rewards(),
        episode_return=buf.episode_return,
    )


def trim_batch(batch: TrainBatch, block: int) -> TrainBatch:
    """``batch`` without the columns past every row's last valid token, its width rounded up to a
    multiple of ``block`` (a few widths to compile). Host-side (the width must be concrete).

    A rollout buffer is as wide as the worst-case episode (WebShop: ~3,900 slots for 9 turns of
    384-token pages) while the episodes of a batch use far less; the dropped columns are padding
    (not valid, not in the loss), so the update is the same up to float summation order, except
    under ``seq-mean-token-sum-norm`` without a fixed ``loss_agg_norm``, whose norm is the width
    (the trainer refuses that combination). ``block <= 0`` returns ``batch`` unchanged.
    """
    width = batch.tokens.shape[1]
    if block <= 0:
        return batch
    valid = np.asarray(batch.valid)
    ends = np.where(valid.any(axis=1), width - np.argmax(valid[:, ::-1], axis=1), 0)
    new = min(width, max(block, -(-int(ends.max()) // block) * block))
    if new == width:
        return batch
    return jax.tree.map(lambda x: x[:, :new] if x.ndim == 2 and x.shape[1] == width else x, batch)


@chex.dataclass
class TokenIntermediates:
    """Per-token arrays of the batch ``[B, L]`` (0 outside generated tokens)."""

    advantages: chex.Array
    weights: chex.Array
    energies: chex.Array
    returns: chex.Array
    values: chex.Array
    ref_logp: chex.Array


@chex.dataclass
class StepMetrics:
    """Scalars of one update (minibatch quantities are means over all minibatches and epochs).

    ``num_rejected`` counts minibatch updates skipped because the loss or a gradient norm was not
    finite (the parameters and optimiser state were kept as they were before that minibatch).
    """

    loss: chex.Array
    pg_loss: chex.Array
    kl: chex.Array
    entropy: chex.Array
    value_loss: chex.Array
    clip_frac: chex.Array
    value_clip_frac: chex.Array
    approx_kl: chex.Array
    ratio_mean: chex.Array
    ratio_max: chex.Array
    grad_norm: chex.Array
    critic_grad_norm: chex.Array
    adv_mean: chex.Array
    adv_std: chex.Array
    # Where the advantage sits by role, and what the policy-gradient loss sees of it: the mean
    # advantage over the loss tokens of each role (0 when the batch has none of that role), and the
    # weight-averaged advantage sum(w A) / sum(w) over the loss tokens (= adv_mean when every
    # weight is 1). With advantages centred per group, ActFocus's weights move weighted_adv_mean
    # away from 0 when they correlate with the advantages: the two roles' means differ, or the
    # energy weights inside the action span track the advantage (README, Sokoban W'' replay).
    reasoning_adv_mean: chex.Array
    action_adv_mean: chex.Array
    weighted_adv_mean: chex.Array
    # PPO critic diagnostics over the loss tokens, at rollout time (GRPO: 0): the critic's mean
    # value, the mean GAE return (its target), and the explained variance
    # 1 - Var(R - V) / Var(R) (0 when Var(R) = 0). value_mean far below return_mean means the
    # advantages are uncentred (a fresh zero-head critic predicts 0).
    value_mean: chex.Array
    return_mean: chex.Array
    value_explained_var: chex.Array
    first_ratio_dev: chex.Array
    num_rejected: chex.Array
    actfocus: ActFocusStats
    tokens: TokenIntermediates


def _logp(graphdef, params, batch: TrainBatch, temperature: float):
    logits = apply(graphdef, params, batch.tokens, attention_mask=batch.valid)
    return token_logprobs(logits, batch.tokens, batch.valid, temperature)


def _masked_mean(x, mask):
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def _masked_var(x, mask):
    """Population variance of ``x`` over the ``mask`` tokens."""
    return _masked_mean((x - _masked_mean(x, mask)) ** 2, mask)


def _advantages(
    statics: TrainStatics, state: TrainState, batch: TrainBatch, ref_logp, shuffle_key=None
):
    cfg = statics.config
    mask = batch.loss_mask
    if cfg.algo == "grpo":
        if cfg.turn_baseline:
            adv = grpo_turn_advantages(
                batch.episode_return,
                batch.turn_ids,
                mask,
                cfg.group_size,
                normalize_std=cfg.normalize_std,
                eps=cfg.adv_eps,
            )
        else:
            adv_ep = grpo_advantages(
                batch.episode_return,
                cfg.group_size,
                normalize_std=cfg.normalize_std,
                leave_one_out=cfg.leave_one_out,
                eps=cfg.adv_eps,
            )
            if shuffle_key is not None:
                adv_ep = adv_ep[jax.random.permutation(shuffle_key, adv_ep.shape[0])]
            adv = broadcast_to_tokens(adv_ep, mask)
        zeros = jnp.zeros_like(adv)
        return adv, zeros, zeros
    values = apply_values(
        statics.critic_graphdef, state.critic_params, batch.tokens, attention_mask=batch.valid
    )
    values = jnp.where(mask, jax.lax.stop_gradient(values), 0.0)
    rewards = batch.token_rewards
    if cfg.kl_in_reward and ref_logp is not None:
        rewards = rewards - cfg.kl_coef * jnp.where(
            mask, kl_penalty(batch.old_logp, ref_logp, cfg.kl_kind), 0.0
        )
    adv, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:  # the returns (critic targets) stay those of the raw advantages
        adv = masked_whiten(adv, mask)
    elif cfg.group_center_advantages:
        adv = masked_group_center(adv, mask, cfg.group_size)
    return adv, returns, values


def _minibatch_loss(params, statics: TrainStatics, mb: dict, ref_logp):
    cfg = statics.config
    batch: TrainBatch = mb["batch"]
    logp, ent = _logp(statics.policy_graphdef, params, batch, cfg.temperature)
    mask = batch.loss_mask
    pg, pm = policy_loss(
        logp,
        batch.old_logp,
        mb["advantages"],
        mask,
        weights=mb["weights"],
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        loss_agg=cfg.loss_agg,
        dual_clip=cfg.dual_clip,
        loss_agg_norm=cfg.loss_agg_norm,
    )
    af = cfg.actfocus
    loss = pg
    kl = jnp.zeros((), jnp.float32)
    if ref_logp is not None and not cfg.kl_in_reward:
        kl = kl_loss(
            logp,
            ref_logp,
            mask,
            kind=cfg.kl_kind,
            loss_agg=cfg.loss_agg,
            weights=mb["weights"] if af.weight_kl else None,
            norm_length=cfg.loss_agg_norm,
        )
        loss = loss + cfg.kl_coef * kl
    ent_term = entropy_loss(
        ent,
        mask,
        loss_agg=cfg.loss_agg,
        weights=mb["weights"] if af.weight_entropy else None,
        norm_length=cfg.loss_agg_norm,
    )
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * ent_term
    aux = dict(
        pg_loss=pg,
        kl=kl,
        entropy=ent_term,
        clip_frac=pm.clip_frac,
        approx_kl=pm.approx_kl,
        ratio_mean=pm.ratio_mean,
        ratio_max=jnp.max(jnp.where(mask, pm.ratio, 0.0)),
        ratio_dev=jnp.max(jnp.where(mask, jnp.abs(pm.ratio - 1.0), 0.0)),
    )
    return loss, aux


def _critic_loss(critic_params, statics: TrainStatics, mb: dict):
    cfg = statics.config
    batch: TrainBatch = mb["batch"]
    values = apply_values(
        statics.critic_graphdef, critic_params, batch.tokens, attention_mask=batch.valid
    )
    vl, vm = value_loss(
        values,
        mb["old_values"],
        mb["returns"],
        batch.loss_mask,
        clip_range=cfg.value_clip,
        loss_agg=cfg.loss_agg,
        norm_length=cfg.loss_agg_norm,
    )
    return cfg.vf_coef * vl, (vl, vm.clip_frac)


@functools.partial(jax.jit, static_argnames=("statics",), donate_argnums=(0,))
def train_step(
    state: TrainState, batch: TrainBatch, key: jax.Array, *, statics: TrainStatics
) -> tuple[TrainState, StepMetrics]:
    """One RL update on a rollout batch.

    Args:
      state: the :class:`TrainState` (donated).
      batch: a :class:`TrainBatch` with ``B`` rows; ``B`` must be divisible by ``num_minibatches``.
      key: PRNG key for the minibatch permutations.
      statics: graph definitions, optimisers and :class:`AlgoConfig` (static).
    Returns:
      ``(new_state, metrics)``.
    """
    cfg = statics.config
    b = batch.tokens.shape[0]
    if b % cfg.num_minibatches:
        raise ValueError(
            f"batch of {b} rows is not divisible by num_minibatches={cfg.num_minibatches}"
        )
    mask = batch.loss_mask
    ref_logp = None
    if cfg.uses_reference:
        ref_logp, _ = _logp(statics.policy_graphdef, state.ref_params, batch, cfg.temperature)
        ref_logp = jax.lax.stop_gradient(ref_logp)
    shuffle_key = None
    if cfg.shuffle_advantages:  # only then is the key split: the default path keeps its stream
        key, shuffle_key = jax.random.split(key)
    adv, returns, values = _advantages(statics, state, batch, ref_logp, shuffle_key)
    af = cfg.actfocus
    energies = token_energies(
        af.energy, logp=batch.old_logp, entropy=batch.entropy, logit=batch.logit
    )
    energies = jnp.where(mask, energies, 0.0)  # reported in the metrics
    weights, af_stats = actfocus_weights(
        af,
        batch.roles,
        batch.turn_ids,
        logp=batch.old_logp,
        entropy=batch.entropy,
        logit=batch.logit,
    )
    per_row = dict(batch=batch, advantages=adv, weights=weights, returns=returns, old_values=values)
    if ref_logp is not None:
        per_row["ref_logp"] = ref_logp
    n_mb = cfg.num_minibatches

    def run_epoch(carry, epoch_key):
        state = carry
        perm = jax.random.permutation(epoch_key, b)
        shuffled = jax.tree.map(lambda x: x[perm], per_row)
        mbs = jax.tree.map(lambda x: x.reshape((n_mb, b // n_mb, *x.shape[1:])), shuffled)

        def run_minibatch(state, mb):
            mb_ref = mb.get("ref_logp")

            def update_policy(state):
                (loss, aux), grads = jax.value_and_grad(_minibatch_loss, has_aux=True)(
                    state.params, statics, mb, mb_ref
                )
                updates, opt_state = statics.optimizer.update(grads, state.opt_state, state.params)
                params = optax.apply_updates(state.params, updates)
                return params, opt_state, dict(aux, loss=loss, grad_norm=optax.global_norm(grads))

            def hold_policy(state):  # critic warm-up: the policy's loss, no backward pass
                loss, aux = _minibatch_loss(state.params, statics, mb, mb_ref)
                zero = jnp.zeros((), jnp.float32)
                return state.params, state.opt_state, dict(aux, loss=loss, grad_norm=zero)

            if cfg.critic_warmup_steps:  # the policy waits while the critic warms up
                params, opt_state, aux = jax.lax.cond(
                    state.step < cfg.critic_warmup_steps, hold_policy, update_policy, state
                )
            else:
                params, opt_state, aux = update_policy(state)
            loss = aux["loss"]
            critic_params, critic_opt = state.critic_params, state.critic_opt_state
            if cfg.algo == "ppo":
                (_, (vl, vclip)), cgrads = jax.value_and_grad(_critic_loss, has_aux=True)(
                    critic_params, statics, mb
                )
                cupd, critic_opt = statics.critic_optimizer.update(
                    cgrads, critic_opt, critic_params
                )
                critic_params = optax.apply_updates(critic_params, cupd)
                aux.update(
                    value_loss=vl, value_clip_frac=vclip, critic_grad_norm=optax.global_norm(cgrads)
                )
            else:
                zero = jnp.zeros((), jnp.float32)
                aux.update(value_loss=zero, value_clip_frac=zero, critic_grad_norm=zero)
            new_state = state.replace(
                params=params,
                opt_state=opt_state,
                critic_params=critic_params,
                critic_opt_state=critic_opt,
            )
            # A minibatch whose loss or gradients are not finite is rejected: the state is kept.
            ok = jnp.isfinite(loss) & jnp.isfinite(aux["grad_norm"])
            if cfg.algo == "ppo":
                ok = ok & jnp.isfinite(aux["value_loss"]) & jnp.isfinite(aux["critic_grad_norm"])
            state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
            aux["rejected"] = (~ok).astype(jnp.int32)
            return state, aux

        return jax.lax.scan(run_minibatch, state, mbs)

    state, aux = jax.lax.scan(run_epoch, state, jax.random.split(key, cfg.epochs))
    state = state.replace(step=state.step + 1)
    mean = lambda name: jnp.mean(aux[name])
    adv_mean = _masked_mean(adv, mask)
    adv_std = jnp.sqrt(_masked_var(adv, mask))
    w_loss = jnp.where(mask, weights, 0.0)
    weighted_adv_mean = jnp.sum(w_loss * adv) / jnp.maximum(jnp.sum(w_loss), 1e-12)
    value_mean, return_mean = _masked_mean(values, mask), _masked_mean(returns, mask)
    var_r, var_resid = _masked_var(returns, mask), _masked_var(returns - values, mask)
    explained_var = jnp.where(var_r > 0, 1.0 - var_resid / jnp.where(var_r > 0, var_r, 1.0), 0.0)
    metrics = StepMetrics(
        loss=mean("loss"),
        pg_loss=mean("pg_loss"),
        kl=mean("kl"),
        entropy=mean("entropy"),
        value_loss=mean("value_loss"),
        clip_frac=mean("clip_frac"),
        value_clip_frac=mean("value_clip_frac"),
        approx_kl=mean("approx_kl"),
        ratio_mean=mean("ratio_mean"),
        ratio_max=jnp.max(aux["ratio_max"]),
        grad_norm=mean("grad_norm"),
        critic_grad_norm=mean("critic_grad_norm"),
        adv_mean=adv_mean,
        adv_std=adv_std,
        reasoning_adv_mean=_masked_mean(adv, mask & (batch.roles == Role.REASONING)),
        action_adv_mean=_masked_mean(adv, mask & (batch.roles == Role.ACTION)),
        weighted_adv_mean=weighted_adv_mean,
        value_mean=value_mean,
        return_mean=return_mean,
        value_explained_var=explained_var,
        first_ratio_dev=aux["ratio_dev"][0, 0],
        num_rejected=jnp.sum(aux["rejected"]),
        actfocus=af_stats,
        tokens=TokenIntermediates(
            advantages=jnp.where(mask, adv, 0.0),
            weights=weights,
            energies=energies,
            returns=returns,
            values=values,
            ref_logp=jnp.zeros_like(adv) if ref_logp is None else jnp.where(mask, ref_logp, 0.0),
        ),
    )
    return state, metrics
