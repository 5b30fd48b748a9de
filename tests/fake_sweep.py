"""A hand-built sweep directory in the layout ``experiments/sweep.py`` + the trainer write.

Only the files that :mod:`actfocus_jax.analysis.results` reads: ``<run>/rl/metrics.jsonl`` (one
record per step, periodic greedy evaluations as ``eval/<metric>``) and ``<run>/rl/summary.json``
(``final/greedy/<m>`` and ``final/sampled/<m>`` at step ``steps``), plus the ``sweep.log`` the
sweep writes. ``tests/test_notebooks.py`` checks that a real tiny run has the same layout.
"""

import json
import os

#: ``{variant: {seed: (eval greedy success at steps 2 and 4, final sampled success)}}``. At
#: step 4 (the last) the greedy success of ``summary.json`` is the periodic evaluation's value.
FAKE_SWEEP = {
    "actfocus.enabled=true": {"0": ((0.25, 0.5), 0.375), "1": ((0.5, 0.25), 0.5)},
    "actfocus.enabled=false": {"0": ((0.125, 0.25), 0.25), "1": ((0.25, 0.5), 0.125)},
}
STEPS = 4
EVAL_EVERY = 2


def write_fake_run(run_dir, greedy, sampled_final, *, steps=STEPS, eval_every=EVAL_EVERY):
    """One finished run: ``greedy`` = eval success at steps ``eval_every, 2*eval_every, ...``."""
    rl = os.path.join(run_dir, "rl")
    os.makedirs(rl, exist_ok=True)
    evals = dict(zip(range(eval_every, steps + 1, eval_every), greedy))
    with open(os.path.join(rl, "metrics.jsonl"), "w") as f:
        for step in range(1, steps + 1):
            rec = {
                "step": step,
                "time": 1.0e9 + step,
                "rollout/success": 0.1 * step,
                "rollout/return": 0.5 * step - 1.0,
                "train/loss": 1.0 / step,
                "bottleneck/action_density": 2.0 + 0.1 * step,
                "bottleneck/reasoning_density": 1.0,
            }
            if step in evals:
                rec["eval/success"] = evals[step]
                rec["eval/return"] = 10.0 * evals[step] - 1.0
            f.write(json.dumps(rec) + "\n")
    final = {
        "final/greedy/success": greedy[-1],
        "final/greedy/return": 10.0 * greedy[-1] - 1.0,
        "final/sampled/success": sampled_final,
        "final/sampled/return": 10.0 * sampled_final - 1.0,
    }
    with open(os.path.join(rl, "summary.json"), "w") as f:
        json.dump({"final": final, "steps": steps, "workdir": rl}, f)
    with open(os.path.join(run_dir, "sweep.log"), "w") as f:
        f.write("fake run\n")


def write_fake_sweep(sweep_dir, spec=None):
    """Writes :data:`FAKE_SWEEP` (or ``spec``) under ``sweep_dir``; returns the run names."""
    names = []
    for variant, seeds in (spec or FAKE_SWEEP).items():
        for seed, (greedy, sampled) in seeds.items():
            name = f"{variant},seed={seed}"
            write_fake_run(os.path.join(sweep_dir, name), greedy, sampled)
            names.append(name)
    return names
