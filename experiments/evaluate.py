"""Evaluation on the held-out split: success rate, return and per-turn statistics, greedy and sampled.

    python -m experiments.evaluate --config=experiments/configs/sokoban.py:tiny --workdir=runs/x \\
        [--checkpoint=rl|sft|hf:<dir>] [--split=test]
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


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    from actfocus_jax.train.trainer import Experiment

    exp = Experiment(CONFIG.value, WORKDIR.value)
    results = exp.evaluate_checkpoint(CHECKPOINT.value, split=SPLIT.value)
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
