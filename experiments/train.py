"""RL training (PPO or GRPO, with or without ActFocus).

    python -m experiments.train --config=experiments/configs/sokoban.py:tiny --workdir=runs/x \\
        --config.algo.algo=grpo --config.actfocus.enabled=true [--resume]

Checkpoints go to ``<workdir>/rl`` every ``train.save_every`` steps; ``--resume`` continues from the
latest one exactly where it stopped.
"""

from __future__ import annotations

from absl import app, flags
from absl import logging as absl_logging

from experiments._common import CONFIG, WORKDIR

RESUME = flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in the workdir.")


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    from actfocus_jax.train.trainer import Experiment

    exp = Experiment(CONFIG.value, WORKDIR.value)
    exp.run_rl(resume=RESUME.value)


if __name__ == "__main__":
    app.run(main)
