"""Metrics logging: JSONL records, resume truncation, flatten_metrics on chex dataclasses,
TensorBoard event files, the summary table and the learning-curve plot."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from actfocus_jax.train.logging import (
    MetricsLogger,
    flatten_metrics,
    plot_curves,
    read_metrics,
    summary_table,
)


@chex.dataclass
class Inner:
    action_mass_frac: chex.Array
    per_token: chex.Array  # not a scalar: skipped


@chex.dataclass
class Outer:
    loss: chex.Array
    grad_norm: float
    actfocus: Inner


def test_flatten_metrics_nested_chex():
    m = Outer(
        loss=jnp.float32(0.25),
        grad_norm=1.5,
        actfocus=Inner(action_mass_frac=jnp.asarray([0.125]), per_token=jnp.ones((2, 3))),
    )
    flat = flatten_metrics({"train": m, "eval": {"success": np.float64(0.75), "name": "x"}})
    assert flat == {
        "train/loss": 0.25,
        "train/grad_norm": 1.5,
        "train/actfocus/action_mass_frac": 0.125,
        "eval/success": 0.75,
    }
    assert all(type(v) is float for v in flat.values())
    assert flatten_metrics(m, "train/") == {
        "train/loss": 0.25,
        "train/grad_norm": 1.5,
        "train/actfocus/action_mass_frac": 0.125,
    }
    assert flatten_metrics({"ok": True, "n": 3, "none": None, "v": [1.0, jnp.ones(2)]}) == {
        "ok": 1.0,
        "n": 3.0,
        "v/0": 1.0,
    }


def _run(workdir, steps, *, resume_step=None, tb=False):
    with MetricsLogger(
        workdir, use_tensorboard=tb, console=False, resume_step=resume_step
    ) as logger:
        for s in steps:
            logger.log(
                s, {"loss": 1.0 / s, "actfocus": {"action_mass_frac": 0.01 * s}}, prefix="train"
            )
            if s % 2 == 0:
                logger.log(s, {"success": s / 10}, prefix="eval")  # merged into the same record


def _strip_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_jsonl_records_and_resume_truncation(tmp_path):
    _run(tmp_path / "ref", range(1, 9))
    ref = read_metrics(tmp_path / "ref")
    assert [r["step"] for r in ref] == list(range(1, 9))
    assert ref[1] == {
        "step": 2,
        "time": ref[1]["time"],
        "train/loss": 0.5,
        "train/actfocus/action_mass_frac": 0.02,
        "eval/success": 0.2,
    }
    assert "eval/success" not in ref[0]

    # Interrupted run: logged up to step 6 (and a torn line), checkpoint at step 4, then resumed.
    run = tmp_path / "run"
    _run(run, range(1, 7))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')
    _run(run, range(5, 9), resume_step=4)
    got = read_metrics(run)
    assert _strip_time(got) == _strip_time(ref)
    # A fresh run replaces the file.
    _run(run, [1])
    assert [r["step"] for r in read_metrics(run)] == [1]


def test_out_of_order_steps_ignored(tmp_path, caplog):
    with MetricsLogger(tmp_path, use_tensorboard=False, console=False) as logger:
        logger.log(2, {"a": 1.0})
        logger.log(3, {"a": 2.0})
        logger.log(1, {"a": 3.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 3]
    assert "ignoring metrics of step 1" in caplog.text


def test_tensorboard_and_console(tmp_path, capsys):
    with MetricsLogger(tmp_path, console=True, total_steps=3) as logger:
        for s in (1, 2, 3):
            logger.log(s, {"train/loss": 0.5, "eval/success": 0.25})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert b"train/loss" in events[0].read_bytes()
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=0.5" in err and "success=0.25" in err


def test_summary_table_and_plot(tmp_path):
    records = [
        {"step": s, "train/loss": 1.0 / s, "eval/success": [0.1, 0.6, 0.4][s - 1]}
        for s in (1, 2, 3)
    ]
    records.append({"step": 4, "train/loss": None})  # a NaN loss is stored as null
    table = summary_table(records, ["train/loss", "eval/success", "missing"])
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "final", "@step", "best", "@step", "mode", "n"]
    assert lines[2].split() == ["train/loss", "0.333333", "3", "0.333333", "3", "min", "3"]
    assert lines[3].split() == ["eval/success", "0.4", "3", "0.6", "2", "max", "3"]
    assert lines[4].split()[0] == "missing"
    assert (
        summary_table(records, ["train/loss"], modes={"train/loss": "max"})
        .splitlines()[2]
        .split()[3]
        == "1"
    )
    out = plot_curves(
        records, ["train/loss", "eval/success", "missing"], tmp_path / "c.png", smooth=0.5
    )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError):
        plot_curves(records, [], tmp_path / "x.png")


def test_write_report(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False, console=False) as logger:
        for s in range(1, 6):
            logger.log(s, {"train/loss": float(6 - s), "eval/success": s / 5})
        table = logger.write_report(["train/loss", "eval/success"])
    assert (tmp_path / "summary.txt").read_text().strip() == table
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "eval/success" in table
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["eval/success"] == 1.0
