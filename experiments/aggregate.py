"""Per-variant results of a sweep: final-step and best-step held-out metrics, mean and t-interval
over seeds.

    python -m experiments.aggregate --sweep_dir=runs/sweep [--metrics=greedy/success,sampled/success]
        [--confidence=0.95] [--include_incomplete] [--out_dir=<dir, default: the sweep directory>]

Reads every run of a directory made by ``experiments/sweep.py`` (``<run>/rl/metrics.jsonl`` and
``<run>/rl/summary.json``), groups the runs by variant (the run name without ``seed=...``), and
writes ``aggregate.json`` and ``aggregate.md`` (see :mod:`actfocus_jax.analysis.results`); the
table is also printed. Runs without ``rl/summary.json`` (running or failed) are skipped unless
``--include_incomplete``.
"""

from __future__ import annotations

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


def main(argv: list[str]) -> None:
    del argv
    from actfocus_jax.analysis.results import aggregate_sweep, text_table, write_aggregate

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
    paths = write_aggregate(agg, OUT_DIR.value or SWEEP_DIR.value)
    print(f"[aggregate] wrote {paths['json']} and {paths['markdown']}")


if __name__ == "__main__":
    app.run(main)
