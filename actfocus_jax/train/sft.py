"""Supervised fine-tuning step: next-token cross-entropy on the generated (response) tokens only.

The warm start of the embedded model (DESIGN.md section 7): the loss is the mean negative log-likelihood
of the demonstration's response tokens given everything before them; prompt and observation tokens
are context only, exactly as in RL.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from actfocus_jax.models.sampling import token_logprobs
from actfocus_jax.models.transformer import apply

__all__ = ["SftMetrics", "sft_loss", "sft_step"]


@chex.dataclass
class SftMetrics:
    """Scalars of one SFT step: loss (mean NLL per response token), token accuracy, gradient norm."""

    loss: chex.Array
    accuracy: chex.Array
    grad_norm: chex.Array
    num_tokens: chex.Array


def sft_loss(graphdef: Any, params: Any, batch: dict) -> tuple[jax.Array, dict]:
    """Mean NLL over ``batch["loss_mask"]`` tokens.

    Args:
      graphdef, params: ``nnx.split`` of a :class:`~actfocus_jax.models.CausalLM`.
      batch: ``tokens`` int32 ``[B, L]``, ``valid`` bool ``[B, L]``, ``loss_mask`` bool ``[B, L]``.
    Returns:
      ``(loss, aux)`` with token accuracy (greedy prediction equals the target) in ``aux``.
    """
    tokens, valid = batch["tokens"], batch["valid"]
    mask = batch["loss_mask"] & valid
    logits = apply(graphdef, params, tokens, attention_mask=valid)
    logp, _ = token_logprobs(logits, tokens, valid)
    n = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    loss = -jnp.sum(jnp.where(mask, logp, 0.0)) / n
    pred = jnp.argmax(logits, axis=-1)
    # logits[t] predicts token t + 1 (right-padded rows: the previous slot is the previous token).
    hit = jnp.concatenate([jnp.zeros_like(tokens[:, :1], bool), pred[:, :-1] == tokens[:, 1:]], 1)
    acc = jnp.sum(jnp.where(mask, hit, False)) / n
    return loss, {"accuracy": acc, "num_tokens": n}


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer"), donate_argnums=(0, 1))
def sft_step(
    params: Any,
    opt_state: Any,
    batch: dict,
    *,
    graphdef: Any,
    optimizer: optax.GradientTransformation,
) -> tuple[Any, Any, SftMetrics]:
    """One optimiser step on a right-padded batch; returns ``(params, opt_state, metrics)``."""
    (loss, aux), grads = jax.value_and_grad(lambda p: sft_loss(graphdef, p, batch), has_aux=True)(
        params
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = SftMetrics(
        loss=loss,
        accuracy=aux["accuracy"],
        grad_norm=optax.global_norm(grads),
        num_tokens=aux["num_tokens"],
    )
    return params, opt_state, metrics
