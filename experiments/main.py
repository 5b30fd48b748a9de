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
    from actfocus_jax.train.trainer import Experiment

    t0 = time.perf_counter()
    exp = Experiment(CONFIG.value, WORKDIR.value)
    print(f"[main] work directory: {exp.workdir}")
    sft = exp.run_sft()
    t_sft = time.perf_counter() - t0
    warm = exp.evaluate_checkpoint("sft")
    print(f"[main] warm start (SFT) on the held-out split: {_short(warm)}")
    summary = exp.run_rl()
    final = summary["final"]
    total = time.perf_counter() - t0
    result = {
        "warm_start": warm,
        "final": final,
        "sft": sft,
        "seconds": {"sft": t_sft, "total": total},
        "workdir": exp.workdir,
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
    print(f"[main] total time: {total / 60:.1f} min")
    rl = os.path.join(exp.workdir, "rl")
    print("[main] outputs:")
    print(f"         summary:            {os.path.join(exp.workdir, 'main_result.json')}")
    print(f"         metrics (JSONL):    {os.path.join(rl, 'metrics.jsonl')}")
    print(f"         TensorBoard:        {os.path.join(rl, 'tb')}")
    print(f"         learning curves:    {os.path.join(rl, 'curves.png')}")
    print(f"         SFT policy (HF):    {exp.sft_dir}")
    print(f"         final policy (HF):  {os.path.join(rl, 'final_policy')}")


def _short(d: dict) -> str:
    keys = [k for k in ("greedy/success", "greedy/return", "sampled/success") if k in d]
    return ", ".join(f"{k}={d[k]:.3f}" for k in keys)


if __name__ == "__main__":
    app.run(main)
