"""The main job's recipe on any environment: ``--config=experiments/configs/recipe.py:<env>``.

The recipe (measured on Sokoban, see README.md "What we found about RL at this scale"): the tiny
model warm-started by SFT on epsilon-noisy solver demonstrations whose ``<think>`` describes the
state and whose answer makes the decision, then GRPO-family training with a KL anchor to the warm
start, 8 tasks x 8 rollouts per step for 40 steps, and a 512-task held-out evaluation (greedy and
sampled) that the sweep's runs are paired against. ``main.py`` is this recipe on Sokoban.

Per-environment changes (``_ENV``) are only those the environment's reward or episode length
needs; everything else is shared so that results are comparable across environments. Sizes the
base config already has (512 train tasks, SFT batch 16, 8 tasks x 8 rollouts per step, 48 response
tokens per turn) are not restated here.
"""

from __future__ import annotations

from experiments.configs.base import get_base_config


def _sokoban(c):
    c.env.max_turns = 3
    # RAGEN's -0.1 per invalid turn is cheaper than a turn of wasted moves (-0.1 per action, up to
    # 3 per turn): under GRPO the tiny policy then learns to answer invalidly (seen: invalid turns
    # 0.09 -> 0.82 in 40 steps). An invalid turn must cost more than any valid one.
    c.env.format_penalty = -1.0
    # Success-only reward (+10 on solving, nothing per action or per box move). With gym-sokoban's
    # shaping (-0.1 per action, +-1 per box on/off a target) nearly every GRPO group has reward
    # variance even when no rollout succeeds, the group-std normalisation turns it into unit-size
    # advantages, and every run we made learned to take fewer actions (6.4 -> 2.8 per episode) and
    # lost held-out success (0.32 -> 0.11 greedy in 40 steps); with this reward it stays level.
    c.env.options.step_penalty = 0.0
    c.env.options.box_on_reward = 0.0
    c.env.options.box_off_penalty = 0.0


def _frozenlake(c):
    # gym's rewards are already success-only (1 at the goal) and a valid turn costs nothing, so the
    # default format penalty (-0.1) is already worse than any valid turn. The lake is slippery (the
    # executed move is the intended one with probability 1/3), as in RAGEN: a held-out success rate
    # is bounded well below 1 even for the solver. Five turns (the env's default) leave room for
    # slips.
    del c


def _sudoku(c):
    # The env's own rewards (+0.1 per correct fill, -0.1 per wrong one, +1 on solving); an invalid
    # turn (-0.1) costs as much as one wrong fill. 4x4 with 10 givens: 6 cells to fill in at most
    # ceil((6 + 4) / 3) + 1 = 5 turns.
    del c


def _webshop(c):
    # A host (Python) environment: the turn loop runs on the host, pages are stepped in Python.
    c.rollout.path = "host"
    # 512 held-out goals, as the other environments' 512 held-out tasks: the synthetic catalog's
    # default 500 goals hold only 50 test goals (its 200 products are each the target of ~13 goals
    # with different options and instructions).
    c.env.options.num_goals = 2560
    c.env.options.test_fraction = 0.2
    # Demonstrations (data/webshop_demos.py) are 840-1100 tokens without noise and up to ~2000
    # with epsilon 0.3 (a detour costs two turns of ~150-250 page tokens); 1536 keeps all but the
    # longest noisy ones whole. On a 2-core CPU this SFT is ~5x Sokoban's per step: a GPU job.
    c.sft.max_len = 1536
    # Rollouts and updates sized to what the episodes use (~900-2,000 tokens), not the budget
    # (9 turns x 384-token pages: ~3,900 slots): the update trims its batch to the longest episode.
    c.train.trim_block = 256
    # A 64-episode batch of ~2,500-token episodes keeps ~1.6 GiB of attention tensors per layer
    # and minibatch for the backward pass: without recomputation the first update ran out of 24 GiB.
    c.model.remat = True


_ENV = {"sokoban": _sokoban, "frozenlake": _frozenlake, "sudoku": _sudoku, "webshop": _webshop}


def get_config(env: str = "sokoban"):
    env = env or "sokoban"
    if env not in _ENV:
        raise ValueError(
            f"recipe.py has no settings for env {env!r}; use one of {sorted(_ENV)} "
            "(e.g. --config=experiments/configs/recipe.py:frozenlake)"
        )
    c = get_base_config(env, "tiny")
    c.workdir = f"runs/recipe_{env}"
    # 512 held-out tasks (the train tasks do not depend on it): with 128 a held-out success rate
    # has a standard error of ~0.04, larger than anything 40 RL steps did to it.
    c.data.num_test = 512
    # 600 steps: on Sokoban token accuracy plateaus at ~0.78 for the first ~150 steps (format and
    # template learned, positions not read off the grid: greedy held-out success 0.11) and then
    # climbs to ~0.95 (greedy held-out success 0.39).
    c.sft.steps = 600
    c.sft.max_len = 320
    c.sft.num_tasks = 512
    c.sft.demos_per_task = 1
    c.sft.epsilon = 0.3
    c.sft.learning_rate = 2e-3
    # The demonstrations' <think> describes the state only and the answer makes the decision
    # ("state" style). With the "plan" style (<think> narrates the moves the answer then copies)
    # the decisions sit in reasoning tokens, which ActFocus down-weights: on Sokoban ActFocus-GRPO
    # then did worse than not learning at all (train success 0.21 vs 0.24 over the same 30 task
    # batches); the state-style warm start is also stronger (held-out greedy 0.398 vs 0.320,
    # sampled 0.320 vs 0.266) and its bottleneck statistic puts the signal in the action tokens.
    c.sft.reasoning = "state"
    c.optim.learning_rate = 1e-4
    # GRPO's in-loss KL to the warm start (k3, Shao et al. 2024). At this budget most of what an
    # update does is drift: with the advantages shuffled across the batch (no reward signal) 40
    # steps cost -0.043 greedy / -0.026 sampled held-out success on Sokoban. With the KL anchor
    # ActFocus-GRPO did better than without it in each of 3 seeds (held-out greedy gain -0.025 ->
    # +0.006, sampled +0.032 -> +0.045, seed means; README); 0.3 held the policy too close.
    c.algo.kl_coef = 0.05
    c.train.steps = 40
    # No periodic held-out evaluation: at 512 tasks each costs ~40 s; the main job evaluates the
    # warm start and the final policy (greedy and sampled) instead.
    c.train.eval_every = 0
    c.train.save_every = 10
    c.eval.num_tasks = 512
    c.eval.batch_size = 128
    # Sampled evaluation: 2 episodes per task. Both evaluations (warm start, final) use the same
    # tasks and sampling keys, so the gain is reported paired by task.
    c.eval.samples_per_task = 2
    _ENV[env](c)  # last: an environment may need one of the shared sizes changed
    return c
