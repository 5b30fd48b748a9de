"""Results of runs and sweeps: held-out success per variant, mean and t-interval over seeds.

Pure functions over the files the trainer writes (no JAX, no SciPy). A run directory made by
``experiments/train.py`` (or one run of ``experiments/sweep.py``) holds::

    <run>/rl/metrics.jsonl   one record per RL step; periodic held-out evaluations (greedy) as
                             ``eval/<metric>`` (``eval/greedy/<m>`` / ``eval/sampled/<m>`` also read)
    <run>/rl/summary.json    written at the end of the run: ``{"final": {"final/greedy/<m>": ...,
                             "final/sampled/<m>": ...}, "steps": N, "workdir": ...}``
    <run>/main_result.json   (``experiments/main.py`` only) ``"warm_start"``: the SFT policy's
                             evaluation, used as step 0

and a sweep directory holds one such run per subdirectory, named after its overrides
(``actfocus.alpha=0.1,algo.algo=ppo,seed=2``). The *variant* of a run is its name without the
``seed=`` part; runs of a variant are its seeds.

Every held-out evaluation of a run becomes an *evaluation point* ``{step: {"greedy/success": ...,
"sampled/success": ...}}``. Per run and metric, ``final`` is the value at the last step where the
metric was evaluated and ``best`` the maximum over the steps (an optimistic, per-seed choice of the
step). Per variant, :func:`aggregate` reports for each the mean over seeds, the sample standard
deviation and the Student-t interval ``mean +- t_{(1+c)/2, n-1} * sd / sqrt(n)`` with ``n`` the
number of seeds (:func:`mean_ci`; undefined, ``None``, for ``n < 2``), and ``best_common_step``:
the step, among those evaluated in every seed, where the mean over seeds is largest (less
optimistic than the per-seed best).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from actfocus_jax.train.logging import read_metrics

__all__ = [
    "DEFAULT_METRICS",
    "MAX_PERMUTATION_SPLITS",
    "aggregate",
    "aggregate_sweep",
    "band_mean",
    "curvature_weights",
    "earlier_gains",
    "eval_points",
    "gain_by_seed_markdown",
    "held_out_gain_markdown",
    "held_out_gains",
    "markdown_table",
    "mean_ci",
    "merge_gains",
    "merge_step_bands",
    "metric_curve",
    "mode_gains",
    "paired_gain",
    "paired_task_gain",
    "parse_bands",
    "parse_comparison",
    "parse_interaction",
    "parse_run_name",
    "parse_trend",
    "permutation_p_value",
    "read_run",
    "read_sweep",
    "reference_gains",
    "run_outcomes",
    "seed_curves",
    "step_bands",
    "step_bands_markdown",
    "t_cdf",
    "t_quantile",
    "text_table",
    "trend_weights",
    "variant_differences",
    "variant_differences_markdown",
    "variant_interactions",
    "variant_interactions_markdown",
    "variant_trends",
    "variant_trends_markdown",
    "welch_contrast",
    "welch_difference",
    "write_aggregate",
]

#: Held-out metrics tabulated by default (those the trainer records; absent ones are skipped).
DEFAULT_METRICS = ("greedy/success", "sampled/success", "greedy/return", "sampled/return")


# ------------------------------------------------------------------------------ Student t
def t_cdf(t: float, df: int) -> float:
    """CDF of Student's t with an integer number of degrees of freedom ``df >= 1``.

    Exact finite series (Abramowitz & Stegun 26.7.3-4) for ``A(t) = P(|T| <= |t|)`` with
    ``theta = atan(|t| / sqrt(df))``: for odd ``df``
    ``A = 2/pi * (theta + sin cos * (1 + 2/3 cos^2 + (2*4)/(3*5) cos^4 + ...))`` (no sum for
    ``df = 1``), for even ``df`` ``A = sin * (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...)``, each sum
    with ``(df - 1) // 2`` terms; ``F(t) = (1 + sign(t) A) / 2``.
    """
    if int(df) != df or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df}")
    df = int(df)
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    term, total = 1.0, 1.0
    if df % 2:
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2.0 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    a = min(max(a, 0.0), 1.0)
    return 0.5 * (1.0 + a) if t >= 0 else 0.5 * (1.0 - a)


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t (integer ``df >= 1``), by bisection on :func:`t_cdf` to ~1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and Student-t confidence interval over independent values (e.g. one per seed).

    Returns ``{"mean", "std", "n", "lo", "hi", "half_width", "confidence"}`` with ``std`` the
    sample standard deviation (ddof 1) and ``half_width = t_{(1+c)/2, n-1} * std / sqrt(n)``.
    ``std`` / ``lo`` / ``hi`` / ``half_width`` are ``None`` for ``n < 2`` and ``mean`` is ``None``
    for ``n = 0``. Non-finite and ``None`` values are dropped (``n`` counts the rest).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    out: dict[str, Any] = {
        "mean": None,
        "std": None,
        "n": n,
        "lo": None,
        "hi": None,
        "half_width": None,
        "confidence": confidence,
    }
    if n == 0:
        return out
    m = math.fsum(xs) / n
    out["mean"] = m
    if n >= 2:
        sd = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))
        h = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
        out.update(std=sd, lo=m - h, hi=m + h, half_width=h)
    return out


# ------------------------------------------------------------------------------ reading runs
def parse_run_name(name: str) -> tuple[str, str | None]:
    """``"a=1,b=x,seed=2"`` -> ``("a=1,b=x", "2")``: the variant (overrides without the seed, in
    their order) and the seed (``None`` if the name has no ``seed=`` part). A name without
    overrides is its own variant."""
    parts = [p for p in name.split(",") if p]
    seed = None
    rest = []
    for p in parts:
        key, sep, value = p.partition("=")
        if sep and key == "seed":
            seed = value
        else:
            rest.append(p)
    return ",".join(rest) if rest else ("(base)" if seed is not None else name), seed


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _eval_key(key: str, prefix: str) -> str | None:
    """``eval/success`` -> ``greedy/success``; ``eval/sampled/x`` -> ``sampled/x`` (else None)."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    if rest.startswith(("greedy/", "sampled/")):
        return rest
    return "greedy/" + rest


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def eval_points(
    records: Sequence[Mapping],
    summary: Mapping | None = None,
    warm_start: Mapping | None = None,
) -> dict[int, dict[str, float]]:
    """Held-out evaluations of one run as ``{step: {"greedy/success": v, ...}}`` (steps ascending).

    Args:
      records: ``metrics.jsonl`` records; ``eval/<m>`` keys are the trainer's periodic greedy
        evaluations (``eval/greedy/<m>`` and ``eval/sampled/<m>`` are read as such).
      summary: ``rl/summary.json``; its ``final`` (``final/greedy/<m>``, ``final/sampled/<m>``) is
        the evaluation at step ``summary["steps"]`` (it wins over a periodic one at that step).
      warm_start: the evaluation of the initial policy (``greedy/<m>``, ...), as step 0.
    """
    points: dict[int, dict[str, float]] = {}
    if warm_start:
        points[0] = {k: float(v) for k, v in warm_start.items() if _is_number(v)}
    for r in records:
        if "step" not in r:
            continue
        vals = {}
        for k, v in r.items():
            name = _eval_key(k, "eval/")
            if name is not None and _is_number(v):
                vals[name] = float(v)
        if vals:
            points.setdefault(int(r["step"]), {}).update(vals)
    if summary and isinstance(summary.get("final"), Mapping) and "steps" in summary:
        vals = {}
        for k, v in summary["final"].items():
            name = _eval_key(k, "final/")
            if name is not None and _is_number(v):
                vals[name] = float(v)
        if vals:
            points.setdefault(int(summary["steps"]), {}).update(vals)
    return dict(sorted(points.items()))


def read_run(run_dir: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """One run directory as a plain dict.

    Returns ``{"name", "variant", "seed", "dir", "complete" (rl/summary.json exists), "steps"
    (last logged step), "evals" (:func:`eval_points`), "records" (metrics.jsonl), "per_task"
    (the final policy's per-task held-out success rates, ``rl/final_per_task.json``, or None)}``.
    """
    run_dir = os.fspath(run_dir)
    name = name or os.path.basename(os.path.normpath(run_dir))
    rl = os.path.join(run_dir, "rl")
    records = read_metrics(rl)
    summary = _read_json(os.path.join(rl, "summary.json"))
    main = _read_json(os.path.join(run_dir, "main_result.json")) or {}
    variant, seed = parse_run_name(name)
    steps = [int(r["step"]) for r in records if "step" in r]
    return {
        "name": name,
        "variant": variant,
        "seed": seed,
        "dir": run_dir,
        "complete": summary is not None,
        "steps": max(steps) if steps else (summary or {}).get("steps"),
        "evals": eval_points(records, summary, main.get("warm_start")),
        "records": records,
        "per_task": _read_json(os.path.join(rl, "final_per_task.json")),
    }


def read_sweep(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run of a sweep directory (subdirectories with ``rl/metrics.jsonl`` or
    ``rl/summary.json``), sorted by name, as :func:`read_run` dicts."""
    sweep_dir = os.fspath(sweep_dir)
    if not os.path.isdir(sweep_dir):
        raise FileNotFoundError(f"no sweep directory {sweep_dir}")
    runs = []
    for name in sorted(os.listdir(sweep_dir)):
        rl = os.path.join(sweep_dir, name, "rl")
        if os.path.isfile(os.path.join(rl, "metrics.jsonl")) or os.path.isfile(
            os.path.join(rl, "summary.json")
        ):
            runs.append(read_run(os.path.join(sweep_dir, name), name))
    return runs


# ------------------------------------------------------------------------------ aggregation
def run_outcomes(
    evals: Mapping[int, Mapping[str, float]], metrics: Sequence[str] = DEFAULT_METRICS
) -> dict[str, dict[str, Any]]:
    """Per metric of one run: ``{"final", "final_step", "best", "best_step"}`` (metrics never
    evaluated are absent; the earliest step wins a tie for the best)."""
    out = {}
    for m in metrics:
        pts = [(s, v[m]) for s, v in sorted(evals.items()) if m in v]
        if not pts:
            continue
        best_step, best = max(pts, key=lambda sv: (sv[1], -sv[0]))
        out[m] = {
            "final": pts[-1][1],
            "final_step": pts[-1][0],
            "best": best,
            "best_step": best_step,
        }
    return out


def _seed_key(seed: str | None) -> tuple:
    if seed is None:
        return (2, "")
    try:
        return (0, float(seed))
    except ValueError:
        return (1, seed)


def aggregate(
    runs: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    confidence: float = 0.95,
    include_incomplete: bool = False,
) -> dict[str, Any]:
    """Per-variant tables of final-step and best-step held-out metrics over seeds.

    Args:
      runs: :func:`read_run` dicts (``variant``, ``seed``, ``complete``, ``evals``, ...).
      metrics: metric names of the evaluation points (``"greedy/success"``, ...).
      confidence: level of the t-intervals.
      include_incomplete: also use runs without ``rl/summary.json`` (still running or failed);
        by default they are listed under ``"skipped"`` only.

    Returns:
      ``{"confidence", "metrics", "skipped": [names], "variants": [{"variant", "n_runs",
      "seeds", "runs", "metrics": {m: {"final": ci, "best": ci, "final_step": [steps],
      "best_step": [steps], "best_common_step": {"step", **ci} | None}}}]}`` with ``ci`` as
      :func:`mean_ci` (over the seeds that evaluated ``m``; ``n`` says how many). Variants keep
      the order in which they first appear in ``runs``.
    """
    used = [r for r in runs if r.get("complete") or include_incomplete]
    skipped = [r["name"] for r in runs if r not in used]
    by_variant: dict[str, list[Mapping]] = {}
    for r in used:
        by_variant.setdefault(r["variant"], []).append(r)
    variants = []
    for variant, group in by_variant.items():
        group = sorted(group, key=lambda r: _seed_key(r.get("seed")))
        outcomes = [run_outcomes(r["evals"], metrics) for r in group]
        table = {}
        for m in metrics:
            have = [(r, o[m]) for r, o in zip(group, outcomes) if m in o]
            if not have:
                continue
            entry = {
                "final": mean_ci([o["final"] for _, o in have], confidence),
                "best": mean_ci([o["best"] for _, o in have], confidence),
                "final_step": [o["final_step"] for _, o in have],
                "best_step": [o["best_step"] for _, o in have],
                "best_common_step": None,
            }
            common = set.intersection(
                *({s for s, v in r["evals"].items() if m in v} for r, _ in have)
            )
            if common:
                cis = {s: mean_ci([r["evals"][s][m] for r, _ in have], confidence) for s in common}
                step = max(sorted(common), key=lambda s: cis[s]["mean"])
                entry["best_common_step"] = {"step": step, **cis[step]}
            table[m] = entry
        variants.append(
            {
                "variant": variant,
                "n_runs": len(group),
                "seeds": [r.get("seed") for r in group],
                "runs": [r["name"] for r in group],
                "metrics": table,
            }
        )
    return {
        "confidence": confidence,
        "metrics": list(metrics),
        "skipped": skipped,
        "variants": variants,
    }


def paired_gain(
    run: Mapping[str, Any],
    control: Mapping[str, Any],
    key: str = "rollout/success",
    *,
    steps: tuple[int, int] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Per-step difference of a training metric between a run and a paired control.

    Runs of one seed draw the same training tasks at every step, so the per-step rollout success
    of two runs differs by what the updates changed, not by which levels were drawn (the levels'
    difficulty varies far more from step to step than any update moves the policy). With a control
    that does not learn (e.g. ``--config.optim.learning_rate=1e-12``: the warm start's rollouts on
    the same levels and keys), ``run - control`` is the RL gain on the training distribution,
    measured without the held-out evaluation's sampling noise.

    Args:
      run, control: :func:`read_run` dicts (their ``records``).
      key: the per-step metric (default the rollout success of the training batch).
      steps: inclusive ``(first, last)`` step range; default every step both runs logged.
      confidence: level of the t-interval over steps. The interval treats the per-step
        differences as independent; they are not quite (the policy drifts smoothly), so read it as
        a lower bound on the uncertainty.

    Returns:
      :func:`mean_ci` of the differences plus ``"steps"`` (first, last, count) and
      ``"same_first_step"``: whether the two runs logged the same value at their first common
      step (true for runs of one seed and init: their first rollouts precede any update; false
      means the pairing is doubtful).
    """

    def per_step(r):
        return {
            int(x["step"]): float(x[key])
            for x in r["records"]
            if "step" in x and key in x and x[key] is not None
        }

    a, b = per_step(run), per_step(control)
    both = sorted(set(a) & set(b))
    common = both if steps is None else [s for s in both if steps[0] <= s <= steps[1]]
    out = mean_ci([a[s] - b[s] for s in common], confidence)
    out["steps"] = [common[0], common[-1], len(common)] if common else [None, None, 0]
    out["same_first_step"] = bool(both) and a[both[0]] == b[both[0]]
    out["key"] = key
    return out


def paired_task_gain(
    before: Sequence[float], after: Sequence[float], confidence: float = 0.95
) -> dict[str, Any]:
    """Held-out gain of one policy over another, paired by task.

    ``before[i]`` and ``after[i]`` are the success rates of the two policies on task ``i`` of the
    same evaluation (same tasks, same sampling keys: ``Experiment.evaluate_tasks`` with one seed).
    Differencing per task removes the task-difficulty variance that dominates the unpaired
    comparison of two success rates; the t-interval is over tasks (independent draws of the
    split's level generator).

    Returns:
      :func:`mean_ci` of ``after - before`` plus ``"before"`` / ``"after"`` (mean success rates)
      and ``"better"`` / ``"worse"`` (tasks whose success rate went up / down).
    """
    b = [float(x) for x in before]
    a = [float(x) for x in after]
    if len(a) != len(b):
        raise ValueError(
            f"paired_task_gain needs the same tasks on both sides: got {len(b)} tasks before and "
            f"{len(a)} after (evaluate both policies with the same eval.num_tasks and split)"
        )
    out = mean_ci([y - x for x, y in zip(b, a, strict=True)], confidence)
    out["before"] = math.fsum(b) / len(b) if b else None
    out["after"] = math.fsum(a) / len(a) if a else None
    out["better"] = sum(y > x for x, y in zip(b, a, strict=True))
    out["worse"] = sum(y < x for x, y in zip(b, a, strict=True))
    return out


def mode_gains(
    before: Mapping[str, Sequence[float]],
    after: Mapping[str, Sequence[float]],
    modes: Sequence[str] = ("greedy", "sampled"),
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """:func:`paired_task_gain` per evaluation mode present in both per-task dicts
    (``{"greedy": [...], "sampled": [...]}``, as ``Experiment.evaluate_modes`` writes them)."""
    return {
        m: paired_task_gain(before[m], after[m], confidence)
        for m in modes
        if m in before and m in after
    }


def held_out_gains(
    runs: Sequence[Mapping[str, Any]],
    baseline: Mapping[str, Sequence[float]],
    *,
    modes: Sequence[str] = ("greedy", "sampled"),
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Held-out gain of every run's final policy over a baseline policy (e.g. the warm start),
    paired by task, and per variant the mean and t-interval of those gains over seeds.

    Args:
      runs: :func:`read_run` dicts; runs without ``per_task`` are skipped.
      baseline: per-task success rates of the baseline (``{"greedy": [...], "sampled": [...]}``,
        as written by ``experiments.evaluate --per_task_out`` or the main job's
        ``warm_start_per_task.json``), evaluated with the same config (tasks, seed, batch size).

    Returns:
      ``{"runs": {name: {mode: paired_task_gain}}, "variants": {variant: {mode: mean_ci of the
      runs' mean gains (n = seeds)}}}``.
    """
    return _gains_by_variant(runs, lambda r: baseline, modes, confidence)


def _gains_by_variant(
    runs: Sequence[Mapping[str, Any]],
    before_of: Any,
    modes: Sequence[str],
    confidence: float,
) -> dict[str, Any]:
    """:func:`mode_gains` of every run over ``before_of(run)`` (runs where either side has no
    per-task file are skipped) and per variant the mean and t-interval of the runs' mean gains."""
    per_run: dict[str, dict[str, Any]] = {}
    for r in runs:
        pt, before = r.get("per_task"), before_of(r)
        if not pt or not before:
            continue
        per_run[r["name"]] = mode_gains(before, pt, modes, confidence)
    return {"runs": per_run, "variants": _variant_gains(per_run, confidence)}


def _variant_gains(
    per_run: Mapping[str, Mapping[str, Mapping[str, Any]]], confidence: float
) -> dict[str, dict[str, Any]]:
    """Per variant (the run name without its seed) and mode, :func:`mean_ci` of the runs' mean
    gains."""
    by_variant: dict[str, dict[str, list[float]]] = {}
    for name, gains in per_run.items():
        slot = by_variant.setdefault(parse_run_name(name)[0], {})
        for m, g in gains.items():
            slot.setdefault(m, []).append(g["mean"])
    return {
        v: {m: mean_ci(xs, confidence) for m, xs in sorted(d.items())}
        for v, d in sorted(by_variant.items())
    }


def reference_gains(
    runs: Sequence[Mapping[str, Any]],
    references: Sequence[Mapping[str, Any]],
    *,
    modes: Sequence[str] = ("greedy", "sampled"),
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Held-out difference of every run's final policy from the reference run of the same seed,
    paired by task: e.g. each row of a one-factor ablation against the default config's run of
    that seed (same training tasks and keys, same evaluation), or ActFocus against its base
    algorithm.

    Args:
      runs: :func:`read_run` dicts.
      references: :func:`read_run` dicts of the reference runs, one per seed (their ``seed`` parsed
        from the run name, ``...,seed=N``); every one needs a ``per_task`` file.

    Returns:
      :func:`held_out_gains`'s dict plus ``"references"`` (``{seed: run dir}``) and ``"unmatched"``
      (runs with no reference of their seed, or without a per-task file; the references
      themselves are left out).
    """
    by_seed: dict[str | None, Mapping[str, Any]] = {}
    for ref in references:
        if not ref.get("per_task"):
            raise ValueError(
                f"reference run {ref['dir']} has no rl/final_per_task.json: it did not finish, or "
                "was trained before per-task results were saved (evaluate its final policy with "
                "experiments.evaluate --per_task_out)"
            )
        if ref["seed"] in by_seed:
            raise ValueError(
                f"two reference runs of seed {ref['seed']}: {by_seed[ref['seed']]['dir']} and "
                f"{ref['dir']} (pass one per seed)"
            )
        by_seed[ref["seed"]] = ref
    ref_dirs = {os.path.normpath(r["dir"]) for r in references}
    todo = [r for r in runs if os.path.normpath(r["dir"]) not in ref_dirs]

    def before_of(r):
        ref = by_seed.get(r["seed"])
        return ref["per_task"] if ref else None

    out = _gains_by_variant(todo, before_of, modes, confidence)
    out["references"] = {str(s): r["dir"] for s, r in by_seed.items()}
    out["unmatched"] = [r["name"] for r in todo if r["name"] not in out["runs"]]
    return out


def earlier_gains(
    runs: Sequence[Mapping[str, Any]],
    earlier: Sequence[Mapping[str, Any]],
    *,
    modes: Sequence[str] = ("greedy", "sampled"),
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Held-out change of every run from the run of the same name in an earlier sweep, paired by
    task: e.g. runs extended from 40 to 80 steps (``experiments.sweep --resume``) against their
    own 40-step policies, so each difference is what the extra steps did to that run.

    Args:
      runs: :func:`read_run` dicts.
      earlier: :func:`read_run` dicts of the earlier sweep (matched by ``name``).

    Returns:
      :func:`held_out_gains`'s dict plus ``"unmatched"`` (runs with no earlier run of their name,
      or a missing per-task file on either side).
    """
    by_name = {r["name"]: r for r in earlier}

    def before_of(r):
        e = by_name.get(r["name"])
        return e.get("per_task") if e else None

    out = _gains_by_variant(runs, before_of, modes, confidence)
    out["unmatched"] = [r["name"] for r in runs if r["name"] not in out["runs"]]
    return out


def merge_gains(
    parts: Sequence[Mapping[str, Any]],
    *,
    confidence: float = 0.95,
    atol: float = 1e-9,
) -> dict[str, Any]:
    """The union of several :func:`held_out_gains` (or :func:`reference_gains`) results, with the
    per-variant means and t-intervals recomputed over all their runs: e.g. a new seed's sweep
    together with an earlier sweep's ``aggregate.json`` whose run directories are gone.

    A run name in more than one part (a re-run of the same config and seed) must have the same
    paired gains in each, to ``atol``: training and evaluation are deterministic on one machine and
    code version, so a difference means another warm start, code or machine, and mixing the two
    would be wrong (:class:`ValueError`, naming the run). Such runs are listed under
    ``"repeated"``. Reference runs (``"references"``, ``{seed: dir}``) of one seed must have the same
    run name in every part; the last part's directory is kept.
    """
    runs: dict[str, Mapping[str, Any]] = {}
    repeated: set[str] = set()
    references: dict[str, str] = {}
    unmatched: list[str] = []
    for i, part in enumerate(parts):
        for name, gains in part.get("runs", {}).items():
            if name in runs:
                old = runs[name]
                diff = {
                    m: abs(old[m]["mean"] - gains[m]["mean"])
                    for m in set(old) & set(gains)
                    if old[m].get("mean") is not None and gains[m].get("mean") is not None
                }
                if set(old) != set(gains) or any(d > atol for d in diff.values()):
                    raise ValueError(
                        f"run {name} is in part {i} with other gains than in an earlier part "
                        f"(|difference| {diff}): a re-run from another warm start, code version "
                        "or machine; merge only results of the same protocol, or rename the runs"
                    )
                repeated.add(name)
            runs[name] = gains
        for seed, d in part.get("references", {}).items():
            seed = str(seed)
            if seed in references and os.path.basename(os.path.normpath(references[seed])) != (
                os.path.basename(os.path.normpath(d))
            ):
                raise ValueError(
                    f"parts use different reference runs for seed {seed}: {references[seed]} and "
                    f"{d}; merge only differences from the same reference variant"
                )
            references[seed] = d
        unmatched += part.get("unmatched", [])
    out: dict[str, Any] = {"runs": runs, "variants": _variant_gains(runs, confidence)}
    out["repeated"] = sorted(repeated)
    if any("references" in p for p in parts):
        out["references"] = dict(sorted(references.items(), key=lambda kv: _seed_key(kv[0])))
        out["unmatched"] = sorted({n for n in unmatched if n not in runs})
    return out


# ----------------------------------------------------------------- differences between variants
#: Largest number of label splits the exact permutation test enumerates (C(20, 10) = 184,756).
MAX_PERMUTATION_SPLITS = 200_000


def permutation_p_value(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Exact two-sided permutation p-value of ``mean(a) - mean(b)``: the share of all
    ``C(n_a + n_b, n_a)`` relabellings of the pooled values whose ``|mean difference|`` is at least
    the observed one (the observed split counts, so ``p >= 1 / C``). No normality assumed; with
    ``n_a = n_b = 3`` the smallest possible p is ``2 / 20 = 0.1``, so three runs a side can never
    reach 0.05. ``None`` when either side is empty or there are more than
    :data:`MAX_PERMUTATION_SPLITS` splits."""
    xs = [float(v) for v in (*a, *b)]
    na, n = len(a), len(a) + len(b)
    if not a or not b or math.comb(n, na) > MAX_PERMUTATION_SPLITS:
        return None
    total = math.fsum(xs)

    def diff(idx: Sequence[int]) -> float:
        sa = math.fsum(xs[i] for i in idx)
        return sa / na - (total - sa) / (n - na)

    observed = abs(diff(range(na)))
    tol = 1e-12 * max(1.0, observed)
    hits = sum(abs(diff(idx)) >= observed - tol for idx in itertools.combinations(range(n), na))
    return hits / math.comb(n, na)


def welch_contrast(
    groups: Sequence[Iterable[float]], weights: Sequence[float], confidence: float = 0.95
) -> dict[str, Any]:
    """A linear contrast of independent group means, ``sum_i w_i * mean(g_i)``, with the
    Welch-Satterthwaite t-interval: e.g. the interaction ``(A - B) - (C - D)`` of four variants'
    held-out gains (weights ``1, -1, -1, 1``), whose runs share no randomness beyond the tasks.

    ``se^2 = sum_i w_i^2 s_i^2 / n_i``; ``df = se^4 / sum_i (w_i^2 s_i^2 / n_i)^2 / (n_i - 1)``
    (Satterthwaite 1946), rounded *down* for :func:`t_quantile` as in :func:`welch_difference`;
    ``df = sum_i (n_i - 1)`` when every group is constant. Groups of weight 0 are ignored.
    Returns ``{"mean", "lo", "hi", "half_width", "se", "df", "df_used", "n", "weights",
    "confidence"}``; ``mean`` is ``None`` if a weighted group is empty, the interval fields unless
    every weighted group has at least 2 values. Non-finite and ``None`` values are dropped. No
    permutation p-value: a null of "no interaction" does not make the groups exchangeable."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if len(groups) != len(weights) or not groups:
        raise ValueError(f"need one weight per group, got {len(weights)} for {len(groups)} groups")
    xs = [[float(v) for v in g if v is not None and math.isfinite(float(v))] for g in groups]
    used = [(x, float(w)) for x, w in zip(xs, weights) if w != 0.0]
    out: dict[str, Any] = dict.fromkeys(("mean", "lo", "hi", "half_width", "se", "df", "df_used"))
    out.update(n=[len(x) for x in xs], weights=[float(w) for w in weights], confidence=confidence)
    if not used or any(not x for x, _ in used):
        return out
    means = [math.fsum(x) / len(x) for x, _ in used]
    out["mean"] = math.fsum(w * m for (_, w), m in zip(used, means))
    if any(len(x) < 2 for x, _ in used):
        return out
    terms = [
        w * w * math.fsum((v - m) ** 2 for v in x) / (len(x) - 1) / len(x)
        for (x, w), m in zip(used, means)
    ]
    se = math.sqrt(math.fsum(terms))
    if se == 0.0:
        df = float(sum(len(x) - 1 for x, _ in used))
    else:
        df = math.fsum(terms) ** 2 / math.fsum(
            t**2 / (len(x) - 1) for t, (x, _) in zip(terms, used)
        )
    df_used = max(1, math.floor(df + 1e-9))
    h = t_quantile(0.5 + confidence / 2.0, df_used) * se
    out.update(se=se, df=df, df_used=df_used, lo=out["mean"] - h, hi=out["mean"] + h, half_width=h)
    return out


def welch_difference(
    a: Iterable[float], b: Iterable[float], confidence: float = 0.95, *, permutation: bool = True
) -> dict[str, Any]:
    """Difference of two independent means, ``mean(a) - mean(b)``, with Welch's t-interval and the
    exact permutation p-value: e.g. the held-out gains of two algorithms, one value per seed (runs
    of different algorithms share no randomness beyond the tasks, so they are not paired by seed).

    ``se = sqrt(s_a^2 / n_a + s_b^2 / n_b)``; Welch-Satterthwaite ``df = se^4 / ((s_a^2/n_a)^2 /
    (n_a - 1) + (s_b^2/n_b)^2 / (n_b - 1))``, rounded *down* to an integer for the t quantile
    (:func:`t_quantile` takes integer df; rounding down widens the interval slightly, so it stays
    conservative). Returns ``{"mean", "lo", "hi", "half_width", "se", "df", "df_used", "n_a",
    "n_b", "p_permutation", "confidence"}``; the interval fields are ``None`` unless both sides have
    at least 2 values, ``mean`` is ``None`` if either side is empty (``p_permutation`` also with
    ``permutation=False``). Non-finite and ``None`` values are dropped."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    clean = lambda vs: [float(v) for v in vs if v is not None and math.isfinite(float(v))]
    xa, xb = clean(a), clean(b)
    out: dict[str, Any] = dict.fromkeys(("mean", "lo", "hi", "half_width", "se", "df", "df_used"))
    out.update(n_a=len(xa), n_b=len(xb), confidence=confidence, p_permutation=None)
    if not xa or not xb:
        return out
    ma, mb = math.fsum(xa) / len(xa), math.fsum(xb) / len(xb)
    out["mean"] = ma - mb
    out["p_permutation"] = permutation_p_value(xa, xb) if permutation else None
    c = welch_contrast([xa, xb], [1.0, -1.0], confidence)
    out.update({k: c[k] for k in ("lo", "hi", "half_width", "se", "df", "df_used")})
    return out


def parse_comparison(spec: str) -> tuple[str, str]:
    """``"<variant A>|<variant B>"`` (A minus B) as a pair; ``ValueError`` naming the problem."""
    parts = spec.split("|")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(
            f"comparison {spec!r} must be '<variant A>|<variant B>' (A minus B), e.g. "
            "'algo.algo=ppo,actfocus.enabled=false|actfocus.enabled=true'"
        )
    return parts[0].strip(), parts[1].strip()


def _gains_of_variants(
    gains: Mapping[str, Any], wanted: Iterable[str]
) -> dict[str, dict[str, Mapping[str, Any]]]:
    """``{variant: {seed: per-mode gains}}`` of a held-out-gains dict; ``ValueError`` naming a
    wanted variant without runs (and the variants there are)."""
    by_variant: dict[str, dict[str, Mapping[str, Any]]] = {}
    for name, g in gains.get("runs", {}).items():
        variant, seed = parse_run_name(name)
        by_variant.setdefault(variant, {})[str(seed)] = g
    for v in wanted:
        if v not in by_variant:
            raise ValueError(
                f"variant {v!r} has no runs with held-out gains; variants: "
                f"{', '.join(sorted(by_variant)) or 'none'}"
            )
    return by_variant


def variant_differences(
    gains: Mapping[str, Any],
    comparisons: Sequence[tuple[str, str]],
    *,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Differences between variants of their runs' mean held-out gains (A minus B), per mode, with
    :func:`welch_difference` over the runs (seeds) of each side.

    Args:
      gains: a :func:`held_out_gains` (or merged, :func:`merge_gains`) dict: ``{"runs": {name:
        {mode: {"mean": ...}}}}``; both variants must be gains over the same baseline.
      comparisons: ``(A, B)`` variant names (run names without ``seed=``).

    Returns:
      ``{"confidence", "pairs": [{"a", "b", "seeds_a", "seeds_b", "modes": {mode:
      welch_difference}}]}``. ``ValueError`` naming a variant without runs (and the ones there are).
    """
    by_variant = _gains_of_variants(gains, [v for pair in comparisons for v in pair])
    pairs = []
    for a, b in comparisons:
        ra, rb = by_variant[a], by_variant[b]
        modes = _ordered_modes([*ra.values(), *rb.values()])
        pairs.append(
            {
                "a": a,
                "b": b,
                "seeds_a": sorted(ra, key=_seed_key),
                "seeds_b": sorted(rb, key=_seed_key),
                "modes": {
                    m: welch_difference(
                        [g[m]["mean"] for g in ra.values() if m in g],
                        [g[m]["mean"] for g in rb.values() if m in g],
                        confidence,
                    )
                    for m in modes
                },
            }
        )
    return {"confidence": confidence, "pairs": pairs}


def _contrast_head(
    result: Mapping[str, Any],
    items: str,
    first: Sequence[str],
    per_mode: Callable[[str, int], list[str]],
) -> tuple[list[str], list[str]]:
    """The modes of a contrast result's ``items`` (in order of appearance) and its markdown header
    lines: the ``first`` columns, then ``per_mode(mode, confidence in %)`` columns per mode."""
    pct = round(100 * result["confidence"])
    modes = list(dict.fromkeys(m for it in result[items] for m in it["modes"]))
    header = list(first)
    for m in modes:
        header += per_mode(m, pct)
    return modes, [_md_row(header), _md_row(["---"] * len(header))]


def variant_differences_markdown(vd: Mapping[str, Any], digits: int = 3) -> str:
    """One row per comparison: ``n_a`` / ``n_b`` runs, per mode the difference of mean gains with
    its Welch interval (bold when it excludes 0) and the exact permutation p-value."""
    modes, lines = _contrast_head(
        vd,
        "pairs",
        ["A minus B", "runs A / B"],
        lambda m, pct: [f"{m}: difference [Welch {pct}% CI]", f"{m}: permutation p"],
    )
    for p in vd["pairs"]:
        row = [f"{p['a']} minus {p['b']}", f"{len(p['seeds_a'])} / {len(p['seeds_b'])}"]
        for m in modes:
            d = p["modes"].get(m)
            row.append("-" if d is None else _gain_cell(d, digits))
            pv = None if d is None else d.get("p_permutation")
            row.append("-" if pv is None else f"{pv:.3f}")
        lines.append(_md_row(row))
    return "\n".join(lines)


def parse_interaction(spec: str) -> tuple[str, str, str, str]:
    """``"<A>|<B>|<C>|<D>"`` (the interaction ``(A minus B) minus (C minus D)``) as a 4-tuple;
    ``ValueError`` naming the problem."""
    parts = [p.strip() for p in spec.split("|")]
    if len(parts) != 4 or not all(parts):
        raise ValueError(
            f"interaction {spec!r} must be '<A>|<B>|<C>|<D>' ((A minus B) minus (C minus D)), "
            "e.g. 'algo.algo=ppo,actfocus.enabled=true|algo.algo=ppo,actfocus.enabled=false|"
            "algo.algo=grpo,actfocus.enabled=true|algo.algo=grpo,actfocus.enabled=false'"
        )
    return parts[0], parts[1], parts[2], parts[3]


def variant_interactions(
    gains: Mapping[str, Any],
    specs: Sequence[tuple[str, str, str, str]],
    *,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Differences of differences of variants' mean held-out gains, ``(A - B) - (C - D)`` per
    mode, with the Welch-Satterthwaite interval over the runs (seeds) of the four variants
    (:func:`welch_contrast`, weights ``1, -1, -1, 1``): e.g. whether ActFocus costs PPO more than
    it costs GRPO. Each side's own difference is given too (``"ab"``, ``"cd"``,
    :func:`welch_difference`). A variant on both sides (e.g. ``(A - B) - (A - C)``) is refused:
    the interval would count its runs twice as if independent; that contrast is the plain
    difference ``C - B`` (``--compare``).

    Returns ``{"confidence", "interactions": [{"a", "b", "c", "d", "seeds": {variant: [seeds]},
    "modes": {mode: {**welch_contrast, "ab", "cd"}}}]}``; ``ValueError`` naming a variant without
    runs or a repeated variant."""
    names = [v for spec in specs for v in spec]
    by_variant = _gains_of_variants(gains, names)
    out = []
    for spec in specs:
        if len(set(spec)) != 4:
            raise ValueError(
                f"interaction {'|'.join(spec)!r} repeats a variant; the four must differ (a "
                "shared variant cancels: write it as a --compare of the other two)"
            )
        runs = [by_variant[v] for v in spec]
        modes = _ordered_modes([g for r in runs for g in r.values()])
        per_mode = {}
        for m in modes:
            vals = [[g[m]["mean"] for g in r.values() if m in g] for r in runs]
            c = welch_contrast(vals, [1.0, -1.0, -1.0, 1.0], confidence)
            c["ab"] = welch_difference(vals[0], vals[1], confidence)
            c["cd"] = welch_difference(vals[2], vals[3], confidence)
            per_mode[m] = c
        out.append(
            {
                **dict(zip("abcd", spec)),
                "seeds": {v: sorted(r, key=_seed_key) for v, r in zip(spec, runs)},
                "modes": per_mode,
            }
        )
    return {"confidence": confidence, "interactions": out}


def variant_interactions_markdown(vi: Mapping[str, Any], digits: int = 3) -> str:
    """One row per interaction: runs per variant, per mode the two differences (means) and their
    difference with its Welch-Satterthwaite interval (bold when it excludes 0)."""
    modes, lines = _contrast_head(
        vi,
        "interactions",
        ["(A minus B) minus (C minus D)", "runs A / B / C / D"],
        lambda m, pct: [f"{m}: A - B", f"{m}: C - D", f"{m}: difference [Welch {pct}% CI]"],
    )
    for x in vi["interactions"]:
        row = [
            f"({x['a']} minus {x['b']}) minus ({x['c']} minus {x['d']})",
            " / ".join(str(len(x["seeds"][x[k]])) for k in "abcd"),
        ]
        for m in modes:
            d = x["modes"].get(m)
            if d is None:
                row += ["-", "-", "-"]
                continue
            row += [_gain_cell({"mean": d[k]["mean"]}, digits) for k in ("ab", "cd")]
            row.append(_gain_cell(d, digits))
        lines.append(_md_row(row))
    return "\n".join(lines)


def parse_trend(spec: str) -> tuple[tuple[float, str], ...]:
    """``"<x>:<variant>|<x>:<variant>|..."`` (a dose: each variant at the value ``x`` of a numeric
    factor, e.g. ``"0:actfocus.alpha=0|0.1:actfocus.enabled=true|1:actfocus.alpha=1"``) as
    ``((x, variant), ...)`` in the order written. At least three levels, distinct variants, finite
    ``x`` not all equal (two levels are a ``--compare``); ``ValueError`` naming the problem."""
    example = "'0:actfocus.alpha=0|0.3:actfocus.alpha=0.3|1:actfocus.alpha=1'"
    levels = []
    for part in spec.split("|"):
        x, sep, variant = part.partition(":")
        try:
            value = float(x)
        except ValueError:
            value = math.nan
        if not sep or not variant.strip() or not math.isfinite(value):
            raise ValueError(
                f"trend {spec!r}: level {part.strip()!r} must be '<x>:<variant>' with a finite "
                f"number x, e.g. {example}"
            )
        levels.append((value, variant.strip()))
    if len(levels) < 3:
        raise ValueError(
            f"trend {spec!r} has {len(levels)} level(s); a trend needs at least 3 (for two, use "
            "--compare='<A>|<B>'), e.g. " + example
        )
    variants = [v for _, v in levels]
    if len(set(variants)) != len(variants):
        raise ValueError(f"trend {spec!r} repeats a variant; each level is one variant's runs")
    if len({x for x, _ in levels}) < 2:
        raise ValueError(f"trend {spec!r}: every level has the same x; a slope needs two or more")
    return tuple(levels)


def trend_weights(xs: Sequence[float]) -> list[float]:
    """Weights ``w_i = (x_i - mean(x)) / sum_j (x_j - mean(x))^2`` whose contrast ``sum_i w_i *
    m_i`` is the least-squares slope of the level means ``m_i`` on ``x_i`` (each level counted
    once, whatever its number of runs). ``ValueError`` when all ``x`` are equal."""
    xbar = math.fsum(xs) / len(xs)
    sxx = math.fsum((x - xbar) ** 2 for x in xs)
    if sxx == 0.0:
        raise ValueError("all x are equal: no slope")
    return [(x - xbar) / sxx for x in xs]


def curvature_weights(xs: Sequence[float]) -> list[float]:
    """Weights ``q_i / sum_j q_j^2`` whose contrast ``sum_i w_i * m_i`` is the ``x^2`` coefficient
    of the least-squares parabola ``a + b x + c x^2`` through the level means ``m_i`` (each level
    counted once): ``q`` is ``x^2`` with its least-squares fit on ``1`` and ``x`` removed, so the
    weights ignore any straight line (they sum to 0 and are orthogonal to ``x``). ``c < 0``: the
    response flattens as ``x`` grows (concave), ``c > 0``: it steepens. ``ValueError`` with fewer
    than 3 distinct ``x`` (a parabola through two points is not determined)."""
    if len(set(xs)) < 3:
        raise ValueError(f"a curvature needs at least 3 distinct x, got {sorted(set(xs))}")
    xbar = math.fsum(xs) / len(xs)
    d = [x - xbar for x in xs]  # centred: orthogonal to the constant
    sdd = math.fsum(v * v for v in d)
    sq = [v * v for v in d]
    sq_bar = math.fsum(sq) / len(sq)
    sq_on_d = math.fsum(v * s for v, s in zip(d, sq)) / sdd  # least-squares slope of x^2 on x
    q = [s - sq_bar - sq_on_d * v for s, v in zip(sq, d)]
    sqq = math.fsum(v * v for v in q)
    return [v / sqq for v in q]


def variant_trends(
    gains: Mapping[str, Any],
    specs: Sequence[Sequence[tuple[float, str]]],
    *,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Linear trend of variants' mean held-out gains over a numeric factor (a dose-response, e.g.
    how much success each unit of ActFocus's reasoning weight ``alpha`` buys), per mode.

    The slope is the least-squares line through the level means (:func:`trend_weights`), i.e. a
    linear contrast of independent variant means, with the Welch-Satterthwaite interval of
    :func:`welch_contrast` (unequal variances and run counts allowed; a level at the mean ``x`` has
    weight 0 and does not move the slope). It summarises the direction and size of a dose effect.
    Whether the response is linear is tested by ``"curvature"``: the ``x^2`` coefficient of the
    least-squares parabola through the level means (:func:`curvature_weights`), the same kind of
    contrast with its own Welch interval (``None`` with fewer than 3 distinct ``x``); the level
    means are reported beside both.

    Returns ``{"confidence", "trends": [{"levels": [{"x", "variant", "seeds"}], "modes": {mode:
    {**welch_contrast, "level_means": [...], "curvature": welch_contrast | None}}}]}``;
    ``ValueError`` naming a variant without runs.
    """
    by_variant = _gains_of_variants(gains, [v for spec in specs for _, v in spec])
    out = []
    for spec in specs:
        xs = [float(x) for x, _ in spec]
        weights = trend_weights(xs)
        try:
            curve = curvature_weights(xs)
        except ValueError:  # fewer than 3 distinct x: a slope, no curvature
            curve = None
        runs = [by_variant[v] for _, v in spec]
        per_mode = {}
        for m in _ordered_modes([g for r in runs for g in r.values()]):
            vals = [[g[m]["mean"] for g in r.values() if m in g] for r in runs]
            c = welch_contrast(vals, weights, confidence)
            c["level_means"] = [mean_ci(v, confidence)["mean"] for v in vals]
            c["curvature"] = None if curve is None else welch_contrast(vals, curve, confidence)
            per_mode[m] = c
        out.append(
            {
                "levels": [
                    {"x": x, "variant": v, "seeds": sorted(r, key=_seed_key)}
                    for (x, v), r in zip(spec, runs)
                ],
                "modes": per_mode,
            }
        )
    return {"confidence": confidence, "trends": out}


def variant_trends_markdown(vt: Mapping[str, Any], digits: int = 3) -> str:
    """One row per trend: its levels (``x: variant``) with their runs, per mode the level means,
    the slope per unit of ``x`` and the curvature (``x^2`` coefficient), each with its
    Welch-Satterthwaite interval (bold when it excludes 0)."""
    modes, lines = _contrast_head(
        vt,
        "trends",
        ["levels (x: variant)", "runs per level"],
        lambda m, pct: [
            f"{m}: mean gain per level",
            f"{m}: slope per unit x [Welch {pct}% CI]",
            f"{m}: curvature, x^2 coefficient [Welch {pct}% CI]",
        ],
    )
    for t in vt["trends"]:
        lv = t["levels"]
        row = [
            ", ".join(f"{_fmt_x(level['x'])}: {level['variant']}" for level in lv),
            " / ".join(str(len(level["seeds"])) for level in lv),
        ]
        for m in modes:
            d = t["modes"].get(m)
            if d is None:
                row += ["-", "-", "-"]
                continue
            row.append(", ".join(_gain_cell({"mean": v}, digits) for v in d["level_means"]))
            row.append(_gain_cell(d, digits))
            row.append("-" if d.get("curvature") is None else _gain_cell(d["curvature"], digits))
        lines.append(_md_row(row))
    return "\n".join(lines)


def _fmt_x(x: float) -> str:
    """A dose value as written (``0.1``, ``1``), not ``1.0``."""
    return f"{x:g}"


def aggregate_sweep(
    sweep_dir: str | os.PathLike,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    confidence: float = 0.95,
    include_incomplete: bool = False,
) -> dict[str, Any]:
    """:func:`aggregate` of :func:`read_sweep` (plus ``"sweep_dir"``)."""
    runs = read_sweep(sweep_dir)
    out = aggregate(runs, metrics, confidence=confidence, include_incomplete=include_incomplete)
    out["sweep_dir"] = os.fspath(sweep_dir)
    return out


# ------------------------------------------------------------------------------ learning curves
def metric_curve(records: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in metrics records (missing / non-finite values skipped)."""
    pts = [
        (int(r["step"]), float(r[key])) for r in records if "step" in r and _is_number(r.get(key))
    ]
    return [s for s, _ in pts], [v for _, v in pts]


def seed_curves(
    runs: Sequence[Mapping[str, Any]], key: str, *, confidence: float = 0.95
) -> dict[str, dict[str, list]]:
    """Per variant, the mean over seeds of a metrics.jsonl ``key`` at every step logged by all of
    its seeds, with the t-interval: ``{variant: {"step", "mean", "lo", "hi", "n"}}`` (``lo`` /
    ``hi`` are ``None`` where ``n < 2``)."""
    by_variant: dict[str, list[dict[int, float]]] = {}
    for r in runs:
        steps, vals = metric_curve(r["records"], key)
        if steps:
            by_variant.setdefault(r["variant"], []).append(dict(zip(steps, vals)))
    out = {}
    for variant, curves in by_variant.items():
        common = sorted(set.intersection(*(set(c) for c in curves)))
        cis = [mean_ci([c[s] for c in curves], confidence) for s in common]
        out[variant] = {
            "step": common,
            "mean": [c["mean"] for c in cis],
            "lo": [c["lo"] for c in cis],
            "hi": [c["hi"] for c in cis],
            "n": [c["n"] for c in cis],
        }
    return out


def parse_bands(spec: Iterable[str]) -> list[tuple[int, int]]:
    """``["1-10", "31-40", "41"]`` -> ``[(1, 10), (31, 40), (41, 41)]`` (inclusive step ranges);
    ``ValueError`` naming the bad entry otherwise."""
    bands = []
    for item in spec:
        first, dash, last = str(item).strip().partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(f"step band {item!r} is not FIRST-LAST (e.g. 1-10)") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"step band {item!r}: need 0 <= FIRST <= LAST")
        bands.append((lo, hi))
    if not bands:
        raise ValueError("no step bands given (e.g. 1-10,31-40)")
    return bands


def band_mean(records: Sequence[Mapping], key: str, band: tuple[int, int]) -> float | None:
    """Mean of a metrics.jsonl ``key`` over the steps ``band[0]..band[1]`` (inclusive) of one run;
    ``None`` unless every step of the band logged a finite value (a partial band would compare a
    different window)."""
    steps, vals = metric_curve(records, key)
    by_step = dict(zip(steps, vals))
    want = range(band[0], band[1] + 1)
    if any(s not in by_step for s in want):
        return None
    return math.fsum(by_step[s] for s in want) / len(want)


def step_bands(
    runs: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    bands: Sequence[tuple[int, int]],
    *,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Training metrics (``metrics.jsonl`` keys, e.g. ``train/adv_mean``) averaged over step bands,
    per run, and per variant the mean and t-interval over seeds.

    Returns ``{"confidence", "keys", "bands": ["1-10", ...], "variants": {variant: {key: {band:
    {**mean_ci, "per_seed": {seed: band mean}}}}}}``; a run whose band is incomplete
    (:func:`band_mean` is ``None``) is left out of that band (``n`` says how many seeds remain),
    a band no seed covers is absent.
    """
    names = [f"{lo}-{hi}" for lo, hi in bands]
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        group = sorted(
            (r for r in runs if r["variant"] == variant), key=lambda r: _seed_key(r.get("seed"))
        )
        table: dict[str, dict[str, Any]] = {}
        for key in keys:
            cells = {}
            for name, band in zip(names, bands):
                per_seed = {
                    str(r.get("seed")): m
                    for r in group
                    if (m := band_mean(r["records"], key, band)) is not None
                }
                if per_seed:
                    cells[name] = {
                        **mean_ci(per_seed.values(), confidence),
                        "per_seed": per_seed,
                    }
            if cells:
                table[key] = cells
        variants[variant] = table
    return {"confidence": confidence, "keys": list(keys), "bands": names, "variants": variants}


def merge_step_bands(
    parts: Sequence[Mapping[str, Any]],
    *,
    confidence: float = 0.95,
    atol: float = 1e-9,
) -> dict[str, Any]:
    """The union of several :func:`step_bands` results over the keys and bands of the last part
    (this sweep's ``--train_metrics`` and ``--bands``), with each cell's mean and t-interval
    recomputed over all parts' seeds: e.g. a new sweep's seeds 3-4 with an earlier aggregate's
    seeds 0-2, whose run directories may be gone. Keys or bands of the other parts that the last
    one does not have are dropped; where a part lacks a key or band of a variant, that variant's
    cell holds only the other parts' seeds (``n`` says how many).

    A seed of one variant in more than one part (a re-run) must have the same band mean in each,
    to ``atol`` (training is deterministic on one machine and code version), else
    :class:`ValueError` naming variant, key, band and seed. Such cells are listed under
    ``"repeated"`` as ``"<variant> seed <s>"``.
    """
    if not parts:
        raise ValueError("merge_step_bands needs at least one part")
    keys, bands = list(parts[-1]["keys"]), list(parts[-1]["bands"])
    seeds: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    repeated: set[str] = set()
    for i, part in enumerate(parts):
        for variant, table in part.get("variants", {}).items():
            slot = seeds.setdefault(variant, {})
            for key in keys:
                for band in bands:
                    cell = table.get(key, {}).get(band)
                    if cell is None:
                        continue
                    have = slot.setdefault(key, {}).setdefault(band, {})
                    for seed, value in cell["per_seed"].items():
                        if seed in have:
                            if abs(have[seed] - value) > atol:
                                raise ValueError(
                                    f"{variant} seed {seed}: {key} over steps {band} is "
                                    f"{have[seed]!r} in an earlier part and {value!r} in part "
                                    f"{i}: a re-run from another warm start, code version or "
                                    "machine; merge only results of the same protocol"
                                )
                            repeated.add(f"{variant} seed {seed}")
                        have[seed] = value
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, slot in sorted(seeds.items()):
        table = {}
        for key in keys:
            cells = {}
            for band in bands:
                per_seed = slot.get(key, {}).get(band)
                if per_seed:
                    per_seed = dict(sorted(per_seed.items(), key=lambda kv: _seed_key(kv[0])))
                    cells[band] = {**mean_ci(per_seed.values(), confidence), "per_seed": per_seed}
            if cells:
                table[key] = cells
        variants[variant] = table
    return {
        "confidence": confidence,
        "keys": keys,
        "bands": bands,
        "variants": variants,
        "repeated": sorted(repeated),
    }


def step_bands_markdown(sb: Mapping[str, Any], digits: int = 3) -> str:
    """One row per (variant, key), one column per band: ``mean ± t (n)`` over seeds (``-`` where
    no seed covers the band)."""
    pct = round(100 * sb["confidence"])
    header = ["variant", "metric", *(f"steps {b}: mean ± t{pct} (n)" for b in sb["bands"])]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for variant, table in sb["variants"].items():
        for key, cells in table.items():
            row = [variant, key]
            for b in sb["bands"]:
                ci = cells.get(b)
                row.append("-" if ci is None else f"{_mean_t_cell(ci, digits)} ({ci['n']})")
            lines.append(_md_row(row))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ tables
def _fmt(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(ci: Mapping[str, Any], digits: int = 3) -> str:
    """``0.512 ± 0.041 [0.471, 0.553]`` (``±`` the t half-width; no interval for ``n < 2``)."""
    if ci["mean"] is None:
        return "-"
    if ci["half_width"] is None:
        return _fmt(ci["mean"], digits)
    return (
        f"{_fmt(ci['mean'], digits)} ± {_fmt(ci['half_width'], digits)} "
        f"[{_fmt(ci['lo'], digits)}, {_fmt(ci['hi'], digits)}]"
    )


def _rows(agg: Mapping[str, Any], digits: int) -> tuple[list[str], list[list[str]]]:
    pct = round(100 * agg["confidence"])
    header = ["variant", "metric", "n", f"final (mean ± t{pct})", f"best (mean ± t{pct})"]
    header += ["best step (per seed)", "best common step"]
    rows = []
    for v in agg["variants"]:
        for m, e in v["metrics"].items():
            common = e["best_common_step"]
            rows.append(
                [
                    v["variant"],
                    m,
                    str(e["final"]["n"]),
                    _cell(e["final"], digits),
                    _cell(e["best"], digits),
                    ",".join(str(s) for s in e["best_step"]),
                    "-" if common is None else f"{common['step']}: {_cell(common, digits)}",
                ]
            )
    return header, rows


def _md_row(cells: Sequence[str]) -> str:
    """One Markdown table row (``|`` inside a cell escaped)."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _no_rows(agg: Mapping[str, Any]) -> str:
    """The line that stands for the final-step table when no run evaluated any of its metrics."""
    metrics = ", ".join(agg.get("metrics") or []) or "none (--metrics is empty)"
    return f"No final-step held-out metrics to tabulate (metrics asked for: {metrics})."


def markdown_table(agg: Mapping[str, Any], digits: int = 3) -> str:
    """A Markdown table of :func:`aggregate` (one row per variant x metric); one line saying so
    when there is no row."""
    header, rows = _rows(agg, digits)
    lines = [_md_row(header), "|" + "---|" * len(header)] + [_md_row(r) for r in rows]
    if not rows:
        lines = [_no_rows(agg)]
    if agg.get("skipped"):
        lines += ["", f"Skipped (incomplete): {', '.join(agg['skipped'])}"]
    return "\n".join(lines)


def _excludes_zero(g: Mapping[str, Any]) -> bool:
    """Whether the interval of a :func:`mean_ci` dict lies entirely above or below 0."""
    return g.get("lo") is not None and (g["lo"] > 0 or g["hi"] < 0)


def _gain_cell(g: Mapping[str, Any], digits: int = 3) -> str:
    """``+0.038 [+0.017, +0.059]``, bold when the interval excludes 0."""
    if g.get("mean") is None:
        return "-"
    if g.get("lo") is None:
        return f"{g['mean']:+.{digits}f}"
    s = f"{g['mean']:+.{digits}f} [{g['lo']:+.{digits}f}, {g['hi']:+.{digits}f}]"
    return f"**{s}**" if _excludes_zero(g) else s


def _mean_t_cell(ci: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``+0.063 ± 0.161`` (the mean over seeds ± the t half-width; the mean alone for n = 1)."""
    if ci is None or ci["mean"] is None:
        return "-"
    if ci["half_width"] is None:
        return f"{ci['mean']:+.{digits}f}"
    return f"{ci['mean']:+.{digits}f} ± {ci['half_width']:.{digits}f}"


def held_out_gain_markdown(hg: Mapping[str, Any], digits: int = 3) -> str:
    """Markdown tables of :func:`held_out_gains`: one row per run (the gain per mode paired by
    task with its interval, the policy's rate after, tasks better / worse) and one per variant
    (the mean of its seeds' gains ± the t half-width over seeds). Bold: the interval excludes 0."""
    runs = hg.get("runs", {})
    modes = sorted({m for gains in runs.values() for m in gains})
    if not modes:
        return ""
    order = sorted(runs, key=lambda n: (parse_run_name(n)[0], str(parse_run_name(n)[1])))
    header = ["variant", "seed"] + [f"{m} gain [CI]" for m in modes]
    header += [f"{m} after" for m in modes] + [f"{m} better / worse" for m in modes]
    lines = [_md_row(header), "|" + "---|" * len(header)]
    for name in order:
        variant, seed = parse_run_name(name)
        gains = runs[name]
        row = [variant, "-" if seed is None else seed]
        row += [_gain_cell(gains[m], digits) if m in gains else "-" for m in modes]
        row += [_fmt(gains[m]["after"], digits) if m in gains else "-" for m in modes]
        row += [f"{gains[m]['better']} / {gains[m]['worse']}" if m in gains else "-" for m in modes]
        lines.append(_md_row(row))
    lines += ["", _md_row(["variant", "n"] + [f"{m} gain (mean ± t)" for m in modes])]
    lines.append("|" + "---|" * (2 + len(modes)))
    for variant, gains in hg.get("variants", {}).items():
        n = max((ci["n"] for ci in gains.values()), default=0)
        cells = [_mean_t_cell(gains.get(m), digits) for m in modes]
        lines.append(_md_row([variant, str(n), *cells]))
    return "\n".join(lines)


def _ordered_modes(gains: Iterable[Mapping[str, Any]]) -> list[str]:
    """The evaluation modes present in any of ``gains`` (``{mode: ...}`` dicts): greedy and sampled
    first, then the others sorted."""
    gains = list(gains)
    modes = [m for m in ("greedy", "sampled") if any(m in g for g in gains)]
    return modes + sorted({m for g in gains for m in g} - set(modes))


def gain_by_seed_markdown(hg: Mapping[str, Any], digits: int = 3) -> str:
    """The compact table of :func:`held_out_gains` (or :func:`reference_gains`) used in the
    README: one row per variant, one column per seed with its ``greedy / sampled`` gains (bold
    where that run's interval over tasks excludes 0), then the mean over seeds ± the t
    half-width per mode."""
    runs = hg.get("runs", {})
    modes = _ordered_modes(runs.values())
    if not modes:
        return ""
    by_variant: dict[str, dict[str, Mapping[str, Any]]] = {}
    for name, gains in runs.items():
        variant, seed = parse_run_name(name)
        by_variant.setdefault(variant, {})["-" if seed is None else seed] = gains
    seeds = sorted({s for v in by_variant.values() for s in v}, key=_seed_key)

    def bold_mean(g):
        if g is None or g.get("mean") is None:
            return "-"
        s = f"{g['mean']:+.{digits}f}"
        return f"**{s}**" if _excludes_zero(g) else s

    slash = " / ".join(modes)
    header = ["variant"] + [f"seed {s} {slash} gain" for s in seeds]
    header += [f"mean {m} gain" for m in modes]
    lines = [_md_row(header), "|" + "---|" * len(header)]
    for variant in sorted(by_variant):
        row = [variant]
        for s in seeds:
            g = by_variant[variant].get(s)
            row.append("-" if g is None else " / ".join(bold_mean(g.get(m)) for m in modes))
        variant_cis = hg.get("variants", {}).get(variant, {})
        row += [_mean_t_cell(variant_cis.get(m), digits) for m in modes]
        lines.append(_md_row(row))
    return "\n".join(lines)


def text_table(agg: Mapping[str, Any], digits: int = 3) -> str:
    """A plain-text, column-aligned version of :func:`markdown_table`."""
    header, rows = _rows(agg, digits)
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    if not rows:
        lines = [_no_rows(agg)]
    if agg.get("skipped"):
        lines.append(f"skipped (incomplete): {', '.join(agg['skipped'])}")
    return "\n".join(lines)


def write_aggregate(agg: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes ``aggregate.json`` and ``aggregate.md`` into ``out_dir``; returns their paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "aggregate.json"),
        "markdown": os.path.join(out_dir, "aggregate.md"),
    }
    with open(paths["json"], "w") as f:
        json.dump(agg, f, indent=2, allow_nan=False)
    md = markdown_table(agg)
    if agg.get("merged_from"):
        md += (
            f"\n\nThis table: the runs of {agg.get('sweep_dir', 'this sweep')}. The gain tables "
            f"below also hold the runs of {', '.join(agg['merged_from'])}."
        )
    if agg.get("held_out_gain"):
        hg = agg["held_out_gain"]
        md += f"\n\nHeld-out gain over {hg.get('baseline', 'the baseline')}, paired by task:\n\n"
        md += held_out_gain_markdown(hg)
        md += "\n\nPer seed (greedy / sampled; bold: the run's interval over tasks excludes 0):\n\n"
        md += gain_by_seed_markdown(hg)
    if agg.get("reference_gain"):
        rg = agg["reference_gain"]
        refs = ", ".join(f"seed {s}: {d}" for s, d in rg.get("references", {}).items())
        md += f"\n\nHeld-out difference from the reference run of the same seed ({refs}), "
        md += "paired by task:\n\n" + held_out_gain_markdown(rg)
        md += "\n\nPer seed (greedy / sampled):\n\n" + gain_by_seed_markdown(rg)
        if rg.get("unmatched"):
            md += f"\n\nNo reference of their seed: {', '.join(rg['unmatched'])}"
    if agg.get("earlier_gain"):
        eg = agg["earlier_gain"]
        md += f"\n\nHeld-out change from the same run in {eg['earlier_sweep']} (trained for fewer "
        md += "steps), paired by task:\n\n" + held_out_gain_markdown(eg)
        md += "\n\nPer seed (greedy / sampled):\n\n" + gain_by_seed_markdown(eg)
    contrasts = (
        ("variant_differences", variant_differences_markdown,
         "Differences of mean held-out gains between variants, over their runs (seeds; Welch "
         "t-interval, exact permutation p)"),
        ("variant_interactions", variant_interactions_markdown,
         "Differences of differences of mean held-out gains, over the four variants' runs (seeds; "
         "Welch-Satterthwaite interval, no permutation p)"),
        ("variant_trends", variant_trends_markdown,
         "Linear trends of mean held-out gains over a numeric factor: least-squares slope through "
         "the level means (Welch-Satterthwaite interval)"),
        ("earlier_variant_differences", variant_differences_markdown,
         "Differences between variants of the runs' held-out changes from their earlier runs "
         "(Welch t-interval, exact permutation p)"),
        ("earlier_variant_interactions", variant_interactions_markdown,
         "Differences of differences of the runs' held-out changes from their earlier runs "
         "(Welch-Satterthwaite interval)"),
        ("earlier_variant_trends", variant_trends_markdown,
         "Linear trends of the runs' held-out changes from their earlier runs over a numeric "
         "factor (Welch-Satterthwaite interval)"),
    )  # fmt: skip
    for key, table, title in contrasts:
        if agg.get(key):
            md += f"\n\n{title}:\n\n" + table(agg[key])
    if agg.get("step_bands"):
        sb = agg["step_bands"]
        also = sb.get("merged_from")
        also = f" (with the runs of {', '.join(also)})" if also else ""
        md += f"\n\nTraining metrics averaged over step bands, mean over seeds{also}:\n\n"
        md += step_bands_markdown(sb)
    repeated = sorted(
        {n for k in ("held_out_gain", "reference_gain") for n in agg.get(k, {}).get("repeated", [])}
    )
    if repeated:
        md += f"\n\nIn more than one merged sweep, with identical gains: {', '.join(repeated)}"
    with open(paths["markdown"], "w") as f:
        f.write(md + "\n")
    return paths
