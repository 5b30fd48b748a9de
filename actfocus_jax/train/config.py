"""Config validation and conversion to the library's typed configs.

:func:`validate` checks an experiment ``ConfigDict`` up front and raises :class:`ConfigError` naming
the field, the bad value and what is allowed; the ``*_from`` helpers build the frozen dataclasses the
jitted code takes as static arguments.
"""

from __future__ import annotations

from typing import Any

from actfocus_jax.rl.actfocus import ActFocusConfig
from actfocus_jax.rl.losses import LOSS_AGG_MODES
from actfocus_jax.rl.train_step import AlgoConfig
from actfocus_jax.rollout.engine import RolloutConfig

__all__ = [
    "ConfigError",
    "actfocus_config_from",
    "algo_config_from",
    "env_options_from",
    "rollout_config_from",
    "validate",
]

ENVS = ("sokoban", "frozenlake", "sudoku", "webshop")


class ConfigError(ValueError):
    """An invalid experiment configuration."""


def _check(cond: bool, field: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def validate(c: Any) -> None:
    """Range and compatibility checks of an experiment config (raises :class:`ConfigError`)."""
    _check(c.env.name in ENVS, "env.name", c.env.name, f"choose one of {ENVS}")
    for name in ("max_turns", "max_actions_per_turn", "max_actions_per_episode"):
        value = c.env[name]
        _check(value is None or value >= 1, f"env.{name}", value, "must be >= 1 (or unset)")
    _check(c.data.num_train >= 1, "data.num_train", c.data.num_train, "must be >= 1")
    _check(c.data.num_test >= 1, "data.num_test", c.data.num_test, "must be >= 1")
    _check(
        c.model.init in ("random", "sft") or str(c.model.init).startswith("hf:"),
        "model.init",
        c.model.init,
        'use "random", "sft" or "hf:<directory>"',
    )
    for name in ("dtype", "param_dtype"):
        _check(
            c.model[name] in ("float32", "bfloat16"),
            f"model.{name}",
            c.model[name],
            'use "float32" or "bfloat16"',
        )
    _check(c.sft.steps >= 0, "sft.steps", c.sft.steps, "must be >= 0")
    _check(c.sft.batch_size >= 1, "sft.batch_size", c.sft.batch_size, "must be >= 1")
    _check(
        c.sft.pad_multiple >= 0,
        "sft.pad_multiple",
        c.sft.pad_multiple,
        "must be >= 0 (0: pad every batch to sft.max_len)",
    )
    _check(0.0 <= c.sft.epsilon <= 1.0, "sft.epsilon", c.sft.epsilon, "must be in [0, 1]")
    _check(
        c.sft.reasoning in ("plan", "state"),
        "sft.reasoning",
        c.sft.reasoning,
        'use "plan" (narrate the actions) or "state" (describe the state only)',
    )
    r = c.rollout
    _check(r.num_tasks >= 1, "rollout.num_tasks", r.num_tasks, "must be >= 1")
    _check(r.group_size >= 1, "rollout.group_size", r.group_size, "must be >= 1")
    _check(r.path in ("fused", "host"), "rollout.path", r.path, 'use "fused" or "host"')
    _check(
        r.chat_format in ("plain", "chatml"),
        "rollout.chat_format",
        r.chat_format,
        'use "plain" or "chatml"',
    )
    _check(r.prompt in ("full", "compact"), "rollout.prompt", r.prompt, 'use "full" or "compact"')
    if c.env.name == "webshop":
        _check(
            r.path == "host",
            "rollout.path",
            r.path,
            "WebShop is a host environment: set --config.rollout.path=host",
        )
    a = c.algo
    _check(
        a.loss_agg in LOSS_AGG_MODES, "algo.loss_agg", a.loss_agg, f"choose one of {LOSS_AGG_MODES}"
    )
    if a.algo == "grpo":
        _check(
            r.group_size >= 2,
            "rollout.group_size",
            r.group_size,
            "GRPO needs >= 2 rollouts per task to form a group baseline",
        )
    batch = r.num_tasks * r.group_size
    _check(
        batch % a.num_minibatches == 0,
        "algo.num_minibatches",
        a.num_minibatches,
        f"must divide the batch of num_tasks x group_size = {batch} episodes",
    )
    _check(c.optim.learning_rate > 0, "optim.learning_rate", c.optim.learning_rate, "must be > 0")
    _check(
        c.optim.optimizer in ("adamw", "sgd"),
        "optim.optimizer",
        c.optim.optimizer,
        'use "adamw" or "sgd"',
    )
    _check(0 <= c.optim.b1 < 1, "optim.b1", c.optim.b1, "must be in [0, 1)")
    _check(0 <= c.optim.b2 < 1, "optim.b2", c.optim.b2, "must be in [0, 1)")
    _check(c.optim.eps > 0, "optim.eps", c.optim.eps, "must be > 0")
    _check(c.train.steps >= 0, "train.steps", c.train.steps, "must be >= 0")
    _check(c.train.save_every >= 1, "train.save_every", c.train.save_every, "must be >= 1")
    _check(c.train.keep >= 1, "train.keep", c.train.keep, "must be >= 1")
    trim = c.train.get("trim_block", 0)
    _check(trim >= 0, "train.trim_block", trim, "must be >= 0 (0: no trimming)")
    _check(
        not (trim and a.loss_agg == "seq-mean-token-sum-norm" and not a.get("loss_agg_norm")),
        "train.trim_block",
        trim,
        "seq-mean-token-sum-norm normalises by the batch width, which trimming changes: set "
        "algo.loss_agg_norm to a fixed length or train.trim_block=0",
    )
    _check(c.eval.num_tasks >= 1, "eval.num_tasks", c.eval.num_tasks, "must be >= 1")
    _check(c.eval.batch_size >= 1, "eval.batch_size", c.eval.batch_size, "must be >= 1")
    _check(
        c.eval.samples_per_task >= 1,
        "eval.samples_per_task",
        c.eval.samples_per_task,
        "must be >= 1",
    )
    _check(c.nan_policy in ("stop", "skip"), "nan_policy", c.nan_policy, 'use "stop" or "skip"')
    try:
        algo_config_from(c)
        rollout_config_from(c, max_turns=1)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from e


def actfocus_config_from(c: Any) -> ActFocusConfig:
    """The :class:`ActFocusConfig` of ``c.actfocus``."""
    f = c.actfocus
    return ActFocusConfig(
        alpha=float(f.alpha),
        beta=float(f.beta),
        tau=float(f.tau),
        w_max=float(f.w_max),
        scope=f.scope,
        normalize=f.normalize,
        energy=f.energy,
        weight_kl=bool(f.weight_kl),
        weight_entropy=bool(f.weight_entropy),
        enabled=bool(f.enabled),
    )


def algo_config_from(c: Any) -> AlgoConfig:
    """The :class:`AlgoConfig` of ``c.algo`` (+ group size, temperature, ActFocus)."""
    a = c.algo
    return AlgoConfig(
        algo=a.algo,
        group_size=int(c.rollout.group_size),
        normalize_std=bool(a.normalize_std),
        leave_one_out=bool(a.leave_one_out),
        adv_eps=float(a.adv_eps),
        gamma=float(a.gamma),
        lam=float(a.lam),
        clip_low=float(a.clip_low),
        clip_high=float(a.clip_high),
        dual_clip=float(a.dual_clip) if a.dual_clip else None,
        loss_agg=a.loss_agg,
        loss_agg_norm=float(a.loss_agg_norm) if a.loss_agg_norm else None,
        kl_coef=float(a.kl_coef),
        kl_kind=a.kl_kind,
        kl_in_reward=bool(a.kl_in_reward),
        entropy_coef=float(a.entropy_coef),
        vf_coef=float(a.vf_coef),
        value_clip=float(a.value_clip) if a.value_clip else None,
        critic_warmup_steps=int(a.get("critic_warmup_steps", 0)),
        whiten_advantages=bool(a.get("whiten_advantages", False)),
        group_center_advantages=bool(a.get("group_center_advantages", False)),
        epochs=int(a.epochs),
        num_minibatches=int(a.num_minibatches),
        temperature=float(c.rollout.temperature),
        turn_baseline=bool(a.turn_baseline),
        shuffle_advantages=bool(a.shuffle_advantages),
        actfocus=actfocus_config_from(c),
    )


def rollout_config_from(c: Any, *, max_turns: int, greedy: bool = False) -> RolloutConfig:
    """The :class:`RolloutConfig` of ``c.rollout`` for an env with ``max_turns`` turns."""
    r = c.rollout
    return RolloutConfig(
        max_turns=int(max_turns),
        max_response_tokens=int(r.max_response_tokens),
        temperature=float(r.temperature),
        top_k=int(r.top_k),
        top_p=float(r.top_p),
        greedy=greedy,
    )


def env_options_from(c: Any) -> dict[str, Any]:
    """Keyword options of ``envs.make`` (unset limits are left to the environment)."""
    from actfocus_jax.envs import option_defaults

    opts = c.env.options.to_dict() if hasattr(c.env.options, "to_dict") else dict(c.env.options)
    # Options left at the env's default (or unset) are not passed: the env applies its own default,
    # and task sets built before an option became configurable keep their identity.
    defaults = option_defaults(c.env.name) if c.env.name in _known_envs() else {}
    opts = {
        k: v
        for k, v in opts.items()
        if v is not None and not (k in defaults and _same(v, defaults[k][0]))
    }
    for name in ("max_turns", "max_actions_per_turn", "max_actions_per_episode"):
        if c.env[name] is not None:
            opts[name] = int(c.env[name])
    opts["format_penalty"] = float(c.env.format_penalty)
    return opts


def _known_envs() -> tuple[str, ...]:
    from actfocus_jax.envs import list_envs

    return list_envs()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return type(a) is type(b) and a == b
