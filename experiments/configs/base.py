"""The shared experiment config; per-environment files override a few fields.

Every field can be overridden on the command line, e.g.::

    python -m experiments.train --config=experiments/configs/sokoban.py:tiny \\
        --config.actfocus.alpha=0.2 --config.algo.algo=ppo --config.rollout.group_size=8

Unknown fields are rejected by ml_collections; values are range-checked by
:func:`actfocus_jax.train.config.validate` before anything runs.
"""

from __future__ import annotations

import ml_collections

from actfocus_jax.envs import option_defaults
from actfocus_jax.models import ModelConfig


def get_base_config(env: str = "sokoban", model: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = f"runs/{env}_{model}"
    c.data_dir = "data"
    c.debug = False  # chex shape/finiteness checks of every buffer and metric
    c.nan_policy = "stop"  # "stop" (raise, keep the last good checkpoint) or "skip" the step

    c.env = ml_collections.ConfigDict()
    c.env.name = env
    # None = the environment's own default (see each env's docstring).
    c.env.max_turns = ml_collections.config_dict.placeholder(int)
    c.env.max_actions_per_turn = ml_collections.config_dict.placeholder(int)
    c.env.max_actions_per_episode = ml_collections.config_dict.placeholder(int)
    c.env.format_penalty = -0.1
    # Env-specific options (room size, rewards, slippery, ...) with the env's own defaults, so that
    # each can be overridden on the command line; only values that differ from the defaults are
    # passed to the env (and identify the task set).
    c.env.options = env_options_config(env)

    c.data = ml_collections.ConfigDict()
    c.data.num_train = 512
    c.data.num_test = 128
    c.data.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.preset = model
    c.model.init = "sft"  # "random", "sft" (the SFT checkpoint in workdir/sft), or "hf:<dir>"
    c.model.dtype = "float32"
    # Shape overrides of the preset (None = the preset's value), e.g. smaller models for ablations.
    c.model.n_layers = ml_collections.config_dict.placeholder(int)
    c.model.d_model = ml_collections.config_dict.placeholder(int)
    c.model.mlp_dim = ml_collections.config_dict.placeholder(int)
    c.model.param_dtype = "float32"
    # Layers per lax.scan iteration (1 = rolled; >= n_layers = fully unrolled: faster steps, longer
    # compiles; `python -m experiments.bench --suite unroll` measures both).
    c.model.scan_unroll = 1
    # Recompute each block's activations in the backward pass (jax.checkpoint): memory for one
    # block's attention tensors instead of all of them, for ~1 more forward of compute.
    c.model.remat = False
    # Query-block size of the causal attention of a full-sequence pass (training, scoring): smaller
    # blocks skip more of the masked upper triangle; the same result up to float summation order
    # (`python -m experiments.bench --suite layout` measures the step time).
    c.model.attn_block = ModelConfig.attn_block

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 300
    c.sft.batch_size = 16
    c.sft.learning_rate = 1e-3
    c.sft.warmup_steps = 20
    c.sft.max_len = 512
    # 0: every batch padded to max_len (one compiled shape); k > 0: to the batch's longest demo
    # rounded up to a multiple of k (fewer padded columns, a few shapes to compile).
    c.sft.pad_multiple = 0
    c.sft.num_tasks = 256
    c.sft.demos_per_task = 2
    c.sft.epsilon = 0.15
    # "plan": <think> narrates the state and the actions the answer writes (the decision is made in
    # the reasoning); "state": <think> describes the state only (the decision is made in the answer).
    c.sft.reasoning = "plan"

    c.rollout = ml_collections.ConfigDict()
    c.rollout.num_tasks = 8  # tasks per RL step
    c.rollout.group_size = 8  # rollouts per task
    c.rollout.max_response_tokens = 48
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.chat_format = "plain" if model == "tiny" else "chatml"  # prompt layout
    # "compact": a one-line task statement (the embedded model learns the rules from the SFT demos);
    # "full": the environment's rules, symbols and answer format (for pretrained chat models).
    c.rollout.prompt = "compact" if model == "tiny" else "full"
    c.rollout.path = "fused"  # "fused" (on device) or "host" (turn loop on the host)

    c.algo = ml_collections.ConfigDict()
    c.algo.algo = "grpo"
    c.algo.normalize_std = True
    c.algo.leave_one_out = False
    c.algo.adv_eps = 1e-6
    c.algo.gamma = 1.0
    c.algo.lam = 1.0
    c.algo.clip_low = 0.2
    c.algo.clip_high = 0.2
    c.algo.dual_clip = 0.0  # 0 = off, else c > 1
    c.algo.loss_agg = "token-mean"
    c.algo.loss_agg_norm = 0.0  # 0 = the padded length (seq-mean-token-sum-norm)
    c.algo.kl_coef = 0.0
    c.algo.kl_kind = "k3"
    c.algo.kl_in_reward = False
    c.algo.entropy_coef = 0.0
    c.algo.vf_coef = 0.5
    c.algo.value_clip = 0.2
    c.algo.epochs = 1
    c.algo.num_minibatches = 2
    # GRPO's group mean taken per turn over the rollouts that reached the turn (see
    # actfocus_jax.rl.advantages.grpo_turn_advantages); False = the episode-level group mean.
    c.algo.turn_baseline = False
    # A control run: permute the episodes' GRPO advantages across the batch (no reward signal,
    # same update sizes), to tell learning from drift.
    c.algo.shuffle_advantages = False
    # PPO: train steps at the start in which only the critic learns (the policy waits).
    c.algo.critic_warmup_steps = 0
    # PPO: whiten the GAE advantages over the batch (verl / TRL default; off = raw GAE).
    c.algo.whiten_advantages = False
    # PPO: centre the GAE advantages per task group (each task's token mean subtracted, no
    # scaling: a per-task baseline like GRPO's, whatever the critic predicts).
    c.algo.group_center_advantages = False

    c.actfocus = ml_collections.ConfigDict()
    c.actfocus.enabled = True
    c.actfocus.alpha = 0.1
    c.actfocus.beta = 1.0
    c.actfocus.tau = 1.0
    c.actfocus.w_max = 5.0
    c.actfocus.scope = "trajectory"
    c.actfocus.normalize = "none"
    c.actfocus.energy = "neg_logprob"
    c.actfocus.weight_kl = False
    c.actfocus.weight_entropy = False

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-5
    c.optim.critic_learning_rate = 1e-4
    c.optim.warmup_steps = 5
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0
    c.optim.optimizer = "adamw"  # or "sgd" (momentum = b1) for the policy's RL updates
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.train = ml_collections.ConfigDict()
    c.train.steps = 60
    c.train.eval_every = 20
    c.train.save_every = 10
    c.train.keep = 3
    c.train.log_every = 1
    # > 0: each update's batch is cut to its longest episode rounded up to a multiple of this
    # (rl.train_step.trim_batch): for host environments whose worst-case budget is far longer than
    # their episodes (WebShop). 0: the rollout buffer's full width.
    c.train.trim_block = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.num_tasks = 128
    c.eval.batch_size = 64
    c.eval.sampled = True  # also evaluate with sampling (temperature above), besides greedy
    c.eval.samples_per_task = 1  # sampled episodes per task (their mean is the task's success)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


def env_options_config(env: str) -> ml_collections.ConfigDict:
    """A ConfigDict of the env's options (``actfocus_jax.envs.option_defaults``), minus those that
    the config sets at the top level (``env.max_turns``, ``env.format_penalty``, ...)."""
    top = ("max_turns", "max_actions_per_turn", "max_actions_per_episode", "format_penalty")
    d = ml_collections.ConfigDict()
    for name, (default, typ) in option_defaults(env).items():
        if name in top:
            continue
        d[name] = ml_collections.config_dict.placeholder(typ) if default is None else default
    return d
