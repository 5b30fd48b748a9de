"""Tunix's GRPO policy update as a peer-benchmark worker (runs in ``runs/peer_venvs/tunix``).

Uses only Tunix's public API: a ``tunix.models.qwen2`` ``Qwen2`` built with random weights at the
benchmark shape, the registered GRPO policy loss (``function_registry.get_policy_loss_fn("grpo")``,
i.e. ``tunix.rl.algo_core.grpo_loss_fn``) with a ``GRPOConfig`` (beta = 0, so no reference model and
no KL term), and the RL actor trainer (``tunix.rl.trainer.Trainer``, a ``PeftTrainer``) wired the way
``GRPOLearner`` wires it (``with_loss_fn(..., has_aux=True)`` + ``with_gen_model_input_fn``). One
step is one call of the trainer's jitted train step (``jit_train_and_eval_step``, the function its
``train()`` loop calls per minibatch): forward + backward + optax update of the whole batch, given
old log-probs (not recomputed). ``train()``'s host-side bookkeeping (metrics buffering, progress
bar, checkpoint manager) is not timed.
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import worker_common


def build(spec: dict[str, Any], inputs: dict[str, np.ndarray]):
    from importlib import metadata

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2_lib
    from tunix.rl import function_registry
    from tunix.rl import trainer as rl_trainer
    from tunix.rl.grpo import grpo_learner
    from tunix.sft import peft_trainer

    m, o, a = spec["model"], spec["optim"], spec["algo"]
    config = qwen2_lib.ModelConfig(
        num_layers=m["n_layers"],
        vocab_size=m["vocab_size"],
        embed_dim=m["d_model"],
        hidden_dim=m["mlp_dim"],
        num_heads=m["n_heads"],
        head_dim=m["head_dim"],
        num_kv_heads=m["n_kv_heads"],
        rope_theta=int(m["rope_theta"]),
        norm_eps=m["rms_norm_eps"],
        use_tied_embedding=m["tie_embeddings"],
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    model = qwen2_lib.Qwen2(config, rngs=nnx.Rngs(spec["seed"]))
    algo = grpo_learner.GRPOConfig(
        num_generations=a["group_size"],
        num_iterations=1,
        beta=0.0,
        epsilon=a["clip_eps"],
        loss_agg_mode="token-mean",
    )
    algo.temperature = 1.0  # GRPOLearner copies the rollout temperature here
    policy_loss_fn = function_registry.get_policy_loss_fn("grpo")
    pad_id, eos_id = int(spec["pad_id"]), int(spec["eos_id"])
    optimizer = optax.chain(
        optax.clip_by_global_norm(o["max_grad_norm"]),
        optax.adamw(
            o["learning_rate"], b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=o["weight_decay"]
        ),
    )
    trainer = rl_trainer.Trainer(
        model=model,
        optimizer=optimizer,
        training_config=peft_trainer.TrainingConfig(eval_every_n_steps=10**9),
        custom_checkpoint_metadata_fn=dict,
    )
    trainer.with_loss_fn(
        lambda model, train_example, algo_config: policy_loss_fn(
            model, train_example, algo_config=algo_config, pad_id=pad_id, eos_id=eos_id
        ),
        has_aux=True,
    )
    trainer.with_gen_model_input_fn(lambda x: {"train_example": x, "algo_config": algo})
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    example = grpo_learner.TrainExample(
        prompt_ids=jnp.asarray(inputs["prompt_ids"], jnp.int32),
        prompt_mask=jnp.ones(inputs["prompt_ids"].shape, jnp.int32),
        completion_ids=jnp.asarray(inputs["completion_ids"], jnp.int32),
        completion_mask=jnp.asarray(inputs["completion_mask"], jnp.int32),
        advantages=jnp.asarray(inputs["advantages"], jnp.float32),
        ref_per_token_logps=None,
        old_per_token_logps=jnp.asarray(inputs["old_logp"], jnp.float32),
    )

    def step() -> float:
        loss, _aux, grad_norm = train_step(example)
        jax.block_until_ready((loss, grad_norm, nnx.state(model, nnx.Param)))
        return float(loss)

    info = dict(
        framework="tunix",
        version=metadata.version("google-tunix"),
        libraries={k: metadata.version(k) for k in ("jax", "jaxlib", "flax", "optax")},
        devices=str(jax.devices()),
        n_params=int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
    )
    return step, info


if __name__ == "__main__":
    sys.exit(worker_common.serve("tunix", build))
