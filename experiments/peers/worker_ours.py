"""Our GRPO policy update (``actfocus_jax.rl.train_step``) as a peer-benchmark worker.

Run by ``experiments/bench_peers.py`` with the project's interpreter; see ``worker_common`` for the
protocol. One step = ``train_step`` with GRPO, 1 epoch, 1 minibatch (the whole batch), no KL /
reference model, no critic, ActFocus off unless ``spec["ours_actfocus"]``; the old log-probs are the
given ones (not recomputed). The advantages are computed inside the step from the episode rewards
(GRPO, group std, as the coordinator computed the advantages it gives the peers); the worker checks
that they match.

``--variant full-attention`` is an ablation: the decoder's full-sequence pass uses the plain
:func:`~actfocus_jax.models.transformer.attention` over the whole ``[B, K, G, T, T]`` score tensor
(the code before :func:`~actfocus_jax.models.transformer.causal_attention`), so that the benchmark
measures both in the same run.
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import worker_common


def build(spec: dict[str, Any], inputs: dict[str, np.ndarray]):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import actfocus_jax
    from actfocus_jax.models import get_config, init_model
    from actfocus_jax.rl.actfocus import ActFocusConfig
    from actfocus_jax.rl.advantages import grpo_advantages
    from actfocus_jax.rl.train_step import (
        AlgoConfig,
        TrainBatch,
        TrainStatics,
        init_train_state,
        make_optimizer,
        train_step,
    )
    from actfocus_jax.rollout import Role

    if spec.get("variant") == "full-attention":
        from actfocus_jax.models import transformer

        transformer.causal_attention = lambda q, k, v, mask, block=None: transformer.attention(
            q, k, v, mask
        )
    elif spec.get("variant") not in (None, "", "unrolled"):
        raise ValueError(f"unknown variant {spec['variant']!r}")
    m, o, a = spec["model"], spec["optim"], spec["algo"]
    cfg = get_config(
        "tiny",
        n_layers=m["n_layers"],
        d_model=m["d_model"],
        mlp_dim=m["mlp_dim"],
        n_heads=m["n_heads"],
        n_kv_heads=m["n_kv_heads"],
        head_dim=m["head_dim"],
        vocab_size=m["vocab_size"],
        rope_theta=float(m["rope_theta"]),
        rms_norm_eps=m["rms_norm_eps"],
        qkv_bias=m["qkv_bias"],
        tie_embeddings=m["tie_embeddings"],
        max_seq_len=max(2048, spec["batch"]["prompt_len"] + spec["batch"]["completion_len"]),
        param_dtype="float32",
        dtype="float32",
        scan_unroll=m["n_layers"] if spec.get("variant") == "unrolled" else 1,
    )
    model = init_model(cfg, seed=spec["seed"])
    graphdef, _ = nnx.split(model)
    algo = AlgoConfig(
        algo="grpo",
        group_size=a["group_size"],
        normalize_std=True,
        adv_eps=a["adv_eps"],
        clip_low=a["clip_eps"],
        clip_high=a["clip_eps"],
        loss_agg="token-mean",
        kl_coef=0.0,
        entropy_coef=0.0,
        epochs=1,
        num_minibatches=1,
        temperature=1.0,
        actfocus=ActFocusConfig(enabled=bool(spec.get("ours_actfocus", False))),
    )
    optimizer = make_optimizer(
        o["learning_rate"],
        weight_decay=o["weight_decay"],
        max_grad_norm=o["max_grad_norm"],
        b1=o["b1"],
        b2=o["b2"],
    )
    statics = TrainStatics(
        policy_graphdef=graphdef,
        critic_graphdef=None,
        optimizer=optimizer,
        critic_optimizer=None,
        config=algo,
    )
    state = init_train_state(model, statics)

    prompt, comp = inputs["prompt_ids"], inputs["completion_ids"]
    cmask = inputs["completion_mask"].astype(bool)
    tokens = np.concatenate([prompt, comp], axis=1).astype(np.int32)
    valid = np.concatenate([np.ones_like(prompt, bool), cmask], axis=1)
    loss_mask = np.concatenate([np.zeros_like(prompt, bool), cmask], axis=1)
    roles = np.where(loss_mask, Role.REASONING, np.where(valid, Role.PROMPT, Role.PAD))
    old_logp = np.concatenate(
        [np.zeros(prompt.shape, np.float32), inputs["old_logp"] * cmask], axis=1
    ).astype(np.float32)
    batch = TrainBatch(
        tokens=tokens,
        valid=valid,
        loss_mask=loss_mask,
        roles=roles.astype(np.int8),
        turn_ids=np.where(valid, 0, -1).astype(np.int32),
        old_logp=old_logp,
        entropy=np.abs(old_logp),
        logit=-old_logp,
        token_rewards=np.zeros(tokens.shape, np.float32),
        episode_return=inputs["rewards"].astype(np.float32),
    )
    batch = jax.tree.map(jnp.asarray, batch)
    adv = np.asarray(
        grpo_advantages(batch.episode_return, a["group_size"], normalize_std=True, eps=a["adv_eps"])
    )
    adv_err = float(np.max(np.abs(adv - inputs["advantages"])))
    if adv_err > 1e-4:
        raise ValueError(f"our GRPO advantages differ from the given ones by {adv_err}")

    key = jax.random.key(spec["seed"])
    compiled = train_step.lower(state, batch, key, statics=statics).compile()
    info: dict[str, Any] = dict(
        framework="actfocus_jax",
        version=getattr(actfocus_jax, "__version__", "0.1.0"),
        libraries={"jax": jax.__version__, "flax": _version("flax"), "optax": _version("optax")},
        devices=str(jax.devices()),
        n_params=int(sum(x.size for x in jax.tree.leaves(state.params))),
        advantages_max_abs_diff=adv_err,
        variant=spec.get("variant") or "default (causal block attention)",
    )
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        info["xla_cost_analysis"] = {
            k: float(v) for k, v in (ca or {}).items() if k in ("flops", "bytes accessed")
        }
    except Exception as e:  # not every backend implements it
        info["xla_cost_analysis"] = {"error": str(e)}
    ma = compiled.memory_analysis()
    if ma is not None:
        info["xla_memory_bytes"] = {
            k: int(getattr(ma, f"{k}_size_in_bytes"))
            for k in ("argument", "output", "alias", "temp")
            if hasattr(ma, f"{k}_size_in_bytes")
        }
    holder = {"state": state}

    def step() -> float:
        new_state, metrics = compiled(holder["state"], batch, key)
        jax.block_until_ready((new_state, metrics.loss))
        holder["state"] = new_state
        return float(metrics.loss)

    return step, info


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(worker_common.serve("ours", build))
