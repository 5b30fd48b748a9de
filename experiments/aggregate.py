"""Per-variant results of a sweep: final-step and best-step held-out metrics, mean and t-interval
over seeds.

    python -m experiments.aggregate --sweep_dir=runs/sweep [--metrics=greedy/success,sampled/success]
        [--confidence=0.95] [--include_incomplete] [--out_dir=<dir, default: the sweep directory>]
        [--control=<run dir> [--gain_steps=11,40]] [--baseline_per_task=<per-task JSON>]
        [--reference_run=<run dir of seed 0> --reference_run=<run dir of seed 1> ...]
        [--earlier_sweep=<sweep dir of the same runs, trained for fewer steps>]
        [--train_metrics=train/adv_mean,train/value_loss --bands=1-10,31-40]
        [--merge=<earlier aggregate.json> [--merge_variant=<variant> ...]]
        [--compare='<variant A>|<variant B>' ...] [--interaction='<A>|<B>|<C>|<D>' ...]
        [--trend='<x>:<variant>|<x>:<variant>|<x>:<variant>...' ...]

Reads every run of a directory made by ``experiments/sweep.py`` (``<run>/rl/metrics.jsonl`` and
``<run>/rl/summary.json``), groups the runs by variant (the run name without ``seed=...``), and
writes ``aggregate.json`` and ``aggregate.md`` (see :mod:`actfocus_jax.analysis.results`); the
table is also printed. Runs without ``rl/summary.json`` (running or failed) are skipped unless
``--include_incomplete``.

``--control``: a run of the same seed and warm start that does not learn (e.g.
``--config.optim.learning_rate=1e-12``); every run then also gets its paired gain in training
rollout success over that control (mean over steps and t-interval,
:func:`actfocus_jax.analysis.results.paired_gain`), printed and written to ``aggregate.json`` under
``"paired_gain"``.

``--baseline_per_task``: per-task held-out success rates of a baseline policy (the warm start:
``experiments.evaluate --checkpoint=hf:<sft dir> --per_task_out=...`` with the runs' eval config, or
the main job's ``warm_start_per_task.json``); every run's final policy (``rl/final_per_task.json``)
then gets its held-out gain paired by task, and every variant the mean and t-interval of those
gains over seeds (:func:`actfocus_jax.analysis.results.held_out_gains`), under ``"held_out_gain"``.

``--reference_run`` (repeated): the runs of a reference variant, one per seed (e.g. the default
config's runs for a one-factor ablation, or GRPO's for ActFocus-GRPO); every other run then gets
its held-out difference from the reference of its own seed, paired by task
(:func:`actfocus_jax.analysis.results.reference_gains`), under ``"reference_gain"``.

``--earlier_sweep``: a sweep directory with the same run names whose runs were trained for fewer
steps (the runs of this sweep were extended from their checkpoints with ``experiments.sweep
--resume``); every run gets its held-out change from its own earlier policy, paired by task, and
every variant the mean and t-interval over seeds
(:func:`actfocus_jax.analysis.results.earlier_gains`), under ``"earlier_gain"``; ``--compare``,
``--interaction`` and ``--trend`` then also compare these changes between variants (under
``"earlier_variant_differences"``, ``"earlier_variant_interactions"`` and
``"earlier_variant_trends"``), e.g. whether the extra steps did more for ActFocus-GRPO than for
GRPO.

``--merge`` (repeated): the ``aggregate.json`` of earlier sweeps of the same protocol (same warm
start, baseline and reference variant; e.g. other seeds, whose run directories may be gone). Their
held-out gains and reference differences are merged with this sweep's and the per-variant means
and t-intervals over seeds recomputed over all runs
(:func:`actfocus_jax.analysis.results.merge_gains`); a run present in both must have identical
gains (a re-run is deterministic), else the merge is refused. With ``--train_metrics``, their
step bands are merged the same way, over this sweep's metrics and bands (a file aggregated without
them, or without one of the metrics, is named and its runs are left out there;
:func:`actfocus_jax.analysis.results.merge_step_bands`). The final-step table stays this sweep's
own.

``--merge_variant`` (repeated): take only these variants' runs from the ``--merge`` files (e.g. the
default and plain-GRPO rows of an ablation, for an algorithm comparison).

``--compare='<variant A>|<variant B>'`` (repeated, needs ``--baseline_per_task``): A's mean held-out
gain minus B's, over all their runs (merged ones included), with Welch's t-interval and the exact
permutation p-value (:func:`actfocus_jax.analysis.results.variant_differences`), under
``"variant_differences"``. Use it for variants whose runs share no randomness beyond the tasks
(e.g. PPO vs GRPO); ``--reference_run`` pairs by seed and task instead.

``--interaction='<A>|<B>|<C>|<D>'`` (repeated, needs ``--baseline_per_task``): the difference of
differences ``(A minus B) minus (C minus D)`` of mean held-out gains over the four variants' runs,
with the Welch-Satterthwaite interval (:func:`actfocus_jax.analysis.results.variant_interactions`),
under ``"variant_interactions"``: e.g. whether ActFocus costs PPO more than it costs GRPO
(``A, B`` = ActFocus-PPO, PPO; ``C, D`` = ActFocus-GRPO, GRPO).

``--trend='<x>:<variant>|<x>:<variant>|<x>:<variant>...'`` (repeated, at least three levels, needs
``--baseline_per_task``): a dose-response over a numeric factor, the least-squares slope of the
variants' mean held-out gains on ``x`` (each level counted once) with the Welch-Satterthwaite
interval (:func:`actfocus_jax.analysis.results.variant_trends`), under ``"variant_trends"``, the
level means beside it, and the curvature (the ``x^2`` coefficient of the least-squares parabola
through the level means, with its own interval; with 3 or more distinct ``x``): e.g. how
ActFocus's gain changes with the reasoning weight ``alpha``, each level a variant of this sweep or
of a ``--merge`` file (``0:actfocus.alpha=0|0.1:<default>|...``).

``--train_metrics`` with ``--bands``: training metrics of ``metrics.jsonl`` (advantage mean, value
loss, the action tokens' mean energy, ...) averaged over inclusive step bands per run, and per
variant the mean and t-interval over seeds (:func:`actfocus_jax.analysis.results.step_bands`),
under ``"step_bands"``; a run that did not log every step of a band is left out of that band.
"""

from __future__ import annotations

import json

from absl import app, flags

SWEEP_DIR = flags.DEFINE_string("sweep_dir", "runs/sweep", "Directory made by experiments.sweep.")
METRICS = flags.DEFINE_list(
    "metrics",
    ["greedy/success", "sampled/success", "greedy/return", "sampled/return"],
    "Held-out metrics (greedy/<m> or sampled/<m>) to tabulate.",
)
CONFIDENCE = flags.DEFINE_float("confidence", 0.95, "Level of the t-intervals over seeds.")
INCLUDE_INCOMPLETE = flags.DEFINE_bool(
    "include_incomplete", False, "Also use runs that have no rl/summary.json."
)
OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write aggregate.{json,md}.")
CONTROL = flags.DEFINE_string(
    "control", None, "Run directory of a non-learning control (same seed) for paired gains."
)
GAIN_STEPS = flags.DEFINE_list("gain_steps", None, "FIRST,LAST steps of the paired gain.")
BASELINE = flags.DEFINE_string(
    "baseline_per_task", None, "Per-task JSON of a baseline policy: held-out gains paired by task."
)
REFERENCES = flags.DEFINE_multi_string(
    "reference_run",
    [],
    "Run directory of a reference variant (name ending in seed=N); repeat once per seed. Every "
    "run's held-out difference from the reference of its seed, paired by task.",
)
EARLIER = flags.DEFINE_string(
    "earlier_sweep",
    None,
    "Sweep directory of the same runs trained for fewer steps: every run's held-out change from "
    "its earlier policy, paired by task.",
)

MERGE = flags.DEFINE_multi_string(
    "merge",
    [],
    "aggregate.json of an earlier sweep of the same protocol (repeatable): its held-out gains and "
    "reference differences are merged with this sweep's, per-variant statistics over all runs.",
)
MERGE_VARIANTS = flags.DEFINE_multi_string(
    "merge_variant",
    [],
    "Take only the runs of this variant from the --merge files (repeatable; default: all), e.g. "
    "the default and plain-GRPO rows of an ablation.",
)
COMPARE = flags.DEFINE_multi_string(
    "compare",
    [],
    "'<variant A>|<variant B>' (repeatable): A's mean held-out gain minus B's over their runs "
    "(seeds), Welch t-interval and exact permutation p; needs --baseline_per_task.",
)
INTERACTIONS = flags.DEFINE_multi_string(
    "interaction",
    [],
    "'<A>|<B>|<C>|<D>' (repeatable): (A minus B) minus (C minus D) of mean held-out gains over "
    "the four variants' runs, Welch-Satterthwaite interval; needs --baseline_per_task.",
)
TRENDS = flags.DEFINE_multi_string(
    "trend",
    [],
    "'<x>:<variant>|<x>:<variant>|...' (repeatable, >= 3 levels): least-squares slope of the "
    "variants' mean held-out gains on the numeric factor x, Welch-Satterthwaite interval; needs "
    "--baseline_per_task.",
)
TRAIN_METRICS = flags.DEFINE_list(
    "train_metrics",
    [],
    "metrics.jsonl keys (e.g. train/adv_mean,train/actfocus/action_energy_mean) to average over "
    "--bands per run and over seeds per variant.",
)
BANDS = flags.DEFINE_list(
    "bands", ["1-10"], "Inclusive step bands for --train_metrics, e.g. 1-10,31-40."
)


def merge_sections(
    agg: dict,
    earlier: list[tuple[str, dict]],
    confidence: float,
    variants: list[str] | None = None,
) -> None:
    """Merges the ``held_out_gain`` / ``reference_gain`` sections of earlier aggregate files
    (``(path, contents)`` from :func:`read_merge_files`) into ``agg`` (in place), only the runs of
    ``variants`` from them when given; ``SystemExit`` with the reason when they do not fit."""
    from actfocus_jax.analysis.results import merge_gains, parse_run_name

    for key in ("held_out_gain", "reference_gain"):
        if key not in agg:
            continue
        parts = []
        for path, other in earlier:
            if key not in other:
                raise SystemExit(
                    f"[aggregate] --merge={path} has no {key!r}: aggregate that sweep with the "
                    "same --baseline_per_task / --reference_run flags first"
                )
            if key == "held_out_gain" and other[key].get("baseline") != agg[key].get("baseline"):
                raise SystemExit(
                    f"[aggregate] --merge={path} has gains over {other[key].get('baseline')}, this "
                    f"sweep over {agg[key].get('baseline')}: merge only gains over one baseline"
                )
            part = other[key]
            if variants:
                keep = {
                    n: g
                    for n, g in part.get("runs", {}).items()
                    if parse_run_name(n)[0] in variants
                }
                if not keep and key == "held_out_gain":
                    raise SystemExit(
                        f"[aggregate] --merge={path} has no runs of --merge_variant "
                        f"{', '.join(variants)}; its variants: "
                        f"{', '.join(sorted(part.get('variants', {}))) or 'none'}"
                    )
                part = {**part, "runs": keep}
            parts.append(part)
        try:
            merged = merge_gains([*parts, agg[key]], confidence=confidence)
        except ValueError as e:
            raise SystemExit(f"[aggregate] --merge: {e}") from None
        if key == "held_out_gain":
            merged["baseline"] = agg[key]["baseline"]
        agg[key] = merged
    agg["merged_from"] = [path for path, _ in earlier]


def read_merge_files(paths: list[str]) -> list[tuple[str, dict]]:
    """``(path, parsed JSON)`` of each ``--merge`` file, read once for the gains and the step
    bands; ``SystemExit`` naming a file that cannot be read."""
    earlier = []
    for path in paths:
        try:
            with open(path) as f:
                earlier.append((path, json.load(f)))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"[aggregate] --merge={path}: cannot read it ({e})") from None
    return earlier


def merge_band_sections(
    agg: dict,
    earlier: list[tuple[str, dict]],
    confidence: float,
    variants: list[str] | None = None,
) -> None:
    """Merges the ``step_bands`` of earlier aggregate files (``(path, contents)`` from
    :func:`read_merge_files`) into ``agg["step_bands"]`` (in place; only ``variants`` from them
    when given), over this sweep's keys and bands; says which files or keys are missing (their
    runs are then not in those cells), ``SystemExit`` on a conflict."""
    from actfocus_jax.analysis.results import merge_step_bands

    parts, used = [], []
    own = agg["step_bands"]
    for path, other in earlier:
        sb = other.get("step_bands")
        if not sb:
            print(
                f"[aggregate] --merge={path} has no step bands (aggregate that sweep with "
                "--train_metrics --bands): its runs are not in the step bands below"
            )
            continue
        missing = [k for k in own["keys"] if k not in sb.get("keys", [])]
        missing += [f"steps {b}" for b in own["bands"] if b not in sb.get("bands", [])]
        if missing:
            print(f"[aggregate] --merge={path} has no {', '.join(missing)}: its runs are not there")
        if variants:
            sb = {**sb, "variants": {v: t for v, t in sb["variants"].items() if v in variants}}
        parts.append(sb)
        used.append(path)
    if not parts:
        return
    try:
        merged = merge_step_bands([*parts, own], confidence=confidence)
    except ValueError as e:
        raise SystemExit(f"[aggregate] --merge (step bands): {e}") from None
    agg["step_bands"] = {**merged, "merged_from": used}


def _used_runs(agg: dict) -> set[str]:
    """Names of the runs the final-step table used (finished ones, or all with
    --include_incomplete)."""
    return {name for v in agg["variants"] for name in v["runs"]}


def main(argv: list[str]) -> None:
    del argv
    from actfocus_jax.analysis.results import (
        aggregate_sweep,
        earlier_gains,
        held_out_gain_markdown,
        held_out_gains,
        paired_gain,
        parse_bands,
        parse_comparison,
        parse_interaction,
        parse_trend,
        read_run,
        read_sweep,
        reference_gains,
        step_bands,
        step_bands_markdown,
        text_table,
        variant_differences,
        variant_differences_markdown,
        variant_interactions,
        variant_interactions_markdown,
        variant_trends,
        variant_trends_markdown,
        write_aggregate,
    )

    agg = aggregate_sweep(
        SWEEP_DIR.value,
        METRICS.value,
        confidence=CONFIDENCE.value,
        include_incomplete=INCLUDE_INCOMPLETE.value,
    )
    if not agg["variants"]:
        raise SystemExit(
            f"[aggregate] no finished runs in {SWEEP_DIR.value} (skipped: {agg['skipped']}); "
            "pass --include_incomplete to use unfinished ones"
        )
    print(text_table(agg))
    if CONTROL.value:
        control = read_run(CONTROL.value)
        steps = tuple(int(x) for x in GAIN_STEPS.value) if GAIN_STEPS.value else None
        if steps is not None and len(steps) != 2:
            raise SystemExit(f"--gain_steps needs FIRST,LAST, got {GAIN_STEPS.value}")
        gains = {}
        print(f"\npaired gain in training rollout success over {CONTROL.value}")
        for r in read_sweep(SWEEP_DIR.value):
            g = paired_gain(r, control, steps=steps, confidence=CONFIDENCE.value)
            gains[r["name"]] = g
            ci = "" if g["lo"] is None else f" [{g['lo']:+.3f}, {g['hi']:+.3f}]"
            mean = "n/a" if g["mean"] is None else f"{g['mean']:+.3f}"
            warn = "" if g["same_first_step"] else "  (first steps differ: not paired?)"
            print(f"  {r['name']}: {mean}{ci} over steps {g['steps'][0]}-{g['steps'][1]}{warn}")
        agg["paired_gain"] = {"control": CONTROL.value, "runs": gains}
    if BASELINE.value:
        with open(BASELINE.value) as f:
            baseline = json.load(f)
        hg = held_out_gains(read_sweep(SWEEP_DIR.value), baseline, confidence=CONFIDENCE.value)
        print(f"\nheld-out gain over {BASELINE.value}, paired by task\n")
        print(held_out_gain_markdown(hg))
        agg["held_out_gain"] = {"baseline": BASELINE.value, **hg}
    if REFERENCES.value:
        refs = [read_run(d) for d in REFERENCES.value]
        try:
            rg = reference_gains(read_sweep(SWEEP_DIR.value), refs, confidence=CONFIDENCE.value)
        except ValueError as e:
            raise SystemExit(f"[aggregate] {e}") from None
        print("\nheld-out difference from the reference run of the same seed, paired by task\n")
        print(held_out_gain_markdown(rg))
        if rg["unmatched"]:
            print(f"no reference of their seed: {', '.join(rg['unmatched'])}")
        agg["reference_gain"] = rg
    if EARLIER.value:
        try:
            earlier = read_sweep(EARLIER.value)
        except FileNotFoundError as e:
            raise SystemExit(f"[aggregate] --earlier_sweep: {e}") from None
        eg = earlier_gains(read_sweep(SWEEP_DIR.value), earlier, confidence=CONFIDENCE.value)
        if not eg["runs"]:
            raise SystemExit(
                f"[aggregate] --earlier_sweep={EARLIER.value}: no run of {SWEEP_DIR.value} has a "
                "run of the same name with rl/final_per_task.json there"
            )
        print(f"\nheld-out change from the same run in {EARLIER.value}, paired by task\n")
        print(held_out_gain_markdown(eg))
        if eg["unmatched"]:
            print(
                "not paired (no rl/final_per_task.json here, or no finished run of the same name "
                f"there): {', '.join(eg['unmatched'])}"
            )
        agg["earlier_gain"] = {"earlier_sweep": EARLIER.value, **eg}
    merge_files = read_merge_files(MERGE.value)
    if merge_files:
        merge_sections(agg, merge_files, CONFIDENCE.value, MERGE_VARIANTS.value or None)
        for key in ("held_out_gain", "reference_gain"):
            if key in agg:
                print(f"\n{key}, merged with {', '.join(MERGE.value)}\n")
                print(held_out_gain_markdown(agg[key]))
                if agg[key].get("repeated"):
                    print(f"identical in both (re-runs): {', '.join(agg[key]['repeated'])}")
    contrasts = (
        (COMPARE, "--compare", "variant_differences", parse_comparison, variant_differences,
         variant_differences_markdown, "differences between variants"),
        (INTERACTIONS, "--interaction", "variant_interactions", parse_interaction,
         variant_interactions, variant_interactions_markdown, "differences of differences"),
        (TRENDS, "--trend", "variant_trends", parse_trend, variant_trends,
         variant_trends_markdown, "linear trends over a numeric factor"),
    )  # fmt: skip
    # Each contrast over the gains over the baseline, and over the changes from the earlier runs.
    sources = (
        ("held_out_gain", "", "mean held-out gains"),
        ("earlier_gain", "earlier_", "mean held-out changes from the earlier runs"),
    )
    for flag, name, key, parse, compute, markdown, title in contrasts:
        if not flag.value:
            continue
        if not any(src in agg for src, _, _ in sources):
            raise SystemExit(
                f"[aggregate] {name} needs --baseline_per_task or --earlier_sweep (it compares "
                "gains)"
            )
        for src, prefix, what in sources:
            if src not in agg:
                continue
            try:
                specs = [parse(x) for x in flag.value]
                agg[prefix + key] = compute(agg[src], specs, confidence=CONFIDENCE.value)
            except ValueError as e:
                raise SystemExit(f"[aggregate] {name}: {e}") from None
            print(f"\n{title} of {what} (over their seeds)\n")
            print(markdown(agg[prefix + key]))
    if TRAIN_METRICS.value:
        try:
            bands = parse_bands(BANDS.value)
        except ValueError as e:
            raise SystemExit(f"[aggregate] --bands: {e}") from None
        used = [r for r in read_sweep(SWEEP_DIR.value) if r["name"] in _used_runs(agg)]
        agg["step_bands"] = step_bands(
            used, TRAIN_METRICS.value, bands, confidence=CONFIDENCE.value
        )
        if merge_files:
            merge_band_sections(agg, merge_files, CONFIDENCE.value, MERGE_VARIANTS.value or None)
        also = agg["step_bands"].get("merged_from")
        also = f", with the runs of {', '.join(also)}" if also else ""
        print(f"\ntraining metrics over step bands, mean over seeds{also}\n")
        print(step_bands_markdown(agg["step_bands"]))
    paths = write_aggregate(agg, OUT_DIR.value or SWEEP_DIR.value)
    print(f"[aggregate] wrote {paths['json']} and {paths['markdown']}")


if __name__ == "__main__":
    app.run(main)
