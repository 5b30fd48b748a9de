"""Evaluation on the held-out split: success rate, return and per-turn statistics, greedy and sampled.

    python -m experiments.evaluate --config=experiments/configs/sokoban.py:tiny --workdir=runs/x \\
        [--checkpoint=rl|sft|hf:<dir>] [--split=test] [--config.eval.samples_per_task=4] \
        [--per_task_out=runs/x/eval_tasks.json] [--baseline=runs/x/warm_start_per_task.json]

``--per_task_out`` writes each task's success rate (greedy, and sampled over
``eval.samples_per_task`` episodes); ``--baseline`` (such a file of another policy, evaluated with
the same config and seed) prints the held-out gain paired by task, with a 95% t-interval.
"""

from __future__ import annotations

import json

from absl import app, flags
from absl import logging as absl_logging

from experiments._common import CONFIG, WORKDIR

CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "rl", "What to evaluate: 'rl' (latest RL checkpoint), 'sft', or 'hf:<dir>'."
)
SPLIT = flags.DEFINE_enum("split", "test", ["train", "test"], "Task split.")
PER_TASK_OUT = flags.DEFINE_string(
    "per_task_out", None, "Write per-task success rates (JSON) here (default: a temporary file)."
)
BASELINE = flags.DEFINE_string(
    "baseline", None, "Per-task JSON of another policy: print the gain over it, paired by task."
)


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    from actfocus_jax.train.trainer import Experiment

    exp = Experiment(CONFIG.value, WORKDIR.value)
    results = exp.evaluate_checkpoint(
        CHECKPOINT.value,
        split=SPLIT.value,
        per_task_path=PER_TASK_OUT.value,
        baseline_path=BASELINE.value,
    )
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
