"""The experiment driver: task sets, model initialisation, SFT warm start, RL loop, evaluation.

One :class:`Experiment` per config (``experiments/configs/*.py``). The same code runs on CPU, GPU and
TPU: the device mesh comes from ``config.mesh`` and the batch is sharded over its data axes, for the
update and (fused path, more than one data shard) for the rollouts and evaluations too.

Determinism and exact resume: every random draw of RL step ``s`` comes from
``fold_in(PRNGKey(seed), s)`` and the tasks of step ``s`` from a per-epoch permutation of the train
split at a position stored in the checkpoint, so a run stopped after step ``k`` and resumed continues
with exactly the keys and tasks of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actfocus_jax import envs
from actfocus_jax.data.webshop_goals import (
    build_webshop_goals,
    goal_set_options,
    load_goal_indices,
    webshop_env_options,
)
from actfocus_jax.models import (
    CausalLM,
    ModelConfig,
    get_config,
    load_pretrained,
    save_pretrained,
)
from actfocus_jax.models.transformer import (
    init_model,
    set_runtime_options,
    value_model_from_policy,
)
from actfocus_jax.provenance import machine_info
from actfocus_jax.rl.train_step import (
    TrainStatics,
    batch_from_buffer,
    init_train_state,
    make_optimizer,
    train_step,
    trim_batch,
)
from actfocus_jax.rollout.buffer import RolloutBuffer, check_buffer
from actfocus_jax.rollout.engine import (
    make_turn_template,
    rollout_fused,
    rollout_host,
    system_prompt_for,
    transformer_policy,
)
from actfocus_jax.text import TextTokenizer, build_embedded_tokenizer
from actfocus_jax.train.config import (
    algo_config_from,
    env_options_from,
    rollout_config_from,
    validate,
)

__all__ = [
    "FINAL_PER_TASK",
    "Experiment",
    "TrainingDivergedError",
    "build_sft_demos",
    "episode_metrics",
    "run_rl",
    "run_sft",
]

#: File in ``<workdir>/rl`` with the final policy's per-task held-out success rates.
FINAL_PER_TASK = "final_per_task.json"


class TrainingDivergedError(RuntimeError):
    """The loss or the gradients became NaN/inf; the last good checkpoint is left untouched."""


def episode_metrics(buf: RolloutBuffer, prefix: str = "") -> dict[str, float]:
    """Host summary of a rollout batch: success, return, turns, actions, invalid rates, lengths."""
    gen = np.asarray(buf.generated)
    roles = np.asarray(buf.roles)
    n_gen = max(int(gen.sum()), 1)
    turns = np.asarray(buf.num_turns)
    out = {
        "success": float(np.mean(np.asarray(buf.success))),
        "return": float(np.mean(np.asarray(buf.episode_return))),
        "num_turns": float(np.mean(turns)),
        "num_actions": float(np.mean(np.asarray(buf.num_actions))),
        "invalid_per_turn": float(np.sum(np.asarray(buf.invalid_actions)) / max(turns.sum(), 1)),
        "truncated_responses": float(np.mean(np.asarray(buf.truncated_responses))),
        "gen_tokens_per_episode": float(gen.sum() / gen.shape[0]),
        "action_token_share": float((roles == 2).sum() / n_gen),
        "seq_len": float(np.mean(np.asarray(buf.length))),
    }
    # Per-turn statistics: share of episodes still running at each turn, success by turn count.
    for t in range(buf.turn_rewards.shape[1]):
        played = turns > t
        out[f"turn{t}/played"] = float(np.mean(played))
        if played.any():
            out[f"turn{t}/reward"] = float(np.mean(np.asarray(buf.turn_rewards)[played, t]))
    return {f"{prefix}{k}": v for k, v in out.items()}


class Experiment:
    """Everything one config needs, built lazily.

    Args:
      config: an experiment ``ConfigDict`` (validated here).
      workdir: overrides ``config.workdir``.
    """

    def __init__(self, config: Any, workdir: str | None = None):
        validate(config)
        self.config = config
        self.workdir = os.path.abspath(workdir or config.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.data_dir = os.path.abspath(config.data_dir)
        self._tokenizer: TextTokenizer | None = None
        self._env: Any = None
        self._task_set: Any = None
        self._hf_model: Any = None
        self._template: Any = None
        self._mesh: Any = None
        #: ModelConfig of the policy in use (set by :meth:`init_policy`).
        self.policy_config: Any = None

    # ------------------------------------------------------------------ building blocks
    @property
    def is_host_env(self) -> bool:
        return self.config.env.name == "webshop"

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            init = str(self.config.model.init)
            if init.startswith("hf:"):
                self._hf_model, self._tokenizer = load_pretrained(init[3:])
            else:
                self._tokenizer = build_embedded_tokenizer()
        return self._tokenizer

    @property
    def env(self) -> Any:
        if self._env is None:
            opts = env_options_from(self.config)
            if self.is_host_env:
                opts = webshop_env_options(opts)
            self._env = envs.make(self.config.env.name, tokenizer=self.tokenizer, **opts)
        return self._env

    def _runtime_options(self) -> dict[str, Any]:
        """The model's runtime options (:class:`ModelConfig` fields outside the HF config)."""
        m = self.config.model
        return {
            "scan_unroll": int(m.scan_unroll),
            "remat": bool(m.get("remat", ModelConfig.remat)),
            "attn_block": int(m.get("attn_block", ModelConfig.attn_block)),
        }

    def model_config(self):
        """The model's config: the HF checkpoint's, or the preset with a vocab fitting the tokenizer."""
        c = self.config
        if self._hf_model is not None:
            return self._hf_model.config.replace(**self._runtime_options())
        overrides = {k: int(c.model[k]) for k in ("n_layers", "d_model", "mlp_dim") if c.model[k]}
        cfg = get_config(
            c.model.preset,
            dtype=c.model.dtype,
            param_dtype=c.model.param_dtype,
            **self._runtime_options(),
            **overrides,
        )
        if cfg.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"model preset {c.model.preset!r} has vocab_size={cfg.vocab_size} < the tokenizer's "
                f"{self.tokenizer.vocab_size}; use a preset with a larger vocabulary"
            )
        return cfg

    @property
    def mesh(self) -> Any:
        """The device mesh of ``config.mesh`` (built once)."""
        if self._mesh is None:
            from actfocus_jax.parallel import make_mesh

            m = self.config.mesh
            self._mesh = make_mesh(m.data, m.fsdp, m.tensor)
        return self._mesh

    def rollout_mesh(self) -> Any:
        """The mesh that fused rollouts are sharded over: :attr:`mesh` when it has more than one
        data shard (``data x fsdp``), else None (also for the host path)."""
        if self.is_host_env or self.config.rollout.path == "host":
            return None
        m = self.mesh
        return m if m.shape["data"] * m.shape["fsdp"] > 1 else None

    def template(self):
        """The token template of the episode layout (built once)."""
        if self._template is None:
            prompt = system_prompt_for(self.env, self.config.rollout.prompt)
            self._template = make_turn_template(
                self.tokenizer, prompt, self.config.rollout.chat_format
            )
        return self._template

    def task_set(self):
        """The TFDS task set of a JAX env (built on first use)."""
        if self._task_set is None:
            from actfocus_jax.data.tasks import build_task_set

            c = self.config
            self._task_set = build_task_set(
                self.data_dir,
                c.env.name,
                num_train=c.data.num_train,
                num_test=c.data.num_test,
                seed=c.data.seed,
                env_options=env_options_from(c),
            )
        return self._task_set

    def goal_set(self):
        """The TFDS dataset of WebShop instructions (built on first use)."""
        if self._task_set is None:
            opts = goal_set_options(env_options_from(self.config))
            self._task_set = build_webshop_goals(self.data_dir, env_options=opts)
        return self._task_set

    def tasks(self, split: str, indices: Any = None) -> tuple[Any, np.ndarray]:
        """``(tasks, task_ids)`` of a split: pytree batch (JAX envs) or goal indices (WebShop)."""
        if self.is_host_env:
            goals = load_goal_indices(self.goal_set(), split, indices)
            return list(goals), goals
        from actfocus_jax.data.tasks import load_tasks

        tasks, ids, _ = load_tasks(self.task_set(), split, indices)
        return tasks, ids

    def split_size(self, split: str) -> int:
        if self.is_host_env:
            return len(self.env.goals(split))
        return self.config.data.num_train if split == "train" else self.config.data.num_test

    def init_policy(self) -> CausalLM:
        """A policy per ``config.model.init``: random, the SFT checkpoint, or a HF directory."""
        init = str(self.config.model.init)
        model = set_runtime_options(self._load_policy(init), **self._runtime_options())
        self.policy_config = model.config
        return model

    def _load_policy(self, init: str) -> CausalLM:
        if init.startswith("hf:"):
            _ = self.tokenizer
            return self._hf_model
        if init == "sft":
            path = self.sft_dir
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise FileNotFoundError(
                    f"no SFT checkpoint in {path}; run `python -m experiments.sft` with the same "
                    "--config first, or set --config.model.init=random"
                )
            model, _ = load_pretrained(path)
            return model
        return init_model(self.model_config(), self.config.seed)

    @property
    def sft_dir(self) -> str:
        return os.path.join(self.workdir, "sft")

    # ------------------------------------------------------------------ rollouts
    def rollout(
        self,
        graphdef: Any,
        params: Any,
        tasks: Any,
        task_ids: np.ndarray,
        key: jax.Array,
        *,
        group_size: int,
        greedy: bool = False,
    ) -> RolloutBuffer:
        """One batch of episodes with the configured path (fused on device, or host loop).

        With a :meth:`rollout_mesh` the fused rollout runs sharded over it: the episodes are split
        over its data axes and ``params`` are placed as in training (:func:`shard_params`) unless
        they already live on the mesh; ``len(task_ids) * group_size`` must then be divisible by the
        number of data shards.
        """
        env = self.env
        mcfg = self.policy_config
        rcfg = rollout_config_from(self.config, max_turns=env.max_turns, greedy=greedy)
        kwargs = dict(
            policy=transformer_policy(graphdef, mcfg),
            env=env,
            template=self.template(),
            cfg=rcfg,
            group_size=group_size,
            vocab=mcfg.vocab_size,
        )
        if self.is_host_env or self.config.rollout.path == "host":
            buf = rollout_host(params, tasks, task_ids, key, **kwargs)
        elif (mesh := self.rollout_mesh()) is not None:
            params = _on_mesh(params, mesh)
            buf = rollout_fused(params, tasks, jnp.asarray(task_ids), key, mesh=mesh, **kwargs)
        else:
            buf = rollout_fused(params, tasks, jnp.asarray(task_ids), key, **kwargs)
        if self.config.debug:
            check_buffer(buf)
        return buf

    def evaluate(self, graphdef: Any, params: Any, **kwargs: Any) -> dict[str, float]:
        """Success rate, return and per-turn statistics (:meth:`evaluate_tasks` without the
        per-task rates; same keyword arguments)."""
        return self.evaluate_tasks(graphdef, params, **kwargs)[0]

    def evaluate_tasks(
        self,
        graphdef: Any,
        params: Any,
        *,
        split: str = "test",
        greedy: bool = True,
        seed: int = 0,
        samples_per_task: int = 1,
    ) -> tuple[dict[str, float], np.ndarray]:
        """Evaluation metrics on the first ``eval.num_tasks`` tasks of ``split`` and, per task, its
        success rate over ``samples_per_task`` episodes (greedy decoding plays one).

        Episodes are keyed by ``seed`` and the batch start only, so two policies evaluated with the
        same seed see the same tasks with the same sampling keys (common random numbers): their
        per-task difference is a paired comparison (:func:`paired_task_gain`). JAX envs run
        fixed-shape batches of ``eval.batch_size`` tasks, rounded up to a multiple of the rollout
        mesh's data shards (the padding repeats the last task and is dropped).
        """
        c = self.config
        k = 1 if greedy else int(samples_per_task)
        if k < 1:
            raise ValueError(f"samples_per_task must be >= 1, got {samples_per_task}")
        n = min(c.eval.num_tasks, self.split_size(split))
        bs = c.eval.batch_size
        mesh = self.rollout_mesh()
        shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        width = -(-bs // shards) * shards
        bufs = []
        for start in range(0, n, bs):
            idx = np.arange(start, min(start + bs, n))
            if len(idx) < width and not self.is_host_env:
                idx = np.concatenate([idx, np.full(width - len(idx), idx[-1])])  # fixed shapes
            tasks, ids = self.tasks(split, idx)
            key = jax.random.fold_in(jax.random.key(seed), start)
            buf = self.rollout(graphdef, params, tasks, ids, key, group_size=k, greedy=greedy)
            keep = min(bs, n - start) * k  # episodes are task-major: task i owns rows i*k..i*k+k-1
            bufs.append(jax.tree.map(lambda x, k=keep: np.asarray(x)[:k], buf))
        merged = jax.tree.map(lambda *x: np.concatenate(x), *bufs)
        per_task = np.asarray(merged.success, np.float64).reshape(n, k).mean(axis=1)
        return episode_metrics(merged), per_task

    # ------------------------------------------------------------------ RL
    def _statics(self, graphdef: Any, critic_graphdef: Any) -> TrainStatics:
        c = self.config
        algo = algo_config_from(c)
        lr = _schedule(c.optim.learning_rate, c.optim.warmup_steps)
        opt = make_optimizer(
            lr,
            weight_decay=c.optim.weight_decay,
            max_grad_norm=c.optim.max_grad_norm,
            b1=c.optim.b1,
            b2=c.optim.b2,
            eps=c.optim.eps,
            kind=c.optim.optimizer,
        )
        copt = None
        if algo.algo == "ppo":
            clr = _schedule(c.optim.critic_learning_rate, c.optim.warmup_steps)
            copt = make_optimizer(clr, max_grad_norm=c.optim.max_grad_norm)
        return TrainStatics(
            policy_graphdef=graphdef,
            critic_graphdef=critic_graphdef,
            optimizer=opt,
            critic_optimizer=copt,
            config=algo,
        )

    def run_sft(self) -> dict[str, Any]:
        """SFT warm start on the demonstrations; writes a HF directory to :attr:`sft_dir`."""
        return run_sft(self)

    def run_rl(self, *, resume: bool = False) -> dict[str, Any]:
        """RL training (see :func:`run_rl`)."""
        return run_rl(self, resume=resume)

    def evaluate_checkpoint(
        self,
        which: str = "rl",
        *,
        split: str = "test",
        per_task_path: str | None = None,
        baseline_path: str | None = None,
    ) -> dict[str, Any]:
        """Evaluates ``"rl"`` (the final RL policy), ``"sft"`` or ``"hf:<dir>"``, greedy and sampled
        (per-task success rates to ``per_task_path``, see :meth:`evaluate_modes`).

        With ``baseline_path`` (another policy's per-task file from the same config and seed) the
        result also holds the gain over it paired by task, ``gain/<mode>/success`` with its 95%
        t-interval ``gain/<mode>/success_lo`` / ``_hi`` (:func:`paired_task_gain`).
        """
        if which == "rl":
            path = os.path.join(self.workdir, "rl", "final_policy")
        elif which == "sft":
            path = self.sft_dir
        elif which.startswith("hf:"):
            path = which[3:]
        else:
            raise ValueError(f"checkpoint={which!r}: use 'rl', 'sft' or 'hf:<dir>'")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"no policy at {path}; train it first (experiments.sft / experiments.train) or "
                "pass --checkpoint=hf:<dir>"
            )
        before = None
        if baseline_path is not None:
            if not os.path.isfile(baseline_path):
                raise FileNotFoundError(
                    f"no per-task baseline at {baseline_path}; write one with "
                    "experiments.evaluate --per_task_out (the main job writes "
                    "<workdir>/warm_start_per_task.json)"
                )
            with open(baseline_path) as f:
                before = json.load(f)
        model, _ = load_pretrained(path)
        self.policy_config = model.config
        graphdef, params = nnx.split(model)
        results, after = self.evaluate_modes_tasks(graphdef, params, split=split)
        if per_task_path is not None:
            _write_per_task(per_task_path, split, after)
        if before is not None:
            from actfocus_jax.analysis.results import mode_gains

            for mode, g in mode_gains(before, after).items():
                results[f"gain/{mode}/success"] = g["mean"]
                results[f"gain/{mode}/success_lo"] = g["lo"]
                results[f"gain/{mode}/success_hi"] = g["hi"]
        return results

    def evaluate_modes(
        self,
        graphdef: Any,
        params: Any,
        *,
        split: str = "test",
        prefix: str = "",
        per_task_path: str | None = None,
    ) -> dict[str, float]:
        """:meth:`evaluate_modes_tasks`'s metrics; with ``per_task_path`` its per-task success
        rates (``{"split", "greedy": [...], "sampled": [...]}``) are written there as JSON, for
        paired comparisons of two policies (:func:`paired_task_gain`)."""
        out, per_task = self.evaluate_modes_tasks(graphdef, params, split=split, prefix=prefix)
        if per_task_path is not None:
            _write_per_task(per_task_path, split, per_task)
        return out

    def evaluate_modes_tasks(
        self, graphdef: Any, params: Any, *, split: str = "test", prefix: str = ""
    ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """:meth:`evaluate_tasks` greedy (keys ``{prefix}greedy/...``) and, if
        ``config.eval.sampled``, with sampling, ``eval.samples_per_task`` episodes per task
        (``{prefix}sampled/...``); returns the metrics and ``{"greedy": [...], "sampled": [...]}``,
        the per-task success rates."""
        metrics, greedy = self.evaluate_tasks(graphdef, params, split=split, greedy=True)
        out = _prefixed(f"{prefix}greedy/", metrics)
        per_task = {"greedy": np.asarray(greedy).tolist()}
        if self.config.eval.sampled:
            metrics, sampled = self.evaluate_tasks(
                graphdef,
                params,
                split=split,
                greedy=False,
                samples_per_task=int(self.config.eval.samples_per_task),
            )
            out.update(_prefixed(f"{prefix}sampled/", metrics))
            per_task["sampled"] = np.asarray(sampled).tolist()
        return out, per_task

    def step_tasks(self, position: dict[str, int]) -> tuple[Any, np.ndarray, dict[str, int]]:
        """Tasks of one RL step from the data position ``{"epoch", "index"}``; returns the next one."""
        c = self.config
        n = self.split_size("train")
        k = c.rollout.num_tasks
        epoch, index = int(position["epoch"]), int(position["index"])
        picked: list[int] = []
        while len(picked) < k:
            perm = np.random.default_rng([c.seed, epoch]).permutation(n)
            take = min(k - len(picked), n - index)
            picked.extend(perm[index : index + take].tolist())
            index += take
            if index >= n:
                epoch, index = epoch + 1, 0
        tasks, ids = self.tasks("train", np.asarray(picked))
        return tasks, ids, {"epoch": epoch, "index": index}


def _schedule(lr: float, warmup: int):
    import optax

    if warmup <= 0:
        return lr
    return optax.linear_schedule(0.0, lr, warmup)


def _flat(prefix: str, tree: Any) -> dict[str, float]:
    from actfocus_jax.train.logging import flatten_metrics

    return flatten_metrics(tree, prefix)


def _finite(metrics: Any) -> bool:
    return bool(np.isfinite(float(metrics.loss))) and bool(np.isfinite(float(metrics.grad_norm)))


def run_rl(exp: Experiment, *, resume: bool = False) -> dict[str, Any]:
    """The RL loop (see the module docstring); returns the final evaluation and summary."""
    from actfocus_jax.analysis.bottleneck import batch_bottleneck_metrics
    from actfocus_jax.parallel import (
        init_sharded,
        replicate,
        shard_batch,
        shard_params,
    )
    from actfocus_jax.train.checkpoint import Checkpointer
    from actfocus_jax.train.logging import MetricsLogger

    c = exp.config
    rl_dir = os.path.join(exp.workdir, "rl")
    os.makedirs(rl_dir, exist_ok=True)
    policy = exp.init_policy()
    graphdef, _ = nnx.split(policy)
    critic = value_model_from_policy(policy) if c.algo.algo == "ppo" else None
    statics = exp._statics(graphdef, nnx.split(critic)[0] if critic is not None else None)
    mesh = exp.mesh
    state = init_train_state(policy, statics, critic)
    del policy, critic
    state = state.replace(
        params=shard_params(state.params, mesh),
        ref_params=None if state.ref_params is None else shard_params(state.ref_params, mesh),
        critic_params=None
        if state.critic_params is None
        else shard_params(state.critic_params, mesh),
    )
    state = state.replace(
        step=replicate(state.step, mesh),
        opt_state=init_sharded(statics.optimizer.init, state.params, mesh),
        critic_opt_state=None
        if state.critic_params is None
        else init_sharded(statics.critic_optimizer.init, state.critic_params, mesh),
    )
    ckpt = Checkpointer(
        rl_dir, save_every=c.train.save_every, max_to_keep=c.train.keep, resume=resume
    )
    config_json = json.loads(c.to_json_best_effort())
    # The run's config as a plain file too (the checkpoints hold it as well), for the tools that
    # read a run directory without orbax (aggregation, notebooks) and for people.
    with open(os.path.join(rl_dir, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2, sort_keys=True)
    start, position = 0, {"epoch": 0, "index": 0}
    base_key = jax.random.key(c.seed)
    if resume:
        restored = ckpt.restore_latest_good(
            target=state, config=config_json, must_match=("env.name", "model.preset", "algo.algo")
        )
        if restored.skipped:
            ckpt.discard_after(restored.step)
        state, start, position = restored.train_state, restored.step, restored.data_position
        print(f"[train] resumed from step {start} ({rl_dir})")
    logger = MetricsLogger(rl_dir, resume_step=start if resume else None, total_steps=c.train.steps)
    group = c.rollout.group_size
    try:
        for step in range(start, c.train.steps):
            tasks, ids, next_position = exp.step_tasks(position)
            key = jax.random.fold_in(base_key, step)
            k_roll, k_upd = jax.random.split(key)
            t0 = time.perf_counter()
            buf = exp.rollout(graphdef, state.params, tasks, ids, k_roll, group_size=group)
            jax.block_until_ready(buf.tokens)
            t1 = time.perf_counter()
            batch = trim_batch(batch_from_buffer(buf), c.train.get("trim_block", 0))
            batch = shard_batch(batch, mesh)
            state, m = train_step(state, batch, k_upd, statics=statics)
            finite = _finite(m)
            t2 = time.perf_counter()
            if not finite or int(m.num_rejected) > 0:
                msg = (
                    f"non-finite loss or gradients at RL step {step} (loss={float(m.loss)}, "
                    f"grad_norm={float(m.grad_norm)}, rejected minibatches={int(m.num_rejected)})"
                )
                if c.nan_policy == "stop":
                    ckpt.close()
                    raise TrainingDivergedError(
                        msg + f"; the run stops. The last good checkpoint in {rl_dir} is intact: "
                        "lower optim.learning_rate or set --config.nan_policy=skip, then --resume."
                    )
                print(f"[train] {msg}; update skipped (nan_policy=skip)")
            elif c.debug:
                chex.assert_tree_all_finite(m)  # every loss, ratio, weight and advantage
            position = next_position
            metrics = episode_metrics(buf, "rollout/")
            metrics.update(_flat("train/", _scalars(m)))
            metrics.update(batch_bottleneck_metrics(buf, group, prefix="bottleneck/"))
            n_tok = float(np.asarray(buf.generated).sum())
            metrics.update(
                {
                    "time/rollout_s": t1 - t0,
                    "time/update_s": t2 - t1,
                    "time/gen_tokens_per_s": n_tok / max(t1 - t0, 1e-9),
                    "train/batch_width": float(batch.tokens.shape[1]),
                }
            )
            done_steps = step + 1
            if c.train.eval_every and done_steps % c.train.eval_every == 0:
                metrics.update(
                    _prefixed("eval/", exp.evaluate(graphdef, state.params, greedy=True))
                )
            logger.log(done_steps, metrics)
            if ckpt.should_save(done_steps) or done_steps == c.train.steps:
                ckpt.save(
                    done_steps,
                    state,
                    rng_key=base_key,
                    data_position=position,
                    config=config_json,
                    metrics={k: v for k, v in metrics.items() if not k.startswith("turn")},
                )
        ckpt.wait_until_finished()
        # Learning curves and summary table (summary.txt, curves.png) of the keys every run logs,
        # plus the periodic evaluation when the schedule has one.
        keys = ["rollout/success", "rollout/return", "train/loss"]
        if 0 < c.train.eval_every <= c.train.steps:
            keys.append("eval/success")
        table = logger.write_report(keys)
    finally:
        ckpt.close()
        logger.close()
    save_pretrained(
        nnx.merge(graphdef, state.params), exp.tokenizer, os.path.join(rl_dir, "final_policy")
    )
    final = exp.evaluate_modes(
        graphdef,
        state.params,
        prefix="final/",
        per_task_path=os.path.join(rl_dir, FINAL_PER_TASK),
    )
    summary = {
        "final": final,
        "steps": c.train.steps,
        "workdir": rl_dir,
        "machine": machine_info(),
    }
    with open(os.path.join(rl_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    print(table)
    return summary


def _on_mesh(params: Any, mesh: Any) -> Any:
    """``params`` sharded over ``mesh`` as in training, unless every leaf already lives on it."""
    from actfocus_jax.parallel import shard_params

    devices = set(mesh.devices.flat)
    leaves = jax.tree.leaves(params)
    if all(isinstance(x, jax.Array) and x.sharding.device_set == devices for x in leaves):
        return params
    return shard_params(params, mesh)


def _scalars(m: Any) -> Any:
    """The metrics without the per-token arrays."""
    return m.replace(tokens=None)


def _write_per_task(path: str, split: str, per_task: dict[str, list[float]]) -> None:
    with open(path, "w") as f:
        json.dump({"split": split, **per_task}, f)


def _prefixed(prefix: str, d: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in d.items()}


def build_sft_demos(c: Any, data_dir: str, *, num_tasks: int | None = None) -> Any:
    """The TFDS demonstration set of config ``c`` (built once under ``data_dir``, then reused);
    ``num_tasks`` overrides ``c.sft.num_tasks``."""
    from actfocus_jax.data.demos import build_demos

    return build_demos(
        data_dir,
        c.env.name,
        num_tasks=c.sft.num_tasks if num_tasks is None else num_tasks,
        demos_per_task=c.sft.demos_per_task,
        epsilon=c.sft.epsilon,
        seed=c.data.seed,
        env_options=env_options_from(c),
        task_num_train=c.data.num_train,
        task_num_test=c.data.num_test,
        task_seed=c.data.seed,
        prompt=c.rollout.prompt,
        reasoning=c.sft.reasoning,
    )


def run_sft(exp: Experiment) -> dict[str, Any]:
    """SFT warm start: demonstrations (TFDS) -> next-token loss on responses -> HF directory."""
    from actfocus_jax.data.demos import load_sft_batches
    from actfocus_jax.train.logging import MetricsLogger
    from actfocus_jax.train.sft import sft_step

    c = exp.config
    t0 = time.perf_counter()
    builder = build_sft_demos(c, exp.data_dir)
    t_data = time.perf_counter() - t0
    model = init_model(exp.model_config(), c.seed)
    graphdef, params = nnx.split(model)
    schedule = _cosine(c.sft.learning_rate, c.sft.warmup_steps, max(c.sft.steps, 1))
    optimizer = make_optimizer(schedule, max_grad_norm=c.optim.max_grad_norm)
    opt_state = optimizer.init(params)
    batches = load_sft_batches(
        builder,
        c.sft.batch_size,
        c.sft.max_len,
        seed=c.seed,
        drop_remainder=True,
        pad_multiple=c.sft.pad_multiple,
    )
    log_dir = os.path.join(exp.workdir, "sft_logs")
    logger = MetricsLogger(
        log_dir, total_steps=c.sft.steps, postfix_keys=("sft/loss", "sft/accuracy")
    )
    try:
        for step in range(c.sft.steps):
            batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
            params, opt_state, m = sft_step(
                params, opt_state, batch, graphdef=graphdef, optimizer=optimizer
            )
            logger.log(step + 1, _flat("sft/", m))
    finally:
        logger.close()
    model = nnx.merge(graphdef, params)
    save_pretrained(model, exp.tokenizer, exp.sft_dir)
    info = {
        "sft_dir": exp.sft_dir,
        "steps": c.sft.steps,
        "data_seconds": t_data,
        "train_seconds": time.perf_counter() - t0 - t_data,
        "num_demos": len(builder.as_data_source(split="train")),
        # demos served over all steps, and how many of them max_len cut short
        "demos_served": batches.num_served,
        "demos_truncated": batches.num_truncated,
    }
    print(f"[sft] wrote the warm-started policy to {exp.sft_dir} ({info['steps']} steps)")
    return info


def _cosine(lr: float, warmup: int, total: int):
    import optax

    return optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup, 1), max(total, warmup + 1), lr * 0.1
    )
