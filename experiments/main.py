"""The main job on the embedded default: task sets -> SFT warm start -> ActFocus-GRPO -> evaluation.

    python -m experiments.main [--config=experiments/configs/main.py] [--workdir=runs/main]

Builds the Sokoban task sets and demonstrations (TFDS), fine-tunes the tiny model on the
demonstrations, evaluates that warm start on the held-out split, trains it with ActFocus-GRPO,
evaluates again, and prints where the outputs (metrics, TensorBoard files, plots, policies) are.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "main.py")
CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT, "Main-job config.", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: config.workdir).")


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    run_main(CONFIG.value, WORKDIR.value)


def run_main(config, workdir: str | None = None) -> dict:
    """Task sets -> SFT -> held-out evaluation -> ActFocus-GRPO -> held-out evaluation; returns
    (and writes to ``<workdir>/main_result.json``) both evaluations and their paired gain."""
    from actfocus_jax.analysis.results import mode_gains
    from actfocus_jax.train.trainer import FINAL_PER_TASK, Experiment

    t0 = time.perf_counter()
    exp = Experiment(config, workdir)
    print(f"[main] work directory: {exp.workdir}")
    sft = exp.run_sft()
    t_sft = time.perf_counter() - t0
    warm_tasks = os.path.join(exp.workdir, "warm_start_per_task.json")
    warm = exp.evaluate_checkpoint("sft", per_task_path=warm_tasks)
    print(f"[main] warm start (SFT) on the held-out split: {_short(warm)}")
    summary = exp.run_rl()
    final = summary["final"]
    total = time.perf_counter() - t0
    # Paired by task: both evaluations play the same held-out tasks with the same sampling keys.
    with open(warm_tasks) as f:
        before = json.load(f)
    with open(os.path.join(exp.workdir, "rl", FINAL_PER_TASK)) as f:
        after = json.load(f)
    gain = mode_gains(before, after)
    result = {
        "warm_start": warm,
        "final": final,
        "held_out_gain": gain,
        "sft": sft,
        "seconds": {"sft": t_sft, "total": total},
        "workdir": exp.workdir,
        "machine": summary["machine"],  # the RL run's record (rl/summary.json)
    }
    with open(os.path.join(exp.workdir, "main_result.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    print()
    print("[main] held-out success (greedy):")
    print(f"         warm start (SFT): {warm['greedy/success']:.3f}")
    print(f"         after ActFocus-GRPO: {final['final/greedy/success']:.3f}")
    if "sampled/success" in warm:
        print("[main] held-out success (sampled, temperature 1):")
        print(f"         warm start (SFT): {warm['sampled/success']:.3f}")
        print(f"         after ActFocus-GRPO: {final['final/sampled/success']:.3f}")
    for m, g in gain.items():
        what = "1 greedy episode" if m == "greedy" else f"{config.eval.samples_per_task} sampled"
        ci = "" if g["lo"] is None else f", 95% CI [{g['lo']:+.3f}, {g['hi']:+.3f}]"
        print(
            f"[main] held-out gain, {m} ({g['n']} tasks x {what}, paired by task): "
            f"{g['mean']:+.3f}{ci}; {g['better']} tasks better, {g['worse']} worse"
        )
    print(f"[main] total time: {total / 60:.1f} min")
    rl = os.path.join(exp.workdir, "rl")
    print("[main] outputs:")
    print(f"         summary:            {os.path.join(exp.workdir, 'main_result.json')}")
    print(f"         metrics (JSONL):    {os.path.join(rl, 'metrics.jsonl')}")
    print(f"         TensorBoard:        {os.path.join(rl, 'tb')}")
    print(f"         learning curves:    {os.path.join(rl, 'curves.png')}")
    print(f"         SFT policy (HF):    {exp.sft_dir}")
    print(f"         final policy (HF):  {os.path.join(rl, 'final_policy')}")
    return result


def _short(d: dict) -> str:
    keys = [k for k in ("greedy/success", "greedy/return", "sampled/success") if k in d]
    return ", ".join(f"{k}={d[k]:.3f}" for k in keys)


if __name__ == "__main__":
    app.run(main)
