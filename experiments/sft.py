"""Supervised warm start of the policy on the solver demonstrations (TFDS).

    python -m experiments.sft --config=experiments/configs/sokoban.py:tiny --workdir=runs/x

Writes the fine-tuned policy as a Hugging Face directory to ``<workdir>/sft`` (the RL job's
``--config.model.init=sft`` loads it).
"""

from __future__ import annotations

from absl import app
from absl import logging as absl_logging

from experiments._common import CONFIG, WORKDIR


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    from actfocus_jax.train.trainer import Experiment

    exp = Experiment(CONFIG.value, WORKDIR.value)
    exp.run_sft()


if __name__ == "__main__":
    app.run(main)
