"""The Action Bottleneck statistic of a policy, or along RL training (every checkpoint of a run).

    # one policy: --config.model.init=sft (the run's SFT warm start), random, or hf:<dir>
    python -m experiments.bottleneck --config=experiments/configs/sokoban.py:tiny --workdir=runs/x \\
        --config.model.init=sft [--split=train] [--num_tasks=32] [--group_size=8]
    # along training: step 0 (the run's initial policy) and every saved RL checkpoint of a run
    python -m experiments.bottleneck --config=experiments/configs/sokoban.py:tiny --rl_dir=runs/x/rl \\
        [--steps=0,20,40]

For each policy: ``G`` sampled rollouts of each of ``--num_tasks`` tasks (a seeded subset of the
split, the same for every policy) with the experiment's rollout path, then
:func:`actfocus_jax.analysis.bottleneck_report` (energies ``neg_logprob`` / ``entropy`` /
``neg_logit``, ``sum`` and ``mean`` variants, per role and per turn, bootstrap CIs over groups,
permutation null and excess density) and the token share per role; with ``--gradients`` also the
gradient-based variant (:func:`actfocus_jax.analysis.policy_report.gradient_report`: each role's
share of the GRPO policy gradient on the same rollouts). Writes
``<workdir>/bottleneck/<source>_<split>/report.json`` (``--out_dir`` to change), the rollouts
(``rollouts_<label>.npz``) and the tokenizer, and prints a compact table per policy (and one line
per checkpoint along training). With ``--rl_dir`` the run's saved config is used for every field it
has (``--use_run_config=false`` to keep the command line's); walking a run that is still training
is refused, since opening its checkpoints would delete its unfinished save. Plots:
``notebooks/action_bottleneck.ipynb``.
"""

from __future__ import annotations

from absl import app, flags
from absl import logging as absl_logging

from experiments._common import CONFIG, WORKDIR

RL_DIR = flags.DEFINE_string(
    "rl_dir", None, "An RL work directory (<run>/rl): analyse step 0 and every saved checkpoint."
)
STEPS = flags.DEFINE_list(
    "steps", None, "With --rl_dir: the steps to analyse (0 = initial policy)."
)
USE_RUN_CONFIG = flags.DEFINE_bool(
    "use_run_config", True, "With --rl_dir: lay the run's saved config over --config."
)
SPLIT = flags.DEFINE_enum("split", "train", ["train", "test"], "Task split.")
NUM_TASKS = flags.DEFINE_integer("num_tasks", 32, "Tasks (groups) per policy.")
GROUP_SIZE = flags.DEFINE_integer("group_size", None, "Rollouts per task (default: the config's).")
BATCH_TASKS = flags.DEFINE_integer(
    "batch_tasks", None, "Tasks per rollout call (default: config.rollout.num_tasks)."
)
SEED = flags.DEFINE_integer("seed", 0, "Task subset, rollout, bootstrap and permutation seed.")
NUM_RESAMPLES = flags.DEFINE_integer("num_resamples", 2000, "Bootstrap resamples.")
NUM_PERMUTATIONS = flags.DEFINE_integer("num_permutations", 100, "Permutations of the null.")
ALPHA = flags.DEFINE_float("alpha", 0.05, "1 - confidence level of the bootstrap intervals.")
OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (default under the workdir).")
SAVE_ROLLOUTS = flags.DEFINE_bool("save_rollouts", True, "Write the rollout arrays (.npz).")
GRADIENTS = flags.DEFINE_bool(
    "gradients",
    False,
    "Also the gradient-based variant: per-role norm, cosine and contribution of the GRPO policy "
    "gradient on the same rollouts (batch and per group).",
)


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    from actfocus_jax.analysis.policy_report import bottleneck_analysis

    bottleneck_analysis(
        CONFIG.value,
        workdir=WORKDIR.value,
        rl_dir=RL_DIR.value,
        steps=None if STEPS.value is None else [int(s) for s in STEPS.value],
        use_run_config=USE_RUN_CONFIG.value,
        split=SPLIT.value,
        num_tasks=NUM_TASKS.value,
        group_size=GROUP_SIZE.value,
        batch_tasks=BATCH_TASKS.value,
        seed=SEED.value,
        num_resamples=NUM_RESAMPLES.value,
        alpha=ALPHA.value,
        num_permutations=NUM_PERMUTATIONS.value,
        out_dir=OUT_DIR.value,
        save_rollout_arrays=SAVE_ROLLOUTS.value,
        gradients=GRADIENTS.value,
    )


if __name__ == "__main__":
    app.run(main)
