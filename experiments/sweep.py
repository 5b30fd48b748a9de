"""A grid of config overrides x seeds, each run in its own work directory.

    python -m experiments.sweep --config=experiments/configs/sokoban.py:tiny --workdir=runs/sweep \\
        --grid="actfocus.alpha=0,0.1,1;algo.algo=grpo,ppo" --seeds=0,1,2 --parallel=2 \\
        [--init=hf:runs/x/sft] [--resume] [--dry_run]

``--grid="actfocus.alpha=0,0.3|actfocus.beta=0|actfocus.scope=turn"`` is a union of grids (``|``
between them, see :mod:`experiments.grid`): a one-factor-at-a-time ablation, each run changing one
field of the config, in the order written (duplicates run once). Runs ``python -m
experiments.train`` for every combination (one after another, or ``--parallel`` processes at a
time); run directories are named after their overrides, e.g.
``runs/sweep/actfocus.alpha=0.1,algo.algo=ppo,seed=2``. A run that already finished (its
``rl/summary.json`` exists) is skipped, so an interrupted sweep can be restarted; with ``--resume``
an unfinished run that saved a checkpoint continues from its latest one (``experiments.train
--resume``, which continues exactly where the run stopped) instead of starting again.

``--resume`` also extends finished runs to more steps: copy each run's last checkpoint and
``metrics.jsonl`` into a new sweep directory (``<new>/<run>/rl/checkpoints/<step>``,
``<new>/<run>/rl/metrics.jsonl``) and run the same grid there with
``--override=train.steps=<more>``; the learning rate is constant after its warm-up, so the extended
run is the run that would have been trained for that many steps from the start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags

from experiments.grid import expand

GRID = flags.DEFINE_string(
    "grid",
    "",
    "Overrides: 'a.b=v1,v2;c=w1,w2' (';' between fields, '|' between grids run one after another).",
)
SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (comma-separated).")
PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time.")
INIT = flags.DEFINE_string("init", None, "--config.model.init for every run (e.g. hf:<sft dir>).")
CONFIG_FILE = flags.DEFINE_string(
    "config", "experiments/configs/sokoban.py:tiny", "Config file of every run."
)
WORKDIR = flags.DEFINE_string("workdir", "runs/sweep", "Parent directory of the runs.")
EXTRA = flags.DEFINE_multi_string("override", [], "Extra --config.<field>=<value> for every run.")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands only.")
RESUME = flags.DEFINE_bool(
    "resume",
    False,
    "Unfinished runs with a checkpoint continue from their latest one (experiments.train --resume).",
)


def has_checkpoint(workdir: str) -> bool:
    """Whether ``<workdir>/rl/checkpoints`` holds a finished checkpoint (a directory named by its
    step; orbax's unfinished ones carry a temporary suffix)."""
    ckpt_dir = os.path.join(workdir, "rl", "checkpoints")
    return os.path.isdir(ckpt_dir) and any(
        name.isdigit() and os.path.isdir(os.path.join(ckpt_dir, name))
        for name in os.listdir(ckpt_dir)
    )


def command(run: dict[str, str], workdir: str) -> list[str]:
    cmd = [sys.executable, "-m", "experiments.train", f"--config={CONFIG_FILE.value}"]
    cmd += [f"--config.{k}={v}" for k, v in run.items()]
    cmd += [f"--config.{o.removeprefix('--config.')}" for o in EXTRA.value]
    if INIT.value:
        cmd.append(f"--config.model.init={INIT.value}")
    cmd.append(f"--workdir={workdir}")
    if RESUME.value and has_checkpoint(workdir):
        cmd.append("--resume")
    return cmd


def main(argv: list[str]) -> None:
    del argv
    todo = []
    for run in expand(GRID.value, SEEDS.value):
        name = ",".join(f"{k}={v}" for k, v in run.items())
        workdir = os.path.join(WORKDIR.value, name)
        if os.path.exists(os.path.join(workdir, "rl", "summary.json")):
            print(f"[sweep] done already: {name}")
            continue
        todo.append((name, command(run, workdir), workdir))
    print(f"[sweep] {len(todo)} runs, {PARALLEL.value} at a time")
    if DRY_RUN.value:
        for _, cmd, _ in todo:
            print(" ".join(cmd))
        return
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    while todo or running:
        while todo and len(running) < PARALLEL.value:
            name, cmd, workdir = todo.pop(0)
            os.makedirs(workdir, exist_ok=True)
            log = open(os.path.join(workdir, "sweep.log"), "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
            print(f"[sweep] started {name}")
        time.sleep(1.0)
        for item in list(running):
            name, proc = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"[sweep] finished {name} (exit {proc.returncode})")
                if proc.returncode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"[sweep] {len(failed)} runs failed: {failed} (see their sweep.log)")


if __name__ == "__main__":
    app.run(main)
