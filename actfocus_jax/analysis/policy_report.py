"""The Action Bottleneck of a policy, or of a run's RL checkpoints: rollouts -> report -> JSON.

The glue between the trainer (:class:`~actfocus_jax.train.trainer.Experiment`: task sets, policy
initialisation, the configured rollout path) and the statistic
(:func:`~actfocus_jax.analysis.bottleneck.bottleneck_report`):

1. the policy: ``config.model.init`` (``random`` / ``sft`` / ``hf:<dir>``), or every saved RL
   checkpoint of a run (:func:`checkpoint_policies`; step 0 is the run's initial policy), i.e. the
   statistic "along GRPO training";
2. :func:`collect_rollouts`: ``G`` sampled rollouts (the config's temperature) for each of a fixed,
   seeded subset of the train (or test) tasks, with the experiment's rollout path; every policy
   sees the same tasks and the same random keys;
3. :func:`analyze_buffer`: :func:`bottleneck_report` (all energies, sum and mean variants, per role
   and per turn, percentile-bootstrap CIs over groups, within-group permutation null and excess
   density), the token share of each role (:func:`token_share`, over all rollouts, not only the
   groups with reward variance) and the episode statistics the trainer logs;
4. :func:`bottleneck_analysis` does all of it and writes ``report.json`` (JSON-safe: NaN -> null),
   the tokenizer and, per policy, the rollout arrays (``rollouts_<label>.npz``) that the notebook
   ``notebooks/action_bottleneck.ipynb`` renders.

Rendering helpers for notebooks: :func:`actfocus_token_weights` (the ActFocus weights of saved
rollouts) and :func:`trajectory_html` (tokens coloured by weight).
"""

from __future__ import annotations

import copy
import functools
import html
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from actfocus_jax.analysis.advantage_balance import advantage_by_turn
from actfocus_jax.analysis.bottleneck import ROLE_NAMES, VARIANTS, bottleneck_report, buffer_field
from actfocus_jax.rl.actfocus import ENERGY_KINDS
from actfocus_jax.rollout.roles import Role

__all__ = [
    "REPORT_FILE",
    "actfocus_token_weights",
    "analyze_buffer",
    "bottleneck_analysis",
    "checkpoint_policies",
    "checkpoint_steps",
    "collect_rollouts",
    "default_out_dir",
    "format_gradient_report",
    "format_report",
    "format_training_table",
    "gradient_report",
    "json_safe",
    "load_analysis",
    "load_config_file",
    "load_rollouts",
    "overlay_config",
    "save_rollouts",
    "saved_run_config",
    "select_tasks",
    "token_share",
    "trajectory_html",
]

REPORT_FILE = "report.json"
_TMP_MARK = ".orbax-checkpoint-tmp"


# ------------------------------------------------------------------------------ small pure helpers
def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON: tuples -> lists, NumPy scalars / arrays -> Python, NaN / inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def select_tasks(split_size: int, num_tasks: int, seed: int) -> np.ndarray:
    """``num_tasks`` distinct task indices of a split of ``split_size`` (a seeded draw, sorted;
    the whole split, in order, when ``num_tasks >= split_size``)."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if num_tasks >= split_size:
        return np.arange(split_size)
    rng = np.random.default_rng([int(seed), 7])
    return np.sort(rng.choice(split_size, size=num_tasks, replace=False))


def token_share(roles: Any, turn_ids: Any = None, num_turns: int | None = None) -> dict[str, Any]:
    """Token share of each role among the generated tokens of a batch (all rows), and per turn.

    Returns ``{"reasoning", "action"}`` (shares, 0 without generated tokens), ``{role}_tokens``
    and ``prompt_tokens`` per episode, ``gen_tokens`` per episode, and ``per_turn``: a list of
    the same shares and ``gen_tokens`` per episode for each turn (with ``turn_ids``).
    """
    roles = np.asarray(roles)
    b = max(roles.shape[0], 1)

    def shares(mask):
        r = np.sum((roles == Role.REASONING) & mask)
        a = np.sum((roles == Role.ACTION) & mask)
        n = r + a
        return {
            "reasoning": float(r / n) if n else 0.0,
            "action": float(a / n) if n else 0.0,
            "reasoning_tokens": float(r / b),
            "action_tokens": float(a / b),
            "gen_tokens": float(n / b),
        }

    out = shares(np.ones(roles.shape, bool))
    out["prompt_tokens"] = float(np.sum(roles == Role.PROMPT) / b)
    out["per_turn"] = []
    if turn_ids is not None:
        turn_ids = np.asarray(turn_ids)
        t = int(num_turns) if num_turns is not None else int(turn_ids.max(initial=-1)) + 1
        out["per_turn"] = [{"turn": k, **shares(turn_ids == k)} for k in range(t)]
    return out


def load_config_file(spec: str, overrides: Mapping[str, Any] | None = None):
    """An experiment config from ``"path/to/config.py[:arg]"`` (as ``--config=`` takes it), with
    optional dotted overrides ``{"rollout.group_size": 4}``."""
    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("_actfocus_config_module", path)
    if mod_spec is None or mod_spec.loader is None:
        raise FileNotFoundError(f"cannot load the config file {path}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def overlay_config(config: Any, saved: Mapping[str, Any], *, skip: Sequence[str] = ("workdir",)):
    """A copy of ``config`` with every field that ``saved`` (a run's config as JSON) also has set
    to the saved value. Returns ``(config, changed)`` with ``changed`` the dotted names whose
    value differed; fields only in ``saved`` are ignored, ``skip`` fields are kept."""
    import ml_collections

    out = copy.deepcopy(config)
    changed: list[str] = []

    def walk(node, values, prefix):
        for key, value in values.items():
            name = f"{prefix}{key}"
            if name in skip or key not in node:
                continue
            current = node[key]
            if isinstance(current, ml_collections.ConfigDict):
                if isinstance(value, Mapping):
                    walk(current, value, name + ".")
                continue
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            if current != value:
                node[key] = value
                changed.append(name)

    walk(out, saved, "")
    return out, changed


def _label(init: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", init.removeprefix("hf:").rstrip("/")).strip("_") or "x"


def default_out_dir(workdir: str, *, rl_dir: str | None, init: str, split: str) -> str:
    """``<workdir>/bottleneck/<source>_<split>`` with ``source`` ``rl`` (checkpoint walk), ``sft``,
    ``random`` or ``hf_<dir name>``."""
    if rl_dir:
        source = "rl"
    elif init.startswith("hf:"):
        source = "hf_" + _label(os.path.basename(init[3:].rstrip("/")))
    else:
        source = init
    return os.path.join(workdir, "bottleneck", f"{source}_{split}")


# ------------------------------------------------------------------------------ policies
def checkpoint_steps(rl_dir: str) -> list[int]:
    """Finished checkpoint steps of an RL work directory (``<rl_dir>/checkpoints/<step>``),
    ascending, read from the directory listing (nothing is opened or modified)."""
    ckpt = os.path.join(rl_dir, "checkpoints")
    if not os.path.isdir(ckpt):
        return []
    return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())


def saved_run_config(rl_dir: str) -> dict | None:
    """The config saved with the newest checkpoint of ``rl_dir`` (``None`` without checkpoints)."""
    if not checkpoint_steps(rl_dir):
        return None
    with _open_checkpointer(rl_dir) as ckpt:
        return ckpt.read_config()


def _open_checkpointer(rl_dir: str):
    from actfocus_jax.train.checkpoint import Checkpointer

    ckpt_dir = os.path.join(rl_dir, "checkpoints")
    busy = [n for n in os.listdir(ckpt_dir) if _TMP_MARK in n]
    if busy:
        raise RuntimeError(
            f"{ckpt_dir} holds unfinished checkpoints ({busy}): the run may still be training, and "
            "opening its checkpoints would delete them. Analyse it once it has finished (or "
            "delete the leftovers of a crashed run)."
        )
    return Checkpointer(rl_dir, async_save=False, max_to_keep=None)


def _policy_params(exp) -> tuple[Any, Any]:
    from flax import nnx

    model = exp.init_policy()
    return nnx.split(model)


def checkpoint_policies(
    exp, rl_dir: str, steps: Sequence[int] | None = None, *, include_initial: bool = True
) -> Iterator[tuple[str, int, Any, Any]]:
    """``(label, step, graphdef, params)`` for the initial policy (step 0, ``config.model.init``)
    and each saved checkpoint step of ``rl_dir`` (or those in ``steps``), one at a time.

    The restore target is the run's train state built as the trainer builds it (policy, critic for
    PPO, reference copy for KL), from ``exp.config``: use the run's own config (see
    :func:`saved_run_config` and :func:`overlay_config`).
    """
    import jax
    from flax import nnx

    from actfocus_jax.models.transformer import value_model_from_policy
    from actfocus_jax.rl.train_step import init_train_state

    available = checkpoint_steps(rl_dir)
    wanted = available if steps is None else [s for s in steps if s != 0]
    missing = [s for s in wanted if s not in available]
    if missing:
        raise ValueError(f"no checkpoint at steps {missing} in {rl_dir} (available: {available})")
    policy = exp.init_policy()
    graphdef, params0 = nnx.split(policy)
    if include_initial and (steps is None or 0 in steps):
        # Committed to one device like the restored params, so that all steps share one compile.
        yield "step_0", 0, graphdef, jax.device_put(params0, jax.local_devices()[0])
    if not wanted:
        return
    critic = value_model_from_policy(policy) if exp.config.algo.algo == "ppo" else None
    statics = exp._statics(graphdef, nnx.split(critic)[0] if critic is not None else None)
    target = jax.eval_shape(lambda: init_train_state(policy, statics, critic))
    del params0
    with _open_checkpointer(rl_dir) as ckpt:
        for step in wanted:
            restored = ckpt.restore(step, target)
            yield f"step_{step}", step, graphdef, restored.train_state.params


# ------------------------------------------------------------------------------ rollouts + report
def collect_rollouts(
    exp,
    graphdef: Any,
    params: Any,
    task_indices: Sequence[int],
    *,
    split: str = "train",
    group_size: int,
    batch_tasks: int,
    seed: int = 0,
):
    """``group_size`` sampled rollouts of each task, ``batch_tasks`` tasks per rollout call (the
    last call padded with repeats of its last task, then trimmed), as one host
    :class:`~actfocus_jax.rollout.buffer.RolloutBuffer` of NumPy arrays laid out group after
    group (``group_id`` = position in ``task_indices``). Keys: ``fold_in(key(seed), start)``."""
    import jax

    idx_all = np.asarray(task_indices)
    bufs = []
    for start in range(0, len(idx_all), batch_tasks):
        idx = idx_all[start : start + batch_tasks]
        keep = len(idx)
        if keep < batch_tasks and not exp.is_host_env:
            idx = np.concatenate([idx, np.full(batch_tasks - keep, idx[-1])])  # fixed shapes
        tasks, ids = exp.tasks(split, idx)
        key = jax.random.fold_in(jax.random.key(seed), start)
        buf = exp.rollout(graphdef, params, tasks, ids, key, group_size=group_size)
        rows = keep * group_size
        bufs.append(jax.tree.map(lambda x, r=rows: np.asarray(x)[:r], buf))
    merged = jax.tree.map(lambda *x: np.concatenate(x), *bufs)
    group_id = np.repeat(np.arange(len(idx_all), dtype=np.int32), group_size)
    return merged.replace(group_id=group_id)


def analyze_buffer(
    buf: Any,
    group_size: int,
    *,
    num_turns: int | None = None,
    energies: Sequence[str] = ENERGY_KINDS,
    variants: Sequence[str] = VARIANTS,
    num_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    num_permutations: int = 100,
) -> dict[str, Any]:
    """``{"episodes", "token_share", "bottleneck", "advantage_by_turn"}`` of a rollout buffer (or a
    mapping of its arrays, e.g. :func:`load_rollouts`): the trainer's episode statistics,
    :func:`token_share`, :func:`~actfocus_jax.analysis.bottleneck.bottleneck_report` and
    :func:`~actfocus_jax.analysis.advantage_balance.advantage_by_turn` (JSON-safe)."""
    from actfocus_jax.train.trainer import episode_metrics

    get = functools.partial(buffer_field, buf)
    if num_turns is None:
        num_turns = int(np.shape(get("turn_rewards"))[1])
    episodes = episode_metrics(_AsBuffer(buf) if isinstance(buf, Mapping) else buf)
    report = bottleneck_report(
        buf,
        group_size,
        energies=energies,
        variants=variants,
        per_turn=True,
        num_turns=num_turns,
        num_resamples=num_resamples,
        alpha=alpha,
        seed=seed,
        num_permutations=num_permutations,
    )
    return json_safe(
        {
            "episodes": episodes,
            "token_share": token_share(get("roles"), get("turn_ids"), num_turns),
            "bottleneck": report,
            "advantage_by_turn": advantage_by_turn(buf, group_size, num_turns=num_turns),
        }
    )


#: :func:`gradient_report` refuses role gradients whose sum is further than this (relative) from the
#: full gradient.
LINEARITY_TOLERANCE = 1e-3


def gradient_report(
    graphdef: Any,
    params: Any,
    buf: Any,
    group_size: int,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
    temperature: float = 1.0,
    num_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """The gradient-based Action Bottleneck of a policy on its own rollouts (JSON-safe).

    Advantages are GRPO's (each episode's return normalised within its group of ``group_size``,
    broadcast to its generated tokens; ``normalize_std=False``: Dr. GRPO), the gradient the
    on-policy surrogate at ratio 1 (:mod:`actfocus_jax.analysis.gradients`). Reports, for the whole
    buffer as one batch (``"batch"``: the direction of a GRPO update on it) and over the groups
    with a non-zero gradient (``"groups"``: reward variance > 0; mean and percentile-bootstrap CI
    over groups), per role: ``||g_k||``, ``cos(g_k, g_full)``, the contribution ``<g_k, g_full> /
    ||g_full||^2`` (reasoning + action = 1) and ``||g_k|| / n_k``; and the per-token norm ratio
    action / reasoning (ratio of the group means, with its CI).
    """
    import jax.numpy as jnp

    from actfocus_jax.analysis.bottleneck import bootstrap_ci
    from actfocus_jax.analysis.gradients import grouped_role_gradient_stats
    from actfocus_jax.rl.advantages import broadcast_to_tokens, grpo_advantages

    get = functools.partial(buffer_field, buf)
    roles = np.asarray(get("roles"))
    valid = roles != Role.PAD
    gen = (roles == Role.REASONING) | (roles == Role.ACTION)
    width = int(np.max(np.nonzero(valid.any(0))[0], initial=0)) + 1  # drop all-pad columns
    adv_ep = grpo_advantages(
        jnp.asarray(get("episode_return"), jnp.float32),
        group_size,
        normalize_std=normalize_std,
        eps=eps,
    )
    adv = np.asarray(broadcast_to_tokens(adv_ep, jnp.asarray(gen)))
    per_group, batch = grouped_role_gradient_stats(
        graphdef,
        params,
        np.asarray(get("tokens"))[:, :width],
        valid[:, :width],
        roles[:, :width],
        adv[:, :width],
        group_size=group_size,
        temperature=temperature,
    )
    pg = {k: np.asarray(v, np.float64) for k, v in per_group.items()}
    worst_group = float(pg["linearity_error"].max(initial=0.0))
    worst = max(worst_group, float(batch.linearity_error))
    if not worst < LINEARITY_TOLERANCE:
        raise FloatingPointError(
            f"the role gradients do not add up to the full gradient (relative error {worst:.2e}, "
            f"tolerance {LINEARITY_TOLERANCE:g}): the numbers would be wrong. The surrogate is "
            "linear in the role masks, so this is a numerical or compiler fault (e.g. run the "
            "float32 analysis on a float32 model, or try XLA_FLAGS="
            "--xla_cpu_experimental_ynn_fusion_type= on a CPU)"
        )
    live = pg["full_norm"] > 0
    fields = ("norm", "cosine", "contribution", "norm_per_token")

    def ci(x):
        lo, hi = bootstrap_ci(x, num_resamples=num_resamples, alpha=alpha, seed=seed)
        return [lo, hi]

    groups: dict[str, Any] = {"n_groups": int(live.sum()), "n_groups_total": int(live.size)}
    for j, role in enumerate(ROLE_NAMES):
        groups[role] = {}
        for f in fields:
            col = pg[f][live, j]
            groups[role][f] = float(col.mean()) if col.size else float("nan")
            groups[role][f + "_ci"] = ci(col)
    npt = pg["norm_per_token"][live]  # [n, 2]

    def ratio(s):  # [R, n, 2] -> [R]: mean action / mean reasoning per-token norm
        m = s.mean(axis=1)
        return m[..., 1] / np.where(m[..., 0] > 0, m[..., 0], np.nan)

    groups["norm_per_token_ratio"] = float(ratio(npt[None])[0]) if len(npt) else float("nan")
    lo, hi = bootstrap_ci(npt, statistic=ratio, num_resamples=num_resamples, alpha=alpha, seed=seed)
    groups["norm_per_token_ratio_ci"] = [lo, hi]
    diff = pg["contribution"][live, 1] - pg["contribution"][live, 0]
    groups["contribution_action_minus_reasoning"] = float(diff.mean()) if diff.size else None
    groups["contribution_action_minus_reasoning_ci"] = ci(diff)
    bt = {k: np.asarray(v, np.float64) for k, v in batch.items()}
    whole: dict[str, Any] = {
        "full_norm": float(bt["full_norm"]),
        "linearity_error": float(bt["linearity_error"]),
    }
    for j, role in enumerate(ROLE_NAMES):
        whole[role] = {f: float(bt[f][j]) for f in (*fields, "num_tokens")}
    return json_safe(
        {
            "advantages": "grpo" if normalize_std else "dr_grpo",
            "group_size": group_size,
            "batch": whole,
            "groups": groups,
            "max_group_linearity_error": worst_group,
        }
    )


def format_gradient_report(g: Mapping[str, Any]) -> str:
    """Two lines per scope (batch, group mean) of :func:`gradient_report`."""
    b, gr = g["batch"], g["groups"]
    lines = [
        f"  gradient ({g['advantages']} advantages): role  contribution  cos(g_k, g)  "
        "||g_k||/n_k (batch | group mean [CI])"
    ]
    for role in ROLE_NAMES:
        r, q = b[role], gr[role]
        lines.append(
            f"    {role:<9} {_num(r['contribution'])} | {_num(q['contribution'])} "
            f"{_ci(q['contribution_ci'])}   {_num(r['cosine'])} | {_num(q['cosine'])} "
            f"{_ci(q['cosine_ci'])}   {_num(r['norm_per_token'], '.3e')} | "
            f"{_num(q['norm_per_token'], '.3e')}"
        )
    lines.append(
        f"    per-token norm ratio action / reasoning (groups): "
        f"{_num(gr['norm_per_token_ratio'], '.2f')} {_ci(gr['norm_per_token_ratio_ci'])}; "
        f"{gr['n_groups']}/{gr['n_groups_total']} groups with a gradient"
    )
    return "\n".join(lines)


class _AsBuffer:
    """Attribute access to a mapping of rollout arrays (for :func:`episode_metrics`)."""

    def __init__(self, arrays: Mapping[str, Any]):
        self._arrays = arrays

    def __getattr__(self, name: str) -> Any:
        try:
            return self._arrays[name]
        except KeyError as e:
            raise AttributeError(name) from e


def save_rollouts(path: str, buf: Any) -> str:
    """The buffer's arrays as a compressed ``.npz`` (loaded back by :func:`load_rollouts`)."""
    import dataclasses

    arrays = {f.name: np.asarray(getattr(buf, f.name)) for f in dataclasses.fields(buf)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_rollouts(path: str) -> dict[str, np.ndarray]:
    """The arrays saved by :func:`save_rollouts` (a dict that the analysis functions accept)."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def bottleneck_analysis(
    config: Any = None,
    *,
    experiment: Any = None,
    workdir: str | None = None,
    rl_dir: str | None = None,
    steps: Sequence[int] | None = None,
    use_run_config: bool = True,
    split: str = "train",
    num_tasks: int = 32,
    group_size: int | None = None,
    batch_tasks: int | None = None,
    seed: int = 0,
    energies: Sequence[str] = ENERGY_KINDS,
    variants: Sequence[str] = VARIANTS,
    num_resamples: int = 2000,
    alpha: float = 0.05,
    num_permutations: int = 100,
    out_dir: str | None = None,
    save_rollout_arrays: bool = True,
    gradients: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Rollouts and the bottleneck report of one policy (``config.model.init``) or of every
    checkpoint of ``rl_dir``; writes ``<out_dir>/report.json`` (+ rollouts and the tokenizer).

    Args:
      config: the experiment config (with ``rl_dir`` and ``use_run_config`` the run's saved config
        is laid over it, except ``workdir``; the fields that changed are listed in the output).
      experiment: an :class:`~actfocus_jax.train.trainer.Experiment` to use instead of building one
        from ``config`` (e.g. the one that just trained: its compiled rollout is reused); its
        config is used as it is.
      workdir: the experiment's work directory (default: the parent of ``rl_dir``, else
        ``config.workdir``); ``model.init=sft`` reads ``<workdir>/sft``.
      rl_dir: an RL work directory (``<run>/rl``) whose checkpoints to walk; step 0 is the run's
        initial policy.
      steps: checkpoint steps to analyse (default all; 0 = the initial policy).
      split: task split (``"train"`` or ``"test"``).
      num_tasks: tasks (groups) per policy, a seeded subset of the split (:func:`select_tasks`).
      group_size: rollouts per task (default ``config.rollout.group_size``).
      batch_tasks: tasks per rollout call (default ``config.rollout.num_tasks``).
      seed: task subset, rollout keys, bootstrap and permutation seed.
      energies, variants, num_resamples, alpha, num_permutations: of :func:`bottleneck_report`.
      out_dir: output directory (default :func:`default_out_dir`).
      save_rollout_arrays: write ``rollouts_<label>.npz`` per policy.
      gradients: also the gradient-based variant (:func:`gradient_report`, GRPO advantages with
        the config's ``algo.normalize_std`` / ``algo.adv_eps``, the rollout temperature) under
        ``"gradients"``.

    Returns:
      ``{"meta": {...}, "results": [{"label", "step", "episodes", "token_share", "bottleneck",
      "rollouts", "seconds"}, ...]}`` (what ``report.json`` holds).
    """
    from actfocus_jax.train.config import algo_config_from
    from actfocus_jax.train.trainer import Experiment

    if (config is None) == (experiment is None):
        raise ValueError("pass either config or experiment")
    changed: list[str] = []
    if rl_dir:
        rl_dir = os.path.abspath(rl_dir)
        if not checkpoint_steps(rl_dir):
            raise FileNotFoundError(
                f"no RL checkpoints in {rl_dir}/checkpoints; pass the `rl` directory of a run "
                "(experiments.train writes <workdir>/rl)"
            )
        if use_run_config and experiment is None:
            config, changed = overlay_config(config, saved_run_config(rl_dir))
            if verbose and changed:
                print(f"[bottleneck] from the run's saved config: {', '.join(changed)}")
        workdir = workdir or os.path.dirname(rl_dir)
    exp = experiment if experiment is not None else Experiment(config, workdir)
    c = exp.config
    g = int(group_size or c.rollout.group_size)
    if g < 2:
        raise ValueError(f"group_size must be >= 2 for a correlation, got {g}")
    bt = int(batch_tasks or c.rollout.num_tasks)
    tasks = select_tasks(exp.split_size(split), num_tasks, seed)
    out_dir = out_dir or default_out_dir(
        exp.workdir, rl_dir=rl_dir, init=str(c.model.init), split=split
    )
    os.makedirs(out_dir, exist_ok=True)
    tok_dir = os.path.join(out_dir, "tokenizer")
    exp.tokenizer.save(tok_dir)
    meta = {
        "workdir": exp.workdir,
        "rl_dir": rl_dir,
        "model_init": str(c.model.init),
        "env": c.env.name,
        "split": split,
        "num_tasks": len(tasks),
        "task_indices": tasks.tolist(),
        "group_size": g,
        "seed": seed,
        "energies": list(energies),
        "variants": list(variants),
        "num_resamples": num_resamples,
        "alpha": alpha,
        "num_permutations": num_permutations,
        "tokenizer": tok_dir,
        "config_from_run": changed,
        "config": json.loads(c.to_json_best_effort()),
    }
    if rl_dir:
        policies: Iterable = checkpoint_policies(exp, rl_dir, steps)
    else:
        label = _label(str(c.model.init))
        policies = [(label, None, *_policy_params(exp))]
    results = []
    for label, step, graphdef, params in policies:
        t0 = time.perf_counter()
        buf = collect_rollouts(
            exp, graphdef, params, tasks, split=split, group_size=g, batch_tasks=bt, seed=seed
        )
        entry = {"label": label, "step": step}
        entry.update(
            analyze_buffer(
                buf,
                g,
                energies=energies,
                variants=variants,
                num_resamples=num_resamples,
                alpha=alpha,
                seed=seed,
                num_permutations=num_permutations,
            )
        )
        if gradients:
            a = algo_config_from(c)
            entry["gradients"] = gradient_report(
                graphdef,
                params,
                buf,
                g,
                normalize_std=a.normalize_std,
                eps=a.adv_eps,
                temperature=a.temperature,
                num_resamples=num_resamples,
                alpha=alpha,
                seed=seed,
            )
        entry["rollouts"] = None
        if save_rollout_arrays:
            entry["rollouts"] = save_rollouts(os.path.join(out_dir, f"rollouts_{label}.npz"), buf)
        entry["seconds"] = time.perf_counter() - t0
        results.append(entry)
        if verbose:
            print(format_report(entry, meta), flush=True)
    out = json_safe({"meta": meta, "results": results})
    path = os.path.join(out_dir, REPORT_FILE)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, allow_nan=False)
    if verbose:
        if len(results) > 1:
            print(format_training_table(out))
        print(f"[bottleneck] wrote {path}")
    return out


def load_analysis(out_dir: str) -> dict[str, Any]:
    """``report.json`` of :func:`bottleneck_analysis`."""
    with open(os.path.join(out_dir, REPORT_FILE)) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ text tables
def _num(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _ci(pair: Any) -> str:
    if not pair or pair[0] is None:
        return "[-]"
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def format_report(entry: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> str:
    """A compact text table of one policy's result: per energy x variant x role the mean |rho| with
    its CI, the null, the token share, the density with its CI and the excess density; then the
    per-turn statistic of the first energy / variant."""
    b = entry["bottleneck"]
    ep, share = entry["episodes"], entry["token_share"]
    lines = []
    head = f"[bottleneck] policy {entry['label']}"
    if meta:
        head += (
            f" ({meta['split']} split, {meta['num_tasks']} tasks x {meta['group_size']} rollouts)"
        )
    lines.append(head)
    lines.append(
        f"  success {ep['success']:.3f}  return {ep['return']:.3f}  generated tokens/episode "
        f"{share['gen_tokens']:.1f}  token share: reasoning {share['reasoning']:.3f}, "
        f"action {share['action']:.3f}"
    )
    header = (
        "energy",
        "variant",
        "role",
        "n_grp",
        "mean|rho| [CI]",
        "null",
        "share",
        "density [CI]",
        "excess",
    )
    rows = [header]
    first = None
    for energy in [k for k in b if isinstance(b[k], Mapping) and k not in ("skipped",)]:
        for variant, e in b[energy].items():
            first = first or (energy, variant, e)
            for role in ROLE_NAMES:
                r = e[role]
                rows.append(
                    (
                        energy,
                        variant,
                        role,
                        f"{e['n_groups']}/{e['n_groups_total']}",
                        f"{_num(r['mean_abs_rho'])} {_ci(r['mean_abs_rho_ci'])}",
                        _num(r["null_mean_abs_rho"]),
                        _num(r["share"]),
                        f"{_num(r['density'], '.2f')} {_ci(r['density_ci'])}",
                        _num(r["excess_density"], ".2f"),
                    )
                )
    widths = [max(len(str(r[j])) for r in rows) for j in range(len(header))]
    for i, r in enumerate(rows):
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    if first and first[2]["per_turn"]:
        energy, variant, e = first
        lines.append(f"  per turn ({energy}, {variant}): turn n_grp |rho| R/A  density R/A")
        for t in e["per_turn"]:
            lines.append(
                f"    {t['turn']:>3} {t['n_groups']:>4}  {_num(t['reasoning']['mean_abs_rho'])}/"
                f"{_num(t['action']['mean_abs_rho'])}  {_num(t['reasoning']['density'], '.2f')}/"
                f"{_num(t['action']['density'], '.2f')}"
            )
    if entry.get("gradients"):
        lines.append(format_gradient_report(entry["gradients"]))
    return "\n".join(lines)


def format_training_table(
    analysis: Mapping[str, Any], energy: str = "neg_logprob", variant: str = "sum"
) -> str:
    """One line per policy (e.g. per RL checkpoint): success, eligible groups, mean |rho| and
    density per role and the action/reasoning density ratio for one energy and variant."""
    header = "step/label      success  n_grp  |rho| R  |rho| A  dens R  dens A  ratio  share A"
    lines = [f"[bottleneck] along training ({energy}, {variant})", header, "-" * len(header)]
    for r in analysis["results"]:
        e = r["bottleneck"].get(energy, {}).get(variant)
        if e is None:
            continue
        lines.append(
            f"{r['label']:<15} {r['episodes']['success']:7.3f}  {e['n_groups']:>5}  "
            f"{_num(e['reasoning']['mean_abs_rho']):>7}  {_num(e['action']['mean_abs_rho']):>7}  "
            f"{_num(e['reasoning']['density'], '.2f'):>6}  {_num(e['action']['density'], '.2f'):>6}  "
            f"{_num(e['density_ratio'], '.2f'):>5}  {r['token_share']['action']:7.3f}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ rendering
def actfocus_token_weights(arrays: Mapping[str, Any], actfocus: Any, *, force_enabled: bool = True):
    """ActFocus weights ``[B, L]`` (NumPy) of saved rollouts under an ActFocus config.

    ``actfocus`` is an :class:`~actfocus_jax.rl.actfocus.ActFocusConfig` or the ``actfocus``
    section of an experiment config (a mapping, e.g. from ``report.json``'s ``meta.config``). With
    ``force_enabled`` the weights are ActFocus's even for a run trained without it.
    """
    import dataclasses

    from actfocus_jax.rl.actfocus import ActFocusConfig, actfocus_weights

    if isinstance(actfocus, Mapping):
        fields = {f.name for f in dataclasses.fields(ActFocusConfig)}
        actfocus = ActFocusConfig(**{k: v for k, v in actfocus.items() if k in fields})
    if force_enabled:
        actfocus = dataclasses.replace(actfocus, enabled=True)
    w, _ = actfocus_weights(
        actfocus,
        np.asarray(arrays["roles"]),
        np.asarray(arrays["turn_ids"]),
        logp=np.asarray(arrays["old_logp"]),
        entropy=np.asarray(arrays["entropy"]),
        logit=np.asarray(arrays["logit"]),
    )
    return np.asarray(w)


def _colour(w: float, vmax: float) -> str:
    """White (weight 0) -> yellow (1) -> red (``vmax``), as an ``rgb()`` background."""
    x = min(max(w / vmax, 0.0), 1.0) if vmax > 0 else 0.0
    one = min(1.0 / vmax, 1.0) if vmax > 0 else 1.0
    if x <= one:
        f = x / one if one > 0 else 1.0
        r, g, b = 255, 255, round(255 * (1 - f) + 120 * f)
    else:
        f = (x - one) / (1 - one) if one < 1 else 1.0
        r, g, b = 255, round(255 * (1 - f) + 70 * f), round(120 * (1 - f) + 40 * f)
    return f"rgb({r},{g},{b})"


def trajectory_html(
    token_texts: Sequence[str],
    roles: Sequence[int],
    weights: Sequence[float],
    energies: Sequence[float] | None = None,
    turn_ids: Sequence[int] | None = None,
    *,
    vmax: float | None = None,
    title: str | None = None,
    legend: bool = True,
) -> str:
    """One trajectory as HTML: prompt / observation tokens in grey, generated tokens on a
    background coloured by ActFocus weight (white 0, yellow 1, red ``vmax``), action tokens bold
    and underlined; hovering a token shows its role, weight and energy. PAD is dropped and each
    turn starts on a new line; ``legend`` adds a line with the colour scale."""
    roles = [int(r) for r in roles]
    weights = [float(w) for w in weights]
    if vmax is None:
        gen_w = [w for w, r in zip(weights, roles) if r in (Role.REASONING, Role.ACTION)]
        vmax = max([1.0, *gen_w])
    parts = ['<div style="font-family: monospace; font-size: 12px; line-height: 1.9;">']
    if title:
        parts.append(f"<div><b>{html.escape(title)}</b></div>")
    if legend:
        swatch = '<span style="background:{}; padding:1px 6px; border:1px solid #ddd;">{}</span>'
        scale = " ".join(swatch.format(_colour(w, vmax), f"{w:g}") for w in (0.0, 1.0, vmax))
        parts.append(
            f'<div style="color:#666;">ActFocus weight: {scale}; <span style="color:#888;">'
            "prompt / observation</span>, <b><u>action</u></b>, reasoning</div>"
        )
    prev_turn = None
    for i, (text, role, w) in enumerate(zip(token_texts, roles, weights)):
        if role == Role.PAD:
            continue
        turn = None if turn_ids is None else int(turn_ids[i])
        if turn is not None and prev_turn is not None and turn != prev_turn:
            parts.append("<br/>")
        prev_turn = turn
        name = Role(role).name.lower()
        tip = f"{name}, turn {turn}" if turn is not None else name
        if role in (Role.REASONING, Role.ACTION):
            tip += f", weight {w:.3f}"
            if energies is not None:
                tip += f", energy {float(energies[i]):.3f}"
            style = f"background:{_colour(w, vmax)}; padding:1px 2px; border-radius:2px;"
            if role == Role.ACTION:
                style += " font-weight:bold; text-decoration:underline;"
        else:
            style = "color:#888;"
        parts.append(
            f'<span class="{name}" title="{html.escape(tip)}" style="{style}">'
            f"{html.escape(text)}</span> "
        )
    parts.append("</div>")
    return "".join(parts)
