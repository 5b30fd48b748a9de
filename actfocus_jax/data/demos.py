"""Supervised fine-tuning demonstrations: solver episodes with reasoning text, as a TFDS dataset.

Episodes (:class:`DemoGenerator`): for a task, an episode is played on the host with the JAX env
(one jitted ``reset`` and one jitted ``parse_actions`` + ``step`` per env, compiled once). Every turn
the env's solver replans *from the current state* (:mod:`actfocus_jax.data.reasoning`; slippery
FrozenLake moves can go astray, so the plan is always recomputed), the first
``min(max_actions_per_turn, actions left)`` planned actions are taken, and each is replaced with
probability ``epsilon`` by a different random action (imperfect demonstrations leave RL room to
improve). The response is ``<think> {reasoning} </think><answer>{A1} || {A2}</answer>``, where the
reasoning describes the state and exactly the actions written in the answer. The env is stepped
with ``env.parse_actions`` of the response's own tokens, exactly as in a rollout, and the parse is
checked against the intended actions. The episode stops when done (success, terminal state, action
cap or ``max_turns``).

Token layout (identical to :mod:`actfocus_jax.rollout.engine` with the ``"plain"`` template)::

    first_prefix obs_1 first_suffix  response_1  turn_prefix obs_2 turn_suffix  response_2 ...

with the observation tokens taken from the env's ``Timestep.obs_tokens[:obs_len]``, no observation
after the last response, ``generated`` True on response tokens, ``turn_ids`` as in the rollout buffer
(0-based: ``response_{t+1}`` and the chunk before it, ``[first_prefix obs_1 first_suffix]`` or
``[turn_prefix obs_{t+1} turn_suffix]``, are turn ``t``) and roles from :func:`actfocus_jax.rollout.masks.compute_roles`.

WebShop, a host env, has its own generator with the same interface and token layout
(:mod:`actfocus_jax.data.webshop_demos`; :func:`make_demo_generator` picks it).

Dataset (:class:`SftDemos`, a ``GeneratorBasedBuilder`` written as ``array_record`` and read with
``tfds.data_source``): demonstrations of tasks drawn from the TRAIN split of the project's task set
(:func:`actfocus_jax.data.tasks.build_task_set`), so that no test task is ever demonstrated. Splits:
``train`` and (when ``val_fraction`` leaves at least one task) ``validation``, over disjoint tasks.
Use :func:`build_demos` (idempotent) and :class:`SftBatches` / :func:`load_sft_batches` for padded
NumPy batches with a checkpointable position ``(epoch, index)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from actfocus_jax.data.reasoning import Expert, format_response, make_expert
from actfocus_jax.data.tasks import TaskSetError, build_task_set, load_tasks, prepare_once
from actfocus_jax.rollout.engine import TurnTemplate, make_turn_template, system_prompt_for
from actfocus_jax.rollout.masks import compute_roles

__all__ = [
    "DemoEpisode",
    "DemoGenerator",
    "EpisodeBuilder",
    "SftBatches",
    "SftDemos",
    "SftDemosConfig",
    "batch_width",
    "build_demos",
    "demo_splits",
    "generate_demos",
    "load_sft_batches",
    "make_demo_generator",
    "make_sft_batch",
]

log = logging.getLogger(__name__)

DEMO_SPLITS = ("train", "validation")


@dataclasses.dataclass
class DemoEpisode:
    """One demonstration episode.

    Attributes:
      tokens: int32[L] the whole episode in the rollout engine's layout.
      generated: bool[L] True on response tokens.
      turn_ids: int32[L] turn index of every position (see the module docstring).
      roles: int8[L] :class:`~actfocus_jax.rollout.Role` codes (set by :func:`generate_demos`).
      responses: the response texts, one per turn.
      observations: the observation texts (``env.render_text``) shown before each response.
      actions: the actions written in each turn's answer.
      turn_rewards: float32[T] reward of each turn.
      task_id: the task's id in the task set.
      env_key: uint32[2] the key given to ``env.reset`` (replays slippery FrozenLake exactly).
      episode_return: sum of the turn rewards.
      success: the task was solved.
      num_turns: turns played.
      num_actions: actions executed by the env.
      noisy: some written action was a random replacement of the planned one.
    """

    tokens: np.ndarray
    generated: np.ndarray
    turn_ids: np.ndarray
    roles: np.ndarray | None
    responses: list[str]
    observations: list[str]
    actions: list[list[int]]
    turn_rewards: np.ndarray
    task_id: int
    env_key: np.ndarray
    episode_return: float
    success: bool
    num_turns: int
    num_actions: int
    noisy: bool

    def to_example(self) -> dict[str, Any]:
        """The TFDS example (see :class:`SftDemos` for the features)."""
        if self.roles is None:
            raise ValueError("roles are not set; build episodes with generate_demos")
        return {
            "tokens": self.tokens.astype(np.int32),
            "generated": self.generated.astype(bool),
            "roles": self.roles.astype(np.int8),
            "turn_ids": self.turn_ids.astype(np.int32),
            "turn_rewards": self.turn_rewards.astype(np.float32),
            "task_id": np.int32(self.task_id),
            "env_key": self.env_key.astype(np.uint32),
            "episode_return": np.float32(self.episode_return),
            "success": bool(self.success),
            "num_turns": np.int32(self.num_turns),
            "num_actions": np.int32(self.num_actions),
            "noisy": bool(self.noisy),
        }


class EpisodeBuilder:
    """Accumulates one demonstration episode in the rollout engine's token layout (see the module
    docstring): :meth:`observation` adds ``[first_prefix obs first_suffix]`` at turn 0 and
    ``[turn_prefix obs turn_suffix]`` after, :meth:`response` a generated response, and
    :meth:`finish` returns the :class:`DemoEpisode` (``roles`` unset). Shared by the JAX envs'
    :class:`DemoGenerator` and WebShop's generator."""

    def __init__(self, template: TurnTemplate):
        self.template = template
        self.tokens: list[int] = []
        self.turn_ids: list[int] = []
        self.generated: list[bool] = []
        self.responses: list[str] = []
        self.observations: list[str] = []
        self.actions: list[Any] = []
        self.rewards: list[float] = []

    def _add(self, ids: Sequence[int], turn: int, gen: bool) -> None:
        self.tokens.extend(int(i) for i in ids)
        self.turn_ids.extend([turn] * len(ids))
        self.generated.extend([gen] * len(ids))

    def observation(self, obs_ids: Sequence[int], turn: int) -> None:
        tpl = self.template
        pre, suf = (
            (tpl.first_prefix, tpl.first_suffix)
            if turn == 0
            else (tpl.turn_prefix, tpl.turn_suffix)
        )
        self._add([*pre, *obs_ids, *suf], turn, False)

    def response(
        self, text: str, ids: Sequence[int], turn: int, *, seen: str, actions: Any, reward: float
    ) -> None:
        """The response of ``turn`` (``seen``: the observation text it answers)."""
        self._add(ids, turn, True)
        self.responses.append(text)
        self.observations.append(seen)
        self.actions.append(actions)
        self.rewards.append(float(reward))

    def finish(
        self, *, task_id: int, env_key: Any, success: bool, num_actions: int, noisy: bool
    ) -> DemoEpisode:
        turn_rewards = np.asarray(self.rewards, np.float32)
        return DemoEpisode(
            tokens=np.asarray(self.tokens, np.int32),
            generated=np.asarray(self.generated, bool),
            turn_ids=np.asarray(self.turn_ids, np.int32),
            roles=None,
            responses=self.responses,
            observations=self.observations,
            actions=self.actions,
            turn_rewards=turn_rewards,
            task_id=int(task_id),
            env_key=np.asarray(env_key, np.uint32),
            episode_return=float(turn_rewards.sum()),
            success=bool(success),
            num_turns=len(self.responses),
            num_actions=int(num_actions),
            noisy=bool(noisy),
        )


class DemoGenerator:
    """Plays demonstration episodes of one JAX env (compiled functions are reused across episodes).

    Args:
      env: a JAX environment with an expert in :mod:`actfocus_jax.data.reasoning`.
      epsilon: probability that a planned action is replaced by a different random one.
      template: the rollout token template; default ``make_turn_template(env.tokenizer,
        system_prompt_for(env, prompt), "plain")``.
      prompt: prompt style when ``template`` is None (``"full"`` or ``"compact"``).
      reasoning: reasoning style of the responses, ``"plan"`` or ``"state"`` (see
        :data:`actfocus_jax.data.reasoning.REASONING_STYLES`).
    """

    def __init__(
        self,
        env: Any,
        *,
        epsilon: float = 0.1,
        template: TurnTemplate | None = None,
        prompt: str = "full",
        reasoning: str = "plan",
    ):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.env = env
        self.epsilon = float(epsilon)
        self.tokenizer = env.tokenizer
        self.template = template or make_turn_template(
            env.tokenizer, system_prompt_for(env, prompt), "plain"
        )
        self.expert: Expert = make_expert(env, reasoning)
        self._reset = jax.jit(env.reset)

        def step(state, ids, length):
            parsed = env.parse_actions(ids, length)
            state, ts = env.step(state, parsed)
            return state, ts, parsed

        self._step = jax.jit(step)

    def _encode_response(self, text: str) -> tuple[list[int], np.ndarray]:
        ids = self.tokenizer.encode(text)
        size = max(128, 1 << max(0, len(ids) - 1).bit_length())  # few distinct shapes to compile
        padded = np.full((size,), self.tokenizer.pad_id, np.int32)
        padded[: len(ids)] = ids
        return ids, padded

    def _choose_actions(
        self, state: Any, rng: np.random.Generator, epsilon: float
    ) -> tuple[list[int], bool, bool]:
        """``(actions, planned, noisy)`` for one turn from the host ``state``."""
        env = self.env
        left = env.max_actions_per_episode - int(state.num_actions)
        k = max(1, min(env.max_actions_per_turn, left))
        plan = self.expert.plan(state)
        planned = bool(plan)
        intended: list[int | None] = list(plan[:k]) if planned else [None] * k
        actions: list[int] = []
        noisy = False
        for a in intended:
            if a is None or rng.random() < epsilon:
                r = self.expert.random_action(state, actions, a, rng)
                noisy |= a is not None and r != a
                a = r
            actions.append(int(a))
        return actions, planned, noisy

    def episode(
        self,
        task: Any,
        task_id: int,
        env_key: np.ndarray,
        rng: np.random.Generator,
        epsilon: float | None = None,
    ) -> DemoEpisode | None:
        """Plays one episode of the unbatched ``task``; None if the task is already done at reset.

        ``epsilon`` overrides the generator's noise probability for this episode.
        """
        env = self.env
        epsilon = self.epsilon if epsilon is None else float(epsilon)
        state, ts = self._reset(jnp.asarray(env_key), task)
        if bool(ts.done):
            return None
        ep = EpisodeBuilder(self.template)
        ep.observation(np.asarray(ts.obs_tokens)[: int(ts.obs_len)].tolist(), 0)
        noisy = False
        success = False
        for turn in range(env.max_turns):
            host = jax.device_get(state)
            actions, planned, turn_noisy = self._choose_actions(host, rng, epsilon)
            noisy |= turn_noisy
            text = format_response(
                self.expert.reasoning(host, actions, planned),
                self.expert.answer_texts(actions),
                self.tokenizer.tags,
            )
            ids, padded = self._encode_response(text)
            state, ts, parsed = self._step(state, jnp.asarray(padded), jnp.int32(len(ids)))
            got = np.asarray(parsed.actions)[: int(parsed.num)].tolist()
            if not bool(parsed.is_valid()) or got != actions:
                raise RuntimeError(
                    f"{env.name} demo response does not parse back to its actions {actions} "
                    f"(parsed {got}); words outside the vocabulary? {text!r}"
                )
            ep.response(
                text,
                ids,
                turn,
                seen=env.render_text(host),
                actions=actions,
                reward=float(ts.reward),
            )
            success = bool(ts.success)
            if bool(ts.done):
                break
            if turn + 1 < env.max_turns:
                ep.observation(np.asarray(ts.obs_tokens)[: int(ts.obs_len)].tolist(), turn + 1)
        return ep.finish(
            task_id=task_id,
            env_key=env_key,
            success=success,
            num_actions=int(jax.device_get(state).num_actions),
            noisy=noisy,
        )


def _roles(episodes: Sequence[DemoEpisode], template: TurnTemplate) -> None:
    """Sets ``roles`` of every episode with one batched :func:`compute_roles` call."""
    if not episodes:
        return
    width = max(len(e.tokens) for e in episodes)
    width = 1 << max(0, width - 1).bit_length()
    n = len(episodes)
    tokens = np.full((n, width), template.pad_id, np.int32)
    generated = np.zeros((n, width), bool)
    valid = np.zeros((n, width), bool)
    for i, e in enumerate(episodes):
        tokens[i, : len(e.tokens)] = e.tokens
        generated[i, : len(e.tokens)] = e.generated
        valid[i, : len(e.tokens)] = True
    fn = jax.jit(compute_roles, static_argnums=(3, 4))
    roles = np.asarray(
        fn(tokens, generated, valid, tuple(template.answer_open), tuple(template.answer_close))
    )
    for i, e in enumerate(episodes):
        e.roles = roles[i, : len(e.tokens)].astype(np.int8)


def _demo_rng(seed: int, task_id: int, rep: int) -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng([int(seed), int(task_id), int(rep)])
    key = rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
    return rng, key


def make_demo_generator(env: Any, **kwargs: Any) -> Any:
    """The demonstration generator of ``env``: :class:`DemoGenerator` for a JAX env,
    :class:`actfocus_jax.data.webshop_demos.WebShopDemoGenerator` for the host WebShop env (same
    keyword arguments and ``episode`` interface)."""
    if getattr(env, "is_host_env", False):
        from actfocus_jax.data.webshop_demos import WebShopDemoGenerator

        return WebShopDemoGenerator(env, **kwargs)
    return DemoGenerator(env, **kwargs)


def generate_demos(
    env: Any,
    tasks: Any,
    task_ids: Sequence[int],
    *,
    demos_per_task: int = 1,
    epsilon: float = 0.1,
    seed: int = 0,
    generator: DemoGenerator | None = None,
) -> list[DemoEpisode]:
    """Demonstrations of a batch of tasks (leading axis ``N``; for WebShop an array of goal
    indices), ``demos_per_task`` each.

    Each demo's randomness (noise and the reset key) comes from ``(seed, task_id, repetition)``, so a
    demo does not depend on which other tasks are in the batch. Tasks already done at reset are
    skipped. Pass a ``generator`` of ``env`` to reuse its compiled functions (``epsilon`` still
    applies).
    """
    gen = generator or make_demo_generator(env, epsilon=epsilon)
    out: list[DemoEpisode] = []
    for i, task_id in enumerate(task_ids):
        task = jax.tree.map(lambda x, i=i: np.asarray(x)[i], tasks)
        for rep in range(demos_per_task):
            rng, key = _demo_rng(seed, int(task_id), rep)
            ep = gen.episode(task, int(task_id), key, rng, epsilon)
            if ep is not None:
                out.append(ep)
    _roles(out, gen.template)
    return out


# ----------------------------------------------------------------------------------------------
# TFDS builder
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SftDemosConfig(tfds.core.BuilderConfig):
    """Settings of a demonstration dataset.

    Attributes:
      env: environment name for :func:`actfocus_jax.envs.make` (``"webshop"``: demos of the train
        goals of its goal set, :mod:`actfocus_jax.data.webshop_goals`, played by
        :class:`actfocus_jax.data.webshop_demos.WebShopDemoGenerator`; the ``task_*`` settings
        are then unused).
      env_options: the env's keyword options (frozen as a sorted tuple of items).
      num_tasks: train-split tasks demonstrated (drawn at random with ``seed``).
      demos_per_task: episodes per task.
      epsilon: noise probability per action.
      seed: seed of the task draw and of the demos' randomness.
      val_fraction: share of the drawn tasks whose demos go to the ``validation`` split.
      task_num_train / task_num_test / task_seed: the task set's settings (as in
        :func:`actfocus_jax.data.tasks.build_task_set`; use those of the RL runs).
      tokenizer: ``"embedded"`` (the only tokenizer supported by the builder).
      prompt: system prompt style, ``"full"`` or ``"compact"`` (see
        :func:`actfocus_jax.rollout.engine.system_prompt_for`; use the RL runs' style).
      reasoning: reasoning style, ``"plan"`` (narrate the state and the answer's actions) or
        ``"state"`` (the state only: the decision is made in the answer).
    """

    env: str = "sokoban"
    env_options: tuple[tuple[str, Any], ...] = ()
    num_tasks: int = 64
    demos_per_task: int = 1
    epsilon: float = 0.1
    seed: int = 0
    val_fraction: float = 0.1
    task_num_train: int = 512
    task_num_test: int = 128
    task_seed: int = 0
    tokenizer: str = "embedded"
    prompt: str = "full"
    reasoning: str = "plan"


def demo_splits(num_tasks: int, val_fraction: float) -> dict[str, int]:
    """Tasks per split: ``validation`` gets ``floor(val_fraction * num_tasks)`` (split omitted if 0)."""
    n_val = int(np.floor(val_fraction * num_tasks))
    out = {"train": num_tasks - n_val}
    if n_val > 0:
        out["validation"] = n_val
    return out


def _features() -> tfds.features.FeaturesDict:
    vec = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)
    return tfds.features.FeaturesDict(
        {
            "tokens": vec(np.int32),
            "generated": vec(np.bool_),
            "roles": vec(np.int8),
            "turn_ids": vec(np.int32),
            "turn_rewards": vec(np.float32),
            "task_id": tfds.features.Scalar(dtype=np.int32),
            "env_key": tfds.features.Tensor(shape=(2,), dtype=np.uint32),
            "episode_return": tfds.features.Scalar(dtype=np.float32),
            "success": tfds.features.Scalar(dtype=np.bool_),
            "num_turns": tfds.features.Scalar(dtype=np.int32),
            "num_actions": tfds.features.Scalar(dtype=np.int32),
            "noisy": tfds.features.Scalar(dtype=np.bool_),
        }
    )


class SftDemos(tfds.core.GeneratorBasedBuilder):
    """Solver demonstrations with reasoning text (see the module docstring); splits train/validation.

    Features: ``tokens`` int32[L], ``generated`` bool[L], ``roles`` int8[L], ``turn_ids`` int32[L],
    ``turn_rewards`` float32[T], ``task_id``, ``env_key`` uint32[2], ``episode_return``,
    ``success``, ``num_turns``, ``num_actions``, ``noisy``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Solver demonstrations with reasoning text, built by actfocus_jax."
    }
    BUILDER_CONFIGS: ClassVar[list[SftDemosConfig]] = [
        SftDemosConfig(name="sokoban", env="sokoban"),
        SftDemosConfig(name="frozenlake", env="frozenlake"),
        SftDemosConfig(name="sudoku", env="sudoku"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        from actfocus_jax.text.tokenizer import build_embedded_tokenizer

        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"{cfg.env} solver demonstrations (epsilon={cfg.epsilon}) on train-split tasks"
            ),
            features=_features(),
            metadata=tfds.core.MetadataDict(pad_id=int(build_embedded_tokenizer().pad_id)),
        )

    def task_set(self) -> Any:
        """The task-set builder the demos are drawn from (built in the same data_dir if needed)."""
        cfg = self.builder_config
        return build_task_set(
            self.data_dir_root,
            cfg.env,
            num_train=cfg.task_num_train,
            num_test=cfg.task_num_test,
            seed=cfg.task_seed,
            env_options=dict(cfg.env_options),
        )

    def _split_generators(self, dl_manager: Any) -> Mapping[str, Iterator]:
        from actfocus_jax.envs import make

        cfg = self.builder_config
        if cfg.tokenizer != "embedded":
            raise ValueError(f"SftDemos supports tokenizer='embedded' only, got {cfg.tokenizer!r}")
        if cfg.env == "webshop":  # a host env: the tasks are goal indices of its goal set
            from actfocus_jax.data.webshop_goals import (
                build_webshop_goals,
                goal_set_options,
                load_goal_indices,
                webshop_env_options,
            )

            opts = dict(cfg.env_options)
            goals = build_webshop_goals(self.data_dir_root, env_options=goal_set_options(opts))
            ids = load_goal_indices(goals, "train")
            tasks = ids
            env = make(cfg.env, **webshop_env_options(opts))
        else:
            tasks, ids, _ = load_tasks(self.task_set(), "train")
            env = make(cfg.env, **dict(cfg.env_options))
        if cfg.num_tasks > len(ids):
            raise TaskSetError(
                f"num_tasks={cfg.num_tasks} exceeds the task set's {len(ids)} train tasks; "
                "raise task_num_train"
            )
        order = np.random.default_rng(cfg.seed).permutation(len(ids))[: cfg.num_tasks]
        gen = make_demo_generator(
            env, epsilon=cfg.epsilon, prompt=cfg.prompt, reasoning=cfg.reasoning
        )
        sizes = demo_splits(cfg.num_tasks, cfg.val_fraction)
        out, start = {}, 0
        for split in DEMO_SPLITS:
            if split not in sizes:
                continue
            rows = order[start : start + sizes[split]]
            start += sizes[split]
            sub = jax.tree.map(lambda x, rows=rows: np.asarray(x)[rows], tasks)
            out[split] = self._generate_examples(gen, sub, ids[rows])
        return out

    def _generate_examples(self, gen: Any, tasks: Any, ids: np.ndarray) -> Iterator:
        cfg = self.builder_config
        demos = generate_demos(
            gen.env,
            tasks,
            ids.tolist(),
            demos_per_task=cfg.demos_per_task,
            epsilon=cfg.epsilon,
            seed=cfg.seed,
            generator=gen,
        )
        for k, demo in enumerate(demos):
            yield k, demo.to_example()


def build_demos(
    data_dir: str | os.PathLike,
    env: str,
    *,
    num_tasks: int,
    demos_per_task: int = 1,
    epsilon: float = 0.1,
    seed: int = 0,
    env_options: Mapping[str, Any] | None = None,
    val_fraction: float = 0.1,
    task_num_train: int = 512,
    task_num_test: int = 128,
    task_seed: int = 0,
    name: str | None = None,
    prompt: str = "full",
    reasoning: str = "plan",
) -> SftDemos:
    """Builds (once; later calls reuse the files) and returns the demonstration builder.

    The task set (``build_task_set(data_dir, env, num_train=task_num_train, num_test=task_num_test,
    seed=task_seed, env_options=env_options)``, the one the RL runs should use) is built first if
    needed; demos use its train split only. The dataset lives in ``data_dir/sft_demos/<name>/1.0.0``
    with ``name`` derived from the env and all settings unless given (``reasoning="plan"``, the
    original style, is left out of the name so that existing datasets keep theirs).
    """
    options = dict(env_options or {})
    settings = dict(
        num_tasks=int(num_tasks),
        demos_per_task=int(demos_per_task),
        epsilon=float(epsilon),
        seed=int(seed),
        val_fraction=float(val_fraction),
        task_num_train=int(task_num_train),
        task_num_test=int(task_num_test),
        task_seed=int(task_seed),
        prompt=str(prompt),
    )
    if name is None:
        named = dict(settings, **({"reasoning": reasoning} if reasoning != "plan" else {}))
        key = repr((env, sorted(options.items()), sorted(named.items()), "embedded"))
        name = f"{env}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    config = SftDemosConfig(
        name=name,
        env=env,
        env_options=tuple(sorted(options.items())),
        reasoning=str(reasoning),
        **settings,
    )
    builder = SftDemos(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    return prepare_once(
        builder,
        lambda: SftDemos(config=config, data_dir=os.fspath(data_dir), file_format="array_record"),
    )


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def batch_width(lengths: Sequence[int], max_len: int, pad_multiple: int = 0) -> int:
    """Columns of a batch of demos of ``lengths``: ``max_len`` when ``pad_multiple`` is 0, else the
    longest demo rounded up to a multiple of ``pad_multiple``, at most ``max_len`` (at least one
    multiple, so that an all-padding batch keeps a compiled shape)."""
    if pad_multiple < 0:
        raise ValueError(f"pad_multiple must be >= 0, got {pad_multiple}")
    if pad_multiple == 0:
        return int(max_len)
    longest = max((int(n) for n in lengths), default=0)
    return int(min(max_len, max(-(-longest // pad_multiple), 1) * pad_multiple))


def make_sft_batch(
    records: Sequence[Mapping[str, Any]],
    batch_size: int,
    max_len: int,
    pad_id: int,
    *,
    pad_multiple: int = 0,
) -> tuple[dict[str, np.ndarray], int]:
    """Pads ``records`` (at most ``batch_size``) into a batch; returns ``(batch, num_truncated)``.

    Batch (rows beyond ``len(records)`` are all padding): ``tokens`` int32[B, W] right-padded
    with ``pad_id``, ``valid`` bool, ``loss_mask`` bool (generated & valid), ``roles`` int8 (PAD on
    padding), ``turn_ids`` int32 (-1 on padding), ``task_id`` int32[B] (-1 for padding rows).
    ``W`` is :func:`batch_width`: ``max_len``, or with ``pad_multiple`` the longest record rounded
    up to a multiple of it (fewer padded columns to train on, a few distinct shapes to compile).
    Demos longer than ``max_len`` are cut to ``max_len`` and counted.
    """
    if len(records) > batch_size:
        raise ValueError(f"{len(records)} records for batch_size={batch_size}")
    from actfocus_jax.rollout.roles import Role

    max_len = batch_width([len(r["tokens"]) for r in records], max_len, pad_multiple)

    tokens = np.full((batch_size, max_len), pad_id, np.int32)
    valid = np.zeros((batch_size, max_len), bool)
    generated = np.zeros((batch_size, max_len), bool)
    roles = np.full((batch_size, max_len), int(Role.PAD), np.int8)
    turn_ids = np.full((batch_size, max_len), -1, np.int32)
    task_id = np.full((batch_size,), -1, np.int32)
    truncated = 0
    for i, rec in enumerate(records):
        n = len(rec["tokens"])
        if n > max_len:
            truncated += 1
            n = max_len
        tokens[i, :n] = rec["tokens"][:n]
        valid[i, :n] = True
        generated[i, :n] = np.asarray(rec["generated"][:n], bool)
        roles[i, :n] = rec["roles"][:n]
        turn_ids[i, :n] = rec["turn_ids"][:n]
        task_id[i] = rec["task_id"]
    batch = {
        "tokens": tokens,
        "valid": valid,
        "loss_mask": generated & valid,
        "roles": roles,
        "turn_ids": turn_ids,
        "task_id": task_id,
    }
    return batch, truncated


class SftBatches:
    """Padded SFT batches from a :class:`SftDemos` split with an explicit position ``(epoch, index)``.

    Each epoch visits every demo once in a permutation drawn from ``(seed, epoch)``; ``index`` counts
    the demos of the current epoch already served, so ``(epoch, index)`` (see :attr:`position`,
    :meth:`state_dict`, :meth:`load_state_dict`) restores the stream exactly. The last batch of an
    epoch is filled with padding rows (all ``valid`` False) unless ``drop_remainder``. Demos longer
    than ``max_len`` are truncated; :attr:`num_truncated` counts them (of :attr:`num_served`) and
    a warning is issued in each epoch that truncates one (not in every batch).

    Args:
      builder: a prepared :class:`SftDemos` builder.
      batch_size, max_len: batch shape ``[batch_size, max_len]``.
      seed: shuffle seed.
      split: ``"train"`` or ``"validation"``.
      epoch, index: start position.
      end_epoch: stop when this epoch is reached (exclusive; None: endless).
      shuffle: permute each epoch (False: dataset order).
      drop_remainder: drop an epoch's last partial batch.
      pad_id: padding id (default: the builder's metadata, i.e. the embedded tokenizer's).
      pad_multiple: 0 pads every batch to ``max_len``; else to its longest demo rounded up to a
        multiple of this (:func:`batch_width`).
    """

    def __init__(
        self,
        builder: SftDemos,
        batch_size: int,
        max_len: int,
        seed: int = 0,
        *,
        split: str = "train",
        epoch: int = 0,
        index: int = 0,
        end_epoch: int | None = None,
        shuffle: bool = True,
        drop_remainder: bool = False,
        pad_id: int | None = None,
        pad_multiple: int = 0,
    ):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        self.source = builder.as_data_source(split=split)
        self.size = len(self.source)
        if self.size == 0:
            raise ValueError(f"split {split!r} of {builder.builder_config.name} is empty")
        if drop_remainder and self.size < batch_size:
            raise ValueError(f"split {split!r} has {self.size} demos < batch_size={batch_size}")
        if pad_id is None:
            pad_id = int(builder.info.metadata.get("pad_id", 0)) if builder.info.metadata else 0
        self.batch_size, self.max_len, self.seed = int(batch_size), int(max_len), int(seed)
        self.end_epoch, self.shuffle, self.drop_remainder = end_epoch, shuffle, drop_remainder
        self.pad_id = int(pad_id)
        if pad_multiple < 0:
            raise ValueError(f"pad_multiple must be >= 0, got {pad_multiple}")
        self.pad_multiple = int(pad_multiple)
        self.epoch, self.index = int(epoch), int(index)
        self.num_truncated = 0
        self.num_served = 0  # real (not padding) demos served
        self._warned_epoch: int | None = None
        self._order_epoch: int | None = None
        self._order = np.arange(self.size)

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, index)`` of the next batch."""
        return self.epoch, self.index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, iterator has {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def order(self, epoch: int) -> np.ndarray:
        """The demo indices of ``epoch`` in serving order."""
        if self._order_epoch != epoch:
            self._order = (
                np.random.default_rng([self.seed, epoch]).permutation(self.size)
                if self.shuffle
                else np.arange(self.size)
            )
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> SftBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        end = self.size - (self.size % self.batch_size if self.drop_remainder else 0)
        if self.index >= end:
            self.epoch, self.index = self.epoch + 1, 0
        if self.end_epoch is not None and self.epoch >= self.end_epoch:
            raise StopIteration
        rows = self.order(self.epoch)[self.index : self.index + self.batch_size]
        batch, truncated = make_sft_batch(
            [self.source[int(i)] for i in rows],
            self.batch_size,
            self.max_len,
            self.pad_id,
            pad_multiple=self.pad_multiple,
        )
        self.index += len(rows)
        self.num_served += len(rows)
        if truncated:
            self.num_truncated += truncated
            if self._warned_epoch != self.epoch:
                self._warned_epoch = self.epoch
                msg = (
                    f"SFT demos longer than max_len={self.max_len} are truncated (epoch "
                    f"{self.epoch}: {self.num_truncated} of {self.num_served} demos served so "
                    "far); raise sft.max_len to keep them whole"
                )
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
        return batch


def load_sft_batches(
    builder: SftDemos,
    batch_size: int,
    max_len: int,
    seed: int = 0,
    *,
    epoch: int = 0,
    index: int = 0,
    num_epochs: int | None = None,
    split: str = "train",
    shuffle: bool = True,
    drop_remainder: bool = False,
    pad_multiple: int = 0,
) -> SftBatches:
    """Padded batches from position ``(epoch, index)`` (see :class:`SftBatches`).

    Endless by default (``next`` never stops: training loops count steps); ``num_epochs`` stops the
    iterator after that many epochs, e.g. ``num_epochs=1`` for one pass (validation).
    """
    return SftBatches(
        builder,
        batch_size,
        max_len,
        seed,
        split=split,
        epoch=epoch,
        index=index,
        end_epoch=None if num_epochs is None else epoch + int(num_epochs),
        shuffle=shuffle,
        drop_remainder=drop_remainder,
        pad_multiple=pad_multiple,
    )
