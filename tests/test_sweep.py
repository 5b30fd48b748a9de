"""experiments/grid.py and experiments/sweep.py: grid parsing, products, unions of grids
(one-factor ablations), dry run. (experiments.sweep itself defines absl flags, so it is only run
as a subprocess here: importing it next to another entry point would define --config twice.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from experiments import grid as sweep


def test_product_grid_in_order_with_seeds():
    grid = sweep.parse_grid("a=1,2; b=x")
    assert grid == [("a", ["1", "2"]), ("b", ["x"])]
    assert sweep.runs(grid, ["0", "1"]) == [
        {"a": "1", "b": "x", "seed": "0"},
        {"a": "1", "b": "x", "seed": "1"},
        {"a": "2", "b": "x", "seed": "0"},
        {"a": "2", "b": "x", "seed": "1"},
    ]


def test_union_of_grids_changes_one_field_per_run_and_drops_duplicates():
    got = sweep.expand("a=0,1|b=x|a=1;c=2|a=0", ["0"])
    assert got == [
        {"a": "0", "seed": "0"},
        {"a": "1", "seed": "0"},
        {"b": "x", "seed": "0"},
        {"a": "1", "c": "2", "seed": "0"},
    ]
    # An empty grid is one run of the config itself per seed.
    assert sweep.expand("", ["3", "4"]) == [{"seed": "3"}, {"seed": "4"}]


@pytest.mark.parametrize("bad", ["a=1||b=2", "a", "a=", "a=1|"])
def test_malformed_grids_are_refused(bad):
    with pytest.raises(ValueError, match="grid"):
        sweep.expand(bad, ["0"])


def dry_run(workdir, *flags):
    """``experiments.sweep --dry_run --workdir=<workdir> <flags>``: its stdout."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--dry_run", f"--workdir={workdir}", *flags],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_dry_run_prints_one_command_per_run(tmp_path):
    out = dry_run(
        tmp_path,
        "--grid=actfocus.alpha=0,0.3|actfocus.scope=turn",
        "--seeds=0,1",
        "--override=algo.kl_coef=0",
    )
    cmds = [line for line in out.splitlines() if "experiments.train" in line]
    assert len(cmds) == 6
    assert sum("--config.actfocus.scope=turn" in c for c in cmds) == 2
    assert all("--config.algo.kl_coef=0" in c for c in cmds)
    assert not any("alpha" in c and "scope" in c for c in cmds)
    assert f"--workdir={tmp_path}/actfocus.scope=turn,seed=1" in out


def test_resume_continues_only_runs_with_a_finished_checkpoint(tmp_path):
    """--resume passes experiments.train --resume to a run whose rl/checkpoints holds a finished
    (numbered) checkpoint, not to one with only orbax's unfinished temporary directory or none; a
    run with rl/summary.json is skipped either way; without --resume nothing is resumed."""
    ckpt = lambda run: tmp_path / run / "rl" / "checkpoints"
    (ckpt("actfocus.alpha=0,seed=0") / "40").mkdir(parents=True)
    (ckpt("actfocus.alpha=0,seed=1") / "20.orbax-checkpoint-tmp-1234").mkdir(parents=True)
    (ckpt("actfocus.alpha=0.3,seed=1") / "40").mkdir(parents=True)
    (tmp_path / "actfocus.alpha=0.3,seed=1" / "rl" / "summary.json").write_text("{}")

    def commands(*extra):
        out = dry_run(tmp_path, "--grid=actfocus.alpha=0,0.3", "--seeds=0,1", *extra)
        lines = [line for line in out.splitlines() if "experiments.train" in line]
        return {line.split("--workdir=")[1].split()[0]: line for line in lines}

    cmds = commands("--resume")
    assert sorted(cmds) == [
        f"{tmp_path}/actfocus.alpha=0,seed=0",
        f"{tmp_path}/actfocus.alpha=0,seed=1",
        f"{tmp_path}/actfocus.alpha=0.3,seed=0",
    ]  # the finished run is skipped
    resumed = {w for w, c in cmds.items() if c.endswith(" --resume")}
    assert resumed == {f"{tmp_path}/actfocus.alpha=0,seed=0"}
    assert not any(c.endswith("--resume") for c in commands().values())
