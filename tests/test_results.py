"""Sweep aggregation: Student-t quantiles and intervals vs known values / plain-float64
references, and the per-variant tables of a hand-built sweep directory (tests/fake_sweep.py)."""

import json
import math
import os
import subprocess
import sys

import pytest
from fake_sweep import FAKE_SWEEP, write_fake_run, write_fake_sweep

from actfocus_jax.analysis import results as R

# Two-sided 95% / 90% / 99% critical values of Student's t (standard tables).
T_TABLE = [
    (0.975, 1, 12.7062),
    (0.975, 2, 4.3027),
    (0.975, 3, 3.1824),
    (0.975, 4, 2.7764),
    (0.975, 5, 2.5706),
    (0.975, 10, 2.2281),
    (0.975, 30, 2.0423),
    (0.95, 1, 6.3138),
    (0.95, 5, 2.0150),
    (0.995, 9, 3.2498),
]


@pytest.mark.parametrize("p,df,expected", T_TABLE)
def test_t_quantile_matches_tables(p, df, expected):
    q = R.t_quantile(p, df)
    assert q == pytest.approx(expected, abs=1e-4)
    assert R.t_quantile(1 - p, df) == pytest.approx(-q, abs=1e-12)
    assert R.t_cdf(q, df) == pytest.approx(p, abs=1e-10)


def test_t_cdf_closed_forms():
    # df=1 is the Cauchy distribution; df=2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-3.0, -0.4, 0.0, 0.7, 1.0, 25.0):
        assert R.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
        assert R.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
    assert R.t_cdf(math.inf, 3) == 1.0 and R.t_cdf(-math.inf, 3) == 0.0
    # Large df tends to the normal: 97.5% quantile 1.95996.
    assert R.t_quantile(0.975, 20000) == pytest.approx(1.95996, abs=2e-4)
    for t in (-2.0, 0.3, 1.5):  # symmetric
        assert R.t_cdf(t, 7) + R.t_cdf(-t, 7) == pytest.approx(1.0, abs=1e-14)
    with pytest.raises(ValueError):
        R.t_cdf(1.0, 2.5)
    with pytest.raises(ValueError):
        R.t_quantile(1.0, 3)


def _reference_ci(xs, t_crit):
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, sd, t_crit * sd / math.sqrt(n)


@pytest.mark.parametrize(
    "xs,t_crit",
    [
        ([0.25, 0.5, 0.375], 4.302653),
        ([0.1, 0.9, 0.4, 0.6, 0.3], 2.776445),
        ([1.0, 3.0], 12.706205),
    ],
)
def test_mean_ci_matches_float64_reference(xs, t_crit):
    m, sd, h = _reference_ci(xs, t_crit)
    ci = R.mean_ci(xs)
    assert ci["n"] == len(xs)
    assert ci["mean"] == pytest.approx(m, rel=1e-12)
    assert ci["std"] == pytest.approx(sd, rel=1e-12)
    assert ci["half_width"] == pytest.approx(h, rel=1e-6)
    assert (ci["lo"], ci["hi"]) == (pytest.approx(m - h, rel=1e-6), pytest.approx(m + h, rel=1e-6))


def test_mean_ci_degenerate_cases():
    one = R.mean_ci([0.5])
    assert one["mean"] == 0.5 and one["n"] == 1 and one["lo"] is None and one["std"] is None
    empty = R.mean_ci([None, float("nan")])
    assert empty["n"] == 0 and empty["mean"] is None
    same = R.mean_ci([0.2, 0.2, 0.2])
    assert same["half_width"] == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError):
        R.mean_ci([1.0, 2.0], confidence=1.0)


def test_parse_run_name():
    assert R.parse_run_name("actfocus.alpha=0.1,algo.algo=ppo,seed=2") == (
        "actfocus.alpha=0.1,algo.algo=ppo",
        "2",
    )
    assert R.parse_run_name("seed=3") == ("(base)", "3")
    assert R.parse_run_name("main") == ("main", None)


def test_eval_points_merge_periodic_final_and_warm_start():
    records = [
        {"step": 1, "train/loss": 1.0},
        {"step": 2, "eval/success": 0.25, "eval/sampled/success": 0.5},
        {"step": 4, "eval/success": 0.5},
    ]
    summary = {"steps": 4, "final": {"final/greedy/success": 0.75, "final/sampled/success": 0.1}}
    pts = R.eval_points(records, summary, {"greedy/success": 0.0, "note": "x"})
    assert pts == {
        0: {"greedy/success": 0.0},
        2: {"greedy/success": 0.25, "sampled/success": 0.5},
        4: {"greedy/success": 0.75, "sampled/success": 0.1},
    }
    out = R.run_outcomes(pts, ["greedy/success", "sampled/success", "greedy/return"])
    assert out["greedy/success"] == {"final": 0.75, "final_step": 4, "best": 0.75, "best_step": 4}
    assert out["sampled/success"] == {"final": 0.1, "final_step": 4, "best": 0.5, "best_step": 2}
    assert "greedy/return" not in out


def test_aggregate_fake_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    names = write_fake_sweep(sweep)
    # An unfinished run (no summary.json) is skipped by default.
    os.makedirs(sweep / "actfocus.enabled=true,seed=2" / "rl")
    (sweep / "actfocus.enabled=true,seed=2" / "rl" / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "eval/success": 1.0}) + "\n"
    )
    agg = R.aggregate_sweep(sweep)
    assert agg["skipped"] == ["actfocus.enabled=true,seed=2"]
    assert [v["variant"] for v in agg["variants"]] == [
        "actfocus.enabled=false",
        "actfocus.enabled=true",
    ]
    assert sorted(r for v in agg["variants"] for r in v["runs"]) == sorted(names)
    for v in agg["variants"]:
        spec = FAKE_SWEEP[v["variant"]]
        assert v["seeds"] == ["0", "1"] and v["n_runs"] == 2
        g = v["metrics"]["greedy/success"]
        finals = [spec[s][0][-1] for s in ("0", "1")]
        bests = [max(spec[s][0]) for s in ("0", "1")]
        m, _, h = _reference_ci(finals, 12.706205)
        assert g["final"]["n"] == 2
        assert g["final"]["mean"] == pytest.approx(m) and g["final"]["half_width"] == pytest.approx(
            h, rel=1e-6
        )
        assert g["best"]["mean"] == pytest.approx(sum(bests) / 2)
        assert g["final_step"] == [4, 4]
        # Best step shared by both seeds: the step with the highest mean over seeds.
        means = {s: sum(spec[k][0][i] for k in ("0", "1")) / 2 for i, s in enumerate((2, 4))}
        best_common = max(means, key=means.get)
        assert g["best_common_step"]["step"] == best_common
        assert g["best_common_step"]["mean"] == pytest.approx(means[best_common])
        sampled = v["metrics"]["sampled/success"]
        assert sampled["final"]["mean"] == pytest.approx(sum(spec[s][1] for s in ("0", "1")) / 2)
        assert sampled["best_step"] == [4, 4]  # sampled is evaluated at the end only
    with_incomplete = R.aggregate_sweep(sweep, include_incomplete=True)
    v = next(v for v in with_incomplete["variants"] if v["variant"] == "actfocus.enabled=true")
    assert v["n_runs"] == 3 and v["metrics"]["greedy/success"]["best"]["n"] == 3
    assert v["metrics"]["sampled/success"]["final"]["n"] == 2

    md = R.markdown_table(agg)
    assert md.splitlines()[0].startswith("| variant | metric | n |")
    assert "actfocus.enabled=true | greedy/success | 2 |" in md
    assert "Skipped (incomplete)" in md
    text = R.text_table(agg)
    assert "sampled/success" in text and "±" in text


def test_seed_curves(tmp_path):
    write_fake_sweep(tmp_path)
    curves = R.seed_curves(R.read_sweep(tmp_path), "eval/success")
    c = curves["actfocus.enabled=true"]
    assert c["step"] == [2, 4] and c["n"] == [2, 2]
    assert c["mean"] == pytest.approx([0.375, 0.375])
    assert c["lo"][0] < c["mean"][0] < c["hi"][0]


def run_aggregate(*flags: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m experiments.aggregate <flags>`` from the repository root (must succeed unless
    ``check=False``)."""
    return subprocess.run(
        [sys.executable, "-m", "experiments.aggregate", *flags],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        check=check,
    )


def test_aggregate_cli_writes_json_and_markdown(tmp_path):
    write_fake_sweep(tmp_path / "sweep")
    out = run_aggregate(f"--sweep_dir={tmp_path / 'sweep'}")
    assert "greedy/success" in out.stdout
    agg = json.loads((tmp_path / "sweep" / "aggregate.json").read_text())
    assert len(agg["variants"]) == 2
    assert (tmp_path / "sweep" / "aggregate.md").read_text().startswith("| variant")
    # --metrics= (e.g. only paired gains wanted): one line instead of an empty table.
    out = run_aggregate(f"--sweep_dir={tmp_path / 'sweep'}", "--metrics=")
    line = (
        "No final-step held-out metrics to tabulate (metrics asked for: none (--metrics is empty))."
    )
    assert line in out.stdout and "best common step" not in out.stdout
    assert (tmp_path / "sweep" / "aggregate.md").read_text().startswith(line)


def test_paired_gain_matches_numpy_and_flags_unpaired_runs():
    import numpy as np

    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.0, 0.6, 30)  # per-step level difficulty shared by both runs
    gain = np.linspace(0.0, 0.1, 30)
    ctrl = [{"step": s + 1, "rollout/success": float(difficulty[s])} for s in range(30)]
    run = [{"step": s + 1, "rollout/success": float(difficulty[s] + gain[s])} for s in range(30)]
    run.append({"step": 31, "rollout/success": 1.0})  # not in the control: ignored
    g = R.paired_gain({"records": run}, {"records": ctrl}, steps=(11, 30))
    d = gain[10:30]
    half = 2.093024054408263 * d.std(ddof=1) / np.sqrt(len(d))  # t_{0.975, 19}
    assert g["steps"] == [11, 30, 20] and g["same_first_step"]
    assert math.isclose(g["mean"], d.mean(), abs_tol=1e-12)
    assert math.isclose(g["half_width"], half, rel_tol=1e-9)
    shifted = [dict(r, **{"rollout/success": r["rollout/success"] + 0.01}) for r in run]
    assert not R.paired_gain({"records": shifted}, {"records": ctrl})["same_first_step"]
    empty = R.paired_gain({"records": run}, {"records": ctrl}, steps=(40, 50))
    assert empty["n"] == 0 and empty["mean"] is None and empty["steps"] == [None, None, 0]


def test_paired_task_gain_matches_numpy_and_removes_task_difficulty():
    import numpy as np

    rng = np.random.default_rng(1)
    n, k = 64, 4
    difficulty = rng.uniform(0.0, 1.0, n)  # per-task success probability, shared by both
    before = rng.binomial(k, difficulty) / k
    after = np.clip(before + rng.choice([0.0, 0.25], n, p=[0.7, 0.3]), 0.0, 1.0)
    g = R.paired_task_gain(before.tolist(), after.tolist())
    d = after - before
    half = 1.9983405417 * d.std(ddof=1) / np.sqrt(n)  # t_{0.975, 63}
    assert math.isclose(g["mean"], d.mean(), abs_tol=1e-12)
    assert math.isclose(g["half_width"], half, rel_tol=1e-7)
    assert math.isclose(g["after"] - g["before"], d.mean(), abs_tol=1e-12)
    assert (g["better"], g["worse"], g["n"]) == (int((d > 0).sum()), int((d < 0).sum()), n)
    # Pairing is the point: the unpaired standard error of the difference is several times larger.
    unpaired = np.sqrt(before.var(ddof=1) / n + after.var(ddof=1) / n)
    assert g["half_width"] < 0.5 * 1.9983405417 * unpaired
    with pytest.raises(ValueError, match="same tasks"):
        R.paired_task_gain([0.0, 1.0], [1.0])


def test_aggregate_cli_paired_gain_over_a_control(tmp_path):
    write_fake_sweep(tmp_path / "sweep")
    write_fake_run(tmp_path / "control", (0.0, 0.0), 0.0)
    out = run_aggregate(
        f"--sweep_dir={tmp_path / 'sweep'}", f"--control={tmp_path / 'control'}", "--gain_steps=2,4"
    )
    assert "paired gain" in out.stdout
    agg = json.loads((tmp_path / "sweep" / "aggregate.json").read_text())
    gains = agg["paired_gain"]["runs"]
    assert len(gains) == 4  # the fake runs all log rollout/success = 0.1 * step, as the control
    assert all(g["mean"] == 0.0 and g["steps"] == [2, 4, 3] for g in gains.values())


def test_held_out_gains_per_run_and_over_seeds(tmp_path):
    import numpy as np

    rng = np.random.default_rng(2)
    base = {"greedy": rng.integers(0, 2, 40).astype(float).tolist(), "sampled": [0.5] * 40}
    names = write_fake_sweep(tmp_path / "sweep")
    truth = {}
    for i, name in enumerate(names):
        after = {
            "greedy": np.clip(np.asarray(base["greedy"]) + (rng.random(40) < 0.1 * i), 0, 1),
            "sampled": np.asarray(base["sampled"]) + 0.01 * i,
        }
        (tmp_path / "sweep" / name / "rl" / "final_per_task.json").write_text(
            json.dumps({k: v.tolist() for k, v in after.items()})
        )
        truth[name] = {m: float(np.mean(after[m] - np.asarray(base[m]))) for m in after}
    runs = R.read_sweep(tmp_path / "sweep")
    hg = R.held_out_gains(runs, base)
    for name, gains in hg["runs"].items():
        for m, g in gains.items():
            assert math.isclose(g["mean"], truth[name][m], abs_tol=1e-12)
    for variant, gains in hg["variants"].items():
        seeds = [truth[r["name"]] for r in runs if r["variant"] == variant]
        for m, ci in gains.items():
            xs = np.asarray([t[m] for t in seeds])
            assert ci["n"] == len(xs) and math.isclose(ci["mean"], xs.mean(), abs_tol=1e-12)
    # The CLI writes the same numbers.
    (tmp_path / "base.json").write_text(json.dumps(base))
    out = run_aggregate(
        f"--sweep_dir={tmp_path / 'sweep'}", f"--baseline_per_task={tmp_path / 'base.json'}"
    )
    assert "paired by task" in out.stdout
    agg = json.loads((tmp_path / "sweep" / "aggregate.json").read_text())["held_out_gain"]
    assert agg["variants"] == json.loads(json.dumps(hg["variants"]))
    # The Markdown tables: one row per run with its paired gains, one per variant over seeds.
    md = R.held_out_gain_markdown(hg)
    assert md in (tmp_path / "sweep" / "aggregate.md").read_text()
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[1] not in ("seed", "---"):
            rows[(cells[0], cells[1])] = cells
    assert len(rows) == len(runs)
    for r in runs:
        cells = rows[(r["variant"], r["seed"])]
        for j, m in enumerate(("greedy", "sampled")):
            g = hg["runs"][r["name"]][m]
            assert cells[2 + j].strip("*").startswith(f"{truth[r['name']][m]:+.3f} [")
            # Bold exactly when the interval excludes 0 (the sampled gains of runs i > 0 do).
            assert cells[2 + j].startswith("**") == (g["lo"] > 0 or g["hi"] < 0)
            assert cells[4 + j] == f"{g['after']:.3f}"
            assert cells[6 + j] == f"{g['better']} / {g['worse']}"
    for variant, gains in hg["variants"].items():
        line = next(
            x for x in md.splitlines() if x.startswith(f"| {variant} | {gains['greedy']['n']} |")
        )
        assert f"{gains['sampled']['mean']:+.3f}" in line


def test_reference_gains_pair_each_run_with_the_reference_of_its_seed(tmp_path):
    """A one-factor ablation against the default config's runs: each run is differenced from the
    reference of its own seed, task by task (NumPy float64 reference), never across seeds."""
    import numpy as np

    rng = np.random.default_rng(5)
    n = 64
    spec = {
        "actfocus.alpha=0": {"0": ((0.5, 0.5), 0.5), "1": ((0.5, 0.5), 0.5), "2": ((0.5,), 0.5)},
        "actfocus.beta=0": {"0": ((0.5, 0.5), 0.5)},
    }
    names = write_fake_sweep(tmp_path / "sweep", spec)
    refs, per_task = {}, {}
    for seed in ("0", "1"):
        d = tmp_path / "default" / f"algo.kl_coef=0.05,seed={seed}"
        write_fake_run(d, (0.5, 0.5), 0.5)
        refs[seed] = {m: rng.integers(0, 2, n).astype(float) for m in ("greedy", "sampled")}
        (d / "rl" / "final_per_task.json").write_text(
            json.dumps({m: v.tolist() for m, v in refs[seed].items()})
        )
    for name in names:
        per_task[name] = {m: rng.integers(0, 2, n).astype(float) for m in ("greedy", "sampled")}
        (tmp_path / "sweep" / name / "rl" / "final_per_task.json").write_text(
            json.dumps({m: v.tolist() for m, v in per_task[name].items()})
        )
    runs = R.read_sweep(tmp_path / "sweep")
    ref_runs = R.read_sweep(tmp_path / "default")
    rg = R.reference_gains(runs, ref_runs)
    assert rg["unmatched"] == ["actfocus.alpha=0,seed=2"]  # no reference of seed 2
    assert rg["references"] == {"0": ref_runs[0]["dir"], "1": ref_runs[1]["dir"]}
    assert set(rg["runs"]) == {
        "actfocus.alpha=0,seed=0",
        "actfocus.alpha=0,seed=1",
        "actfocus.beta=0,seed=0",
    }
    for name, gains in rg["runs"].items():
        seed = R.parse_run_name(name)[1]
        for m, g in gains.items():
            d = per_task[name][m] - refs[seed][m]
            half = 1.998341 * d.std(ddof=1) / math.sqrt(n)  # t_{0.975, 63} from tables
            assert math.isclose(g["mean"], d.mean(), abs_tol=1e-12)
            assert math.isclose(g["lo"], d.mean() - half, abs_tol=1e-5)
            assert math.isclose(g["hi"], d.mean() + half, abs_tol=1e-5)
            assert g["better"] == int((d > 0).sum()) and g["worse"] == int((d < 0).sum())
            assert math.isclose(g["before"], refs[seed][m].mean())
    alpha = rg["variants"]["actfocus.alpha=0"]["greedy"]
    means = [rg["runs"][f"actfocus.alpha=0,seed={s}"]["greedy"]["mean"] for s in ("0", "1")]
    assert alpha["n"] == 2 and math.isclose(alpha["mean"], float(np.mean(means)))
    # References that are also in the swept directory are not compared with themselves.
    assert R.reference_gains(ref_runs, ref_runs)["runs"] == {}
    # Two references of one seed, or one without per-task results, are refused with the fix.
    with pytest.raises(ValueError, match="two reference runs of seed 0"):
        R.reference_gains(runs, [ref_runs[0], ref_runs[0] | {"dir": "elsewhere"}])
    with pytest.raises(ValueError, match="--per_task_out"):
        R.reference_gains(runs, [ref_runs[0] | {"per_task": None}])
    # The CLI: the same numbers in aggregate.json, the table in aggregate.md.
    out = run_aggregate(
        f"--sweep_dir={tmp_path / 'sweep'}",
        f"--reference_run={ref_runs[0]['dir']}",  # run names hold commas: one flag per run
        f"--reference_run={ref_runs[1]['dir']}",
    )
    assert "reference run of the same seed" in out.stdout
    agg = json.loads((tmp_path / "sweep" / "aggregate.json").read_text())["reference_gain"]
    assert agg["variants"] == json.loads(json.dumps(rg["variants"]))
    md = (tmp_path / "sweep" / "aggregate.md").read_text()
    assert R.held_out_gain_markdown(rg) in md and "No reference of their seed" in md


def test_gain_by_seed_markdown_one_row_per_variant():
    """The compact README table: seeds as columns, bold per run and mode exactly when its
    interval excludes 0, a dash for a missing seed, the mean ± t half-width over seeds."""
    before = {"greedy": [0.0, 1.0, 0.0, 1.0] * 8, "sampled": [0.5] * 32}
    up = {"greedy": [1.0, 1.0, 0.0, 1.0] * 8, "sampled": [0.75] * 16 + [0.5] * 16}
    flat = {"greedy": [0.0, 1.0, 1.0, 0.0] * 8, "sampled": [0.5] * 32}
    runs = [
        {"name": f"{v},seed={s}", "variant": v, "seed": s, "dir": f"d/{v}{s}", "per_task": pt}
        for v, s, pt in [("a=1", "0", up), ("a=1", "1", flat), ("a=2", "0", flat)]
    ]
    hg = R.held_out_gains(runs, before)
    md = R.gain_by_seed_markdown(hg).splitlines()
    assert md[0] == (
        "| variant | seed 0 greedy / sampled gain | seed 1 greedy / sampled gain "
        "| mean greedy gain | mean sampled gain |"
    )
    a1 = hg["variants"]["a=1"]
    assert md[2] == (
        "| a=1 | **+0.250** / **+0.125** | +0.000 / +0.000 | "
        f"+0.125 ± {a1['greedy']['half_width']:.3f} | +0.062 ± {a1['sampled']['half_width']:.3f} |"
    )
    # One seed: no interval over seeds, and no entry for seed 1.
    assert md[3] == "| a=2 | +0.000 / +0.000 | - | +0.000 | +0.000 |"
    # t_{0.975, 1} = 12.706: the half-width over two seeds of gains 0.25 and 0.
    assert math.isclose(
        a1["greedy"]["half_width"], 12.7062 * 0.25 / math.sqrt(2) / math.sqrt(2), rel_tol=1e-4
    )
    assert R.gain_by_seed_markdown({"runs": {}}) == ""


def _write_sweep_with_per_task(root, spec, per_task):
    """A fake sweep (``write_fake_sweep``) whose runs have ``rl/final_per_task.json``."""
    names = write_fake_sweep(root, {v: {s: ((0.5, 0.5), 0.5) for s in seeds} for v, seeds in spec})
    for name in names:
        (root / name / "rl" / "final_per_task.json").write_text(
            json.dumps({m: list(v) for m, v in per_task[name].items()})
        )
    return names


def test_aggregate_cli_earlier_sweep_pairs_each_run_with_its_own_shorter_run(tmp_path):
    """--earlier_sweep: every run's held-out change from the run of the same name in the earlier
    sweep equals a NumPy float64 computation paired by task, and the per-variant mean and
    t-interval over seeds too; a run without an earlier twin is listed, a missing directory is
    refused by name."""
    import numpy as np

    rng = np.random.default_rng(8)
    n = 36
    draw = lambda: {m: rng.integers(0, 2, n).astype(float) for m in ("greedy", "sampled")}
    names = [f"{v},seed={s}" for v in ("a=1", "b=2") for s in "012"]
    before = {name: draw() for name in names}
    after = {name: draw() for name in names}
    _write_sweep_with_per_task(tmp_path / "old", [("a=1", "012"), ("b=2", "01")], before)
    _write_sweep_with_per_task(tmp_path / "new", [("a=1", "012"), ("b=2", "012")], after)
    run_aggregate(
        f"--sweep_dir={tmp_path / 'new'}",
        f"--earlier_sweep={tmp_path / 'old'}",
        "--compare=a=1|b=2",
    )
    agg = json.loads((tmp_path / "new" / "aggregate.json").read_text())
    eg = agg["earlier_gain"]
    assert "variant_differences" not in agg  # no baseline: only the changes are compared
    (pair,) = agg["earlier_variant_differences"]["pairs"]
    assert pair["seeds_a"] == ["0", "1", "2"] and pair["seeds_b"] == ["0", "1"]
    assert eg["unmatched"] == ["b=2,seed=2"] and sorted(eg["runs"]) == sorted(names[:-1])
    for m in ("greedy", "sampled"):
        changes = {}
        for name in names[:-1]:
            d = after[name][m] - before[name][m]
            g = eg["runs"][name][m]
            assert math.isclose(g["mean"], float(d.mean()), abs_tol=1e-12)
            half = R.t_quantile(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
            assert math.isclose(g["hi"] - g["mean"], half, rel_tol=1e-9)
        for v, seeds in (("a=1", "012"), ("b=2", "01")):
            means = [
                float(np.mean(after[f"{v},seed={s}"][m] - before[f"{v},seed={s}"][m]))
                for s in seeds
            ]
            ci = eg["variants"][v][m]
            assert ci["n"] == len(seeds) and math.isclose(
                ci["mean"], float(np.mean(means)), abs_tol=1e-12
            )
            changes[v] = means
        mean, se, df = _welch_reference(changes["a=1"], changes["b=2"])
        d = pair["modes"][m]
        assert math.isclose(d["mean"], mean, abs_tol=1e-12)
        assert math.isclose(d["se"], se, rel_tol=1e-9) and math.isclose(d["df"], df, rel_tol=1e-9)
    md = (tmp_path / "new" / "aggregate.md").read_text()
    assert "Held-out change from the same run in" in md and "a=1 minus b=2" in md
    out = run_aggregate(
        f"--sweep_dir={tmp_path / 'new'}", f"--earlier_sweep={tmp_path / 'gone'}", check=False
    )
    assert out.returncode != 0 and f"no sweep directory {tmp_path / 'gone'}" in out.stderr


def test_merge_gains_recomputes_over_the_union_of_sweeps(tmp_path):
    """An earlier sweep's aggregate.json (seeds 0-1, its run directories deleted) merged with a new
    sweep (seed 2, plus a re-run of one seed-1 run): the per-variant mean and t-interval over the
    three seeds equal a NumPy float64 computation over all runs; a re-run with other gains, another
    reference run or another baseline is refused."""
    import shutil

    import numpy as np

    rng = np.random.default_rng(11)
    n = 48
    draw = lambda: {m: rng.integers(0, 2, n).astype(float) for m in ("greedy", "sampled")}
    base = draw()
    (tmp_path / "base.json").write_text(json.dumps({m: v.tolist() for m, v in base.items()}))
    per_task = {f"{v},seed={s}": draw() for v in ("a=1", "b=2", "d=0") for s in "012"}
    per_task["a=1,seed=1"] = draw()
    old_spec = [("d=0", "01"), ("a=1", "01"), ("b=2", "0")]
    new_spec = [("d=0", "2"), ("a=1", "12"), ("b=2", "2")]  # a=1 seed 1 is run again
    _write_sweep_with_per_task(tmp_path / "old", old_spec, per_task)
    _write_sweep_with_per_task(tmp_path / "new", new_spec, per_task)

    def flags(sweep, *seeds):
        refs = [f"--reference_run={tmp_path / sweep / f'd=0,seed={s}'}" for s in seeds]
        base_flag = f"--baseline_per_task={tmp_path / 'base.json'}"
        return [f"--sweep_dir={tmp_path / sweep}", base_flag, *refs]

    run_aggregate(*flags("old", 0, 1))
    shutil.copy(tmp_path / "old" / "aggregate.json", tmp_path / "old.json")
    shutil.rmtree(tmp_path / "old")
    run_aggregate(*flags("new", 2), f"--merge={tmp_path / 'old.json'}")
    agg = json.loads((tmp_path / "new" / "aggregate.json").read_text())
    assert agg["merged_from"] == [str(tmp_path / "old.json")]

    t975 = {1: 12.706205, 2: 4.302653}  # t quantiles from tables
    for key, before in (("held_out_gain", lambda s: base), ("reference_gain", None)):
        sec = agg[key]
        # The new sweep has no seed-1 reference: its a=1 seed-1 run is compared in the old one only.
        assert sec["repeated"] == (["a=1,seed=1"] if before else [])
        assert sec.get("unmatched", []) == []
        for variant in ("a=1", "b=2", "d=0"):
            if key == "reference_gain" and variant == "d=0":
                assert variant not in sec["variants"]  # the reference is not compared with itself
                continue
            seeds = "012" if variant != "b=2" else "02"
            for m in ("greedy", "sampled"):
                gains = []
                for s in seeds:
                    ref = base if before else per_task[f"d=0,seed={s}"]
                    gains.append(float(np.mean(per_task[f"{variant},seed={s}"][m] - ref[m])))
                ci = sec["variants"][variant][m]
                xs = np.asarray(gains)
                half = t975[len(xs) - 1] * xs.std(ddof=1) / math.sqrt(len(xs))
                assert ci["n"] == len(xs)
                assert math.isclose(ci["mean"], xs.mean(), abs_tol=1e-12)
                assert math.isclose(ci["half_width"], half, rel_tol=1e-5)
    assert agg["reference_gain"]["references"] == {
        "0": str(tmp_path / "old" / "d=0,seed=0"),
        "1": str(tmp_path / "old" / "d=0,seed=1"),
        "2": str(tmp_path / "new" / "d=0,seed=2"),
    }
    md = (tmp_path / "new" / "aggregate.md").read_text()
    assert "also hold the runs of" in md and "identical gains: a=1,seed=1" in md

    # A re-run whose gains differ (another warm start, code or machine) is refused, by name.
    good = json.loads((tmp_path / "old.json").read_text())
    bad = json.loads(json.dumps(good))
    bad["held_out_gain"]["runs"]["a=1,seed=1"]["greedy"]["mean"] += 0.01
    with pytest.raises(ValueError, match="run a=1,seed=1 is in part 1 with other gains"):
        R.merge_gains([bad["held_out_gain"], agg["held_out_gain"]])
    # Differences from another reference variant are refused.
    other_ref = json.loads(json.dumps(good["reference_gain"]))
    other_ref["references"]["1"] = "runs/x/e=1,seed=1"
    with pytest.raises(ValueError, match="different reference runs for seed 1"):
        R.merge_gains([good["reference_gain"], other_ref])
    # The CLI says what does not fit: gains over another baseline.
    bad["held_out_gain"]["baseline"] = "elsewhere.json"
    bad_path = str(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    proc = run_aggregate(*flags("new", 2), f"--merge={bad_path}", check=False)
    assert proc.returncode != 0 and "merge only gains over one baseline" in proc.stderr


def _write_band_run(run_dir, values, *, skip_step=None):
    """A finished run whose metrics.jsonl logs ``train/adv_mean`` = ``values[step - 1]``
    (``skip_step``: that step's record lacks the key, as a non-finite value would)."""
    write_fake_run(run_dir, (0.5, 0.5), 0.5, steps=len(values))
    path = os.path.join(run_dir, "rl", "metrics.jsonl")
    recs = [json.loads(line) for line in open(path)]
    for rec, v in zip(recs, values):
        if rec["step"] != skip_step:
            rec["train/adv_mean"] = float(v)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)


def test_step_bands_match_numpy_per_run_and_over_seeds(tmp_path):
    import numpy as np

    rng = np.random.default_rng(3)
    vals = {
        ("ppo", "0"): rng.normal(2.0, 1.0, 8),
        ("ppo", "1"): rng.normal(2.0, 1.0, 8),
        ("ppo", "2"): rng.normal(2.0, 1.0, 8),
        ("ppo_warm", "0"): rng.normal(0.5, 1.0, 8),
        ("ppo_warm", "1"): rng.normal(0.5, 1.0, 8),
    }
    for (variant, seed), v in vals.items():
        _write_band_run(tmp_path / f"algo={variant},seed={seed}", v, skip_step=7 * (seed == "1"))
    runs = R.read_sweep(tmp_path)
    sb = R.step_bands(runs, ["train/adv_mean", "train/missing"], R.parse_bands(["1-3", "5-8"]))
    assert sb["bands"] == ["1-3", "5-8"]
    ppo = sb["variants"]["algo=ppo"]
    assert "train/missing" not in ppo  # a key no run logged has no row
    t2, t1 = 4.302653, 12.706205  # t_{0.975} with 2 and 1 degrees of freedom
    first = [vals[("ppo", s)][0:3].astype(np.float64).mean() for s in "012"]
    cell = ppo["train/adv_mean"]["1-3"]
    assert [cell["per_seed"][s] for s in "012"] == pytest.approx(first, rel=1e-12)
    m, _, h = _reference_ci(first, t2)
    assert (cell["mean"], cell["half_width"]) == (pytest.approx(m), pytest.approx(h, rel=1e-6))
    # Seed 1 did not log step 7: its 5-8 band is left out (not averaged over 3 of 4 steps).
    late = ppo["train/adv_mean"]["5-8"]
    assert sorted(late["per_seed"]) == ["0", "2"] and late["n"] == 2
    ref = [vals[("ppo", s)][4:8].mean() for s in "02"]
    assert late["mean"] == pytest.approx(np.mean(ref), rel=1e-12)
    assert late["half_width"] == pytest.approx(_reference_ci(ref, t1)[2], rel=1e-6)
    warm = sb["variants"]["algo=ppo_warm"]["train/adv_mean"]
    assert warm["1-3"]["n"] == 2 and warm["5-8"]["n"] == 1 and warm["5-8"]["half_width"] is None
    md = R.step_bands_markdown(sb)
    assert (
        md.splitlines()[0]
        == "| variant | metric | steps 1-3: mean ± t95 (n) | steps 5-8: mean ± t95 (n) |"
    )
    assert f"{m:+.3f} ± {h:.3f} (3)" in md
    # A band beyond the runs' last step is absent, not zero.
    assert "9-10" not in R.step_bands(runs, ["train/adv_mean"], [(9, 10)])["variants"][
        "algo=ppo"
    ].get("train/adv_mean", {})


@pytest.mark.parametrize("bad", [["1-"], ["a-3"], ["5-2"], ["-1-3"], []])
def test_parse_bands_refuses_malformed_bands(bad):
    with pytest.raises(ValueError, match="band"):
        R.parse_bands(bad)


def test_aggregate_cli_step_bands(tmp_path):
    for seed, v in (("0", [1.0, 2.0, 3.0, 4.0]), ("1", [3.0, 4.0, 5.0, 6.0])):
        _write_band_run(tmp_path / "sweep" / f"algo=ppo,seed={seed}", v)
    run_aggregate(
        f"--sweep_dir={tmp_path / 'sweep'}", "--train_metrics=train/adv_mean", "--bands=1-2,3-4"
    )
    agg = json.loads((tmp_path / "sweep" / "aggregate.json").read_text())
    cells = agg["step_bands"]["variants"]["algo=ppo"]["train/adv_mean"]
    assert cells["1-2"]["per_seed"] == {"0": 1.5, "1": 3.5} and cells["3-4"]["mean"] == 4.5
    assert "steps 3-4" in (tmp_path / "sweep" / "aggregate.md").read_text()
    bad = run_aggregate(
        f"--sweep_dir={tmp_path / 'sweep'}",
        "--train_metrics=train/adv_mean",
        "--bands=4-1",
        check=False,
    )
    assert bad.returncode != 0 and "--bands" in bad.stderr and "FIRST <= LAST" in bad.stderr


def test_merge_step_bands_recomputes_over_the_union_of_sweeps():
    """Seeds 0-2 of an earlier sweep (with an extra key and band, and one variant's key missing)
    merged with seeds 3-4 (plus an identical re-run of seed 2): every cell's per-seed values are
    the union and its mean and t-interval a float64 computation over them; a re-run with another
    band mean is refused, naming it."""
    import numpy as np

    rng = np.random.default_rng(5)
    per = {(v, s): rng.normal(size=3) for v in ("a=1", "b=2") for s in "01234"}

    def part(seeds, keys, bands):
        return {
            "confidence": 0.95,
            "keys": keys,
            "bands": bands,
            "variants": {
                v: {
                    k: {
                        b: {"per_seed": {s: float(per[(v, s)][j] + i) for s in seeds}}
                        for j, b in enumerate(bands)
                    }
                    for i, k in enumerate(keys)
                    if not (v == "b=2" and k == "k1" and "0" in seeds)
                }
                for v in ("b=2", "a=1")
            },
        }

    old = part("012", ["k0", "k1", "extra"], ["1-10", "31-40", "11-20"])
    new = part("234", ["k0", "k1"], ["1-10", "31-40"])
    sb = R.merge_step_bands([old, new])
    assert sb["keys"] == ["k0", "k1"] and sb["bands"] == ["1-10", "31-40"]
    assert list(sb["variants"]) == ["a=1", "b=2"]
    assert sb["repeated"] == ["a=1 seed 2", "b=2 seed 2"]
    t = {1: 12.706205, 2: 4.302653, 4: 2.776445}  # t_{0.975} from tables
    for v in ("a=1", "b=2"):
        assert "extra" not in sb["variants"][v]
        for i, k in enumerate(("k0", "k1")):
            # b=2's k1 is only in the new part: seeds 2-4
            seeds = "234" if (v, k) == ("b=2", "k1") else "01234"
            for j, b in enumerate(("1-10", "31-40")):
                cell = sb["variants"][v][k][b]
                xs = np.asarray([per[(v, s)][j] + i for s in seeds], np.float64)
                assert list(cell["per_seed"]) == list(seeds)
                assert cell["n"] == len(xs)
                assert cell["mean"] == pytest.approx(xs.mean(), abs=1e-12)
                half = t[len(xs) - 1] * xs.std(ddof=1) / math.sqrt(len(xs))
                assert cell["half_width"] == pytest.approx(half, rel=1e-6)
            assert "11-20" not in sb["variants"][v][k]
    bad = json.loads(json.dumps(old))
    bad["variants"]["a=1"]["k0"]["31-40"]["per_seed"]["2"] += 1e-3
    with pytest.raises(ValueError, match="a=1 seed 2: k0 over steps 31-40"):
        R.merge_step_bands([bad, new])


def test_aggregate_cli_merges_step_bands(tmp_path):
    """``--merge`` with ``--train_metrics``: the step bands of an earlier aggregate (its run
    directories deleted) merged with this sweep's equal those of one aggregate over all runs;
    ``--merge_variant`` keeps only those variants; a file without step bands is named."""
    import shutil

    import numpy as np

    rng = np.random.default_rng(8)
    vals = {(v, s): rng.normal(size=4) for v in ("ppo", "grpo") for s in "0123"}
    for (v, s), x in vals.items():
        for sweep in ("all", "old" if s in "01" else "new"):
            _write_band_run(tmp_path / sweep / f"algo={v},seed={s}", x)
    flags = ["--train_metrics=train/adv_mean", "--bands=1-2,3-4"]
    run_aggregate(f"--sweep_dir={tmp_path / 'all'}", *flags)
    run_aggregate(f"--sweep_dir={tmp_path / 'old'}", *flags)
    shutil.copy(tmp_path / "old" / "aggregate.json", tmp_path / "old.json")
    shutil.rmtree(tmp_path / "old")
    run_aggregate(f"--sweep_dir={tmp_path / 'new'}", *flags, f"--merge={tmp_path / 'old.json'}")
    whole = json.loads((tmp_path / "all" / "aggregate.json").read_text())["step_bands"]
    merged = json.loads((tmp_path / "new" / "aggregate.json").read_text())["step_bands"]
    assert merged["merged_from"] == [str(tmp_path / "old.json")]
    for v in ("algo=ppo", "algo=grpo"):
        for b in ("1-2", "3-4"):
            got, want = (x["variants"][v]["train/adv_mean"][b] for x in (merged, whole))
            assert got["per_seed"] == pytest.approx(want["per_seed"], abs=1e-12)
            assert got["n"] == 4 and got["mean"] == pytest.approx(want["mean"], abs=1e-12)
            assert got["half_width"] == pytest.approx(want["half_width"], rel=1e-9)
    md = (tmp_path / "new" / "aggregate.md").read_text()
    assert f"mean over seeds (with the runs of {tmp_path / 'old.json'})" in md
    # --merge_variant: only PPO's earlier seeds come in.
    run_aggregate(
        f"--sweep_dir={tmp_path / 'new'}",
        *flags,
        f"--merge={tmp_path / 'old.json'}",
        "--merge_variant=algo=ppo",
    )
    merged = json.loads((tmp_path / "new" / "aggregate.json").read_text())["step_bands"]
    cells = {v: merged["variants"][v]["train/adv_mean"]["1-2"] for v in ("algo=ppo", "algo=grpo")}
    assert sorted(cells["algo=ppo"]["per_seed"]) == ["0", "1", "2", "3"]
    assert sorted(cells["algo=grpo"]["per_seed"]) == ["2", "3"]
    # An earlier file aggregated without --train_metrics is named; this sweep's bands stay its own.
    run_aggregate(f"--sweep_dir={tmp_path / 'all'}")
    shutil.copy(tmp_path / "all" / "aggregate.json", tmp_path / "plain.json")
    proc = run_aggregate(
        f"--sweep_dir={tmp_path / 'new'}", *flags, f"--merge={tmp_path / 'plain.json'}"
    )
    assert f"--merge={tmp_path / 'plain.json'} has no step bands" in proc.stdout
    own = json.loads((tmp_path / "new" / "aggregate.json").read_text())["step_bands"]
    assert "merged_from" not in own
    assert own["variants"]["algo=ppo"]["train/adv_mean"]["1-2"]["n"] == 2


# ------------------------------------------------------------ differences between variants
def _welch_reference(a, b):
    """Welch's se and Welch-Satterthwaite df in NumPy float64."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    return a.mean() - b.mean(), float(np.sqrt(va + vb)), float(df)


def test_welch_difference_hand_case_and_float64_reference():
    # Equal sizes and variances: df = 2n - 2 = 4, se = sqrt(2/3), t_{0.975, 4} = 2.7764 (tables).
    d = R.welch_difference([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert d["mean"] == -1.0 and d["df_used"] == 4 and math.isclose(d["df"], 4.0)
    assert math.isclose(d["half_width"], 2.7764 * math.sqrt(2 / 3), rel_tol=1e-4)
    assert (d["n_a"], d["n_b"]) == (3, 3)

    import numpy as np

    rng = np.random.default_rng(5)
    for na, nb, sa, sb in [(5, 5, 0.02, 0.05), (3, 7, 0.1, 0.01), (4, 6, 1.0, 1.0)]:
        a, b = rng.normal(0.04, sa, na), rng.normal(0.0, sb, nb)
        mean, se, df = _welch_reference(a, b)
        d = R.welch_difference(a.tolist(), b.tolist(), confidence=0.9)
        assert math.isclose(d["mean"], mean, abs_tol=1e-15)
        assert math.isclose(d["se"], se, rel_tol=1e-12) and math.isclose(d["df"], df, rel_tol=1e-12)
        assert d["df_used"] == math.floor(df)  # rounded down: the conservative side
        half = R.t_quantile(0.95, math.floor(df)) * se
        assert math.isclose(d["half_width"], half, rel_tol=1e-9)
        assert math.isclose(d["lo"], mean - half) and math.isclose(d["hi"], mean + half)

    # Degenerate inputs: one run a side gives a difference without an interval; none gives none.
    one = R.welch_difference([0.1], [0.3, 0.2, float("nan"), None])
    assert math.isclose(one["mean"], -0.15) and one["lo"] is None and one["n_b"] == 2
    assert R.welch_difference([], [1.0, 2.0])["mean"] is None
    with pytest.raises(ValueError, match="confidence"):
        R.welch_difference([1.0, 2.0], [1.0, 2.0], confidence=1.0)


def test_welch_interval_covers_the_true_difference_on_synthetic_data():
    """Normal samples of unequal sizes and variances with a known mean difference: the 95% Welch
    interval covers it in ~95% of 3000 draws (floored df: slightly conservative; a binomial 3-sigma
    band around 0.95 is 0.938-0.962)."""
    import numpy as np

    rng = np.random.default_rng(0)
    covered = 0
    reps = 3000
    for _ in range(reps):
        a, b = rng.normal(0.5, 1.0, 5), rng.normal(0.0, 3.0, 7)
        d = R.welch_difference(a.tolist(), b.tolist(), permutation=False)
        covered += d["lo"] <= 0.5 <= d["hi"]
    assert 0.94 <= covered / reps <= 0.97, covered / reps


def test_permutation_p_value_exact_enumeration():
    import itertools

    import numpy as np

    # Complete separation of 5 vs 5: only the observed split and its mirror are as extreme.
    assert math.isclose(R.permutation_p_value([5, 6, 7, 8, 9], [0, 1, 2, 3, 4]), 2 / 252)
    # Three a side can never reach 0.05 (the smallest p is 2 / C(6, 3) = 0.1).
    assert math.isclose(R.permutation_p_value([1, 2, 3], [4, 5, 6]), 0.1)
    assert R.permutation_p_value([0.2, 0.2], [0.2, 0.2, 0.2]) == 1.0
    assert R.permutation_p_value([], [1.0]) is None
    assert R.permutation_p_value([0.0] * 11, [1.0] * 11) is None  # C(22, 11) > the cap

    # Against a vectorised NumPy enumeration of all splits.
    rng = np.random.default_rng(3)
    for na, nb in [(4, 5), (3, 3), (6, 2)]:
        x = rng.normal(size=na + nb)
        a, b = x[:na], x[na:]
        obs = abs(a.mean() - b.mean())
        idx = np.array(list(itertools.combinations(range(na + nb), na)))
        mask = np.zeros((len(idx), na + nb), bool)
        mask[np.arange(len(idx))[:, None], idx] = True
        da = (mask * x).sum(1) / na - (~mask * x).sum(1) / nb
        ref = float(np.mean(np.abs(da) >= obs - 1e-12))
        assert math.isclose(R.permutation_p_value(a.tolist(), b.tolist()), ref)
        # Two-sided: swapping the sides changes nothing.
        assert math.isclose(R.permutation_p_value(b.tolist(), a.tolist()), ref)


def test_variant_differences_and_its_errors():
    g = lambda greedy, sampled: {"greedy": {"mean": greedy}, "sampled": {"mean": sampled}}
    gains = {
        "runs": {
            "algo.algo=ppo,seed=0": g(0.02, 0.08),
            "algo.algo=ppo,seed=1": g(0.08, 0.06),
            "algo.algo=ppo,seed=2": g(-0.01, 0.07),
            "actfocus.enabled=true,seed=0": g(0.04, 0.04),
            "actfocus.enabled=true,seed=1": g(0.00, 0.03),
        }
    }
    vd = R.variant_differences(gains, [("algo.algo=ppo", "actfocus.enabled=true")])
    (pair,) = vd["pairs"]
    assert pair["seeds_a"] == ["0", "1", "2"] and pair["seeds_b"] == ["0", "1"]
    for m, a, b in [
        ("greedy", [0.02, 0.08, -0.01], [0.04, 0.0]),
        ("sampled", [0.08, 0.06, 0.07], [0.04, 0.03]),
    ]:
        ref = R.welch_difference(a, b)
        assert pair["modes"][m] == ref
    # sampled: every PPO run above every ActFocus run, and with 3 vs 2 the mirrored split is less
    # extreme (|0.0433 - 0.075| < 0.035): only the observed split of C(5, 2) = 10 counts.
    assert math.isclose(pair["modes"]["sampled"]["p_permutation"], 0.1)
    md = R.variant_differences_markdown(vd)
    assert "algo.algo=ppo minus actfocus.enabled=true" in md and "| 3 / 2 |" in md
    with pytest.raises(ValueError, match=r"variant 'x=1' has no runs.*algo\.algo=ppo"):
        R.variant_differences(gains, [("x=1", "algo.algo=ppo")])
    assert R.parse_comparison(" a=1 | b=2,c=3 ") == ("a=1", "b=2,c=3")
    for bad in ["a=1", "a=1|", "a|b|c"]:
        with pytest.raises(ValueError, match="must be '<variant A>\\|<variant B>'"):
            R.parse_comparison(bad)


def _contrast_reference(groups, weights):
    """A linear contrast's value, se and Welch-Satterthwaite df in NumPy float64."""
    import numpy as np

    gs = [np.asarray(g, np.float64) for g in groups]
    w = np.asarray(weights, np.float64)
    terms = np.array([wi**2 * g.var(ddof=1) / g.size for wi, g in zip(w, gs)])
    df = terms.sum() ** 2 / np.sum(terms**2 / np.array([g.size - 1 for g in gs]))
    return float(w @ np.array([g.mean() for g in gs])), float(np.sqrt(terms.sum())), float(df)


def test_welch_contrast_hand_case_float64_reference_and_two_group_identity():
    # Four groups of 3 with variance 1: se^2 = 4 / 3, df = (4/3)^2 / (4 * (1/3)^2 / 2) = 8 = the
    # pooled df; t_{0.975, 8} = 2.3060 (tables). Means 2, 1, 3, 1: (2 - 1) - (3 - 1) = -1.
    groups = [[1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [0.0, 1.0, 2.0]]
    c = R.welch_contrast(groups, [1, -1, -1, 1])
    assert c["mean"] == -1.0 and c["df_used"] == 8 and math.isclose(c["df"], 8.0)
    assert math.isclose(c["half_width"], 2.3060 * math.sqrt(4 / 3), rel_tol=1e-4)
    assert c["n"] == [3, 3, 3, 3]

    import numpy as np

    rng = np.random.default_rng(9)
    for sizes, sds, weights in [
        ((5, 5, 5, 5), (0.02, 0.05, 0.01, 0.03), (1, -1, -1, 1)),
        ((3, 7, 4, 6), (0.1, 0.01, 0.5, 0.2), (1, -1, -1, 1)),
        ((4, 6, 5), (1.0, 2.0, 0.5), (0.5, 2.0, -1.5)),
    ]:
        gs = [rng.normal(0.1 * i, sd, n) for i, (n, sd) in enumerate(zip(sizes, sds))]
        mean, se, df = _contrast_reference(gs, weights)
        c = R.welch_contrast([g.tolist() for g in gs], weights, confidence=0.9)
        assert math.isclose(c["mean"], mean, abs_tol=1e-14)
        assert math.isclose(c["se"], se, rel_tol=1e-12) and math.isclose(c["df"], df, rel_tol=1e-12)
        assert c["df_used"] == math.floor(df)
        assert math.isclose(c["half_width"], R.t_quantile(0.95, math.floor(df)) * se, rel_tol=1e-9)
    # Two groups with weights (1, -1) are welch_difference's interval, to the last bit.
    a, b = rng.normal(0, 1, 4).tolist(), rng.normal(1, 3, 6).tolist()
    d, c = R.welch_difference(a, b), R.welch_contrast([a, b], [1, -1])
    assert all(d[k] == c[k] for k in ("mean", "lo", "hi", "half_width", "se", "df", "df_used"))
    # A weight-0 group is ignored (even empty); an empty weighted group gives no value; one value
    # gives a value without an interval; constant groups give df = sum(n - 1) and a zero-width one.
    assert R.welch_contrast([a, b, []], [1, -1, 0])["se"] == c["se"]
    assert R.welch_contrast([a, []], [1, -1])["mean"] is None
    one = R.welch_contrast([[0.5], [0.1, 0.3]], [1, -1])
    assert math.isclose(one["mean"], 0.3) and one["lo"] is None
    flat = R.welch_contrast([[1.0] * 3, [0.0] * 4], [1, -1])
    assert flat["df"] == 5 and flat["half_width"] == 0.0
    with pytest.raises(ValueError, match="one weight per group"):
        R.welch_contrast([a, b], [1, -1, 1])
    with pytest.raises(ValueError, match="confidence"):
        R.welch_contrast([a, b], [1, -1], confidence=0.0)


def test_welch_contrast_interval_covers_a_known_interaction_on_synthetic_data():
    """Four normal groups of unequal sizes and variances whose means have the interaction
    (0.3 - 0.1) - (0.0 - 0.1) = 0.3: the 95% Welch-Satterthwaite interval covers it in ~95% of
    3000 draws (floored df: slightly conservative; binomial 3-sigma band 0.938-0.962)."""
    import numpy as np

    rng = np.random.default_rng(1)
    reps, covered = 3000, 0
    spec = [(0.3, 1.0, 5), (0.1, 0.5, 5), (0.0, 2.0, 4), (0.1, 1.0, 7)]
    for _ in range(reps):
        gs = [rng.normal(mu, sd, n).tolist() for mu, sd, n in spec]
        c = R.welch_contrast(gs, [1, -1, -1, 1])
        covered += c["lo"] <= 0.3 <= c["hi"]
    assert 0.94 <= covered / reps <= 0.97, covered / reps


def test_variant_interactions_and_its_errors():
    g = lambda greedy, sampled: {"greedy": {"mean": greedy}, "sampled": {"mean": sampled}}
    vals = {
        "p=1,af=1": [(0.00, -0.04), (0.02, -0.03), (-0.01, -0.05)],
        "p=1,af=0": [(0.03, 0.05), (0.01, 0.06), (0.02, 0.04)],
        "p=0,af=1": [(0.01, 0.02), (0.01, 0.03)],
        "p=0,af=0": [(0.02, 0.03), (0.02, 0.04), (0.03, 0.05), (0.01, 0.03)],
    }
    gains = {"runs": {f"{v},seed={s}": g(*x) for v, xs in vals.items() for s, x in enumerate(xs)}}
    spec = R.parse_interaction(" p=1,af=1 | p=1,af=0|p=0,af=1 |p=0,af=0")
    assert spec == ("p=1,af=1", "p=1,af=0", "p=0,af=1", "p=0,af=0")
    vi = R.variant_interactions(gains, [spec])
    (x,) = vi["interactions"]
    assert x["seeds"]["p=0,af=0"] == ["0", "1", "2", "3"] and x["seeds"]["p=0,af=1"] == ["0", "1"]
    for i, m in enumerate(("greedy", "sampled")):
        cols = [[v[i] for v in vals[name]] for name in spec]
        mean, se, df = _contrast_reference(cols, [1, -1, -1, 1])
        d = x["modes"][m]
        assert math.isclose(d["mean"], mean, abs_tol=1e-14)
        assert math.isclose(d["se"], se, rel_tol=1e-12) and math.isclose(d["df"], df, rel_tol=1e-12)
        assert d["ab"] == R.welch_difference(cols[0], cols[1])
        assert d["cd"] == R.welch_difference(cols[2], cols[3])
        assert math.isclose(d["ab"]["mean"] - d["cd"]["mean"], mean, abs_tol=1e-14)
    md = R.variant_interactions_markdown(vi)
    assert "(p=1,af=1 minus p=1,af=0) minus (p=0,af=1 minus p=0,af=0)" in md
    assert "| 3 / 3 / 2 / 4 |" in md
    with pytest.raises(ValueError, match=r"variant 'x=1' has no runs.*p=0,af=0"):
        R.variant_interactions(gains, [("x=1", *spec[1:])])
    with pytest.raises(ValueError, match="repeats a variant"):
        R.variant_interactions(gains, [(spec[0], spec[1], spec[0], spec[3])])
    for bad in ["a|b|c", "a|b||d", "a|b|c|d|e"]:
        with pytest.raises(ValueError, match=r"must be '<A>\|<B>\|<C>\|<D>'"):
            R.parse_interaction(bad)


def _gains_sweep(tmp_path, variants, seed, n=32):
    """A fake sweep (``tmp_path/sw``) of ``variants`` (``{variant: seeds}``) with random per-task
    successes, and a random baseline file: returns the ``--sweep_dir`` and
    ``--baseline_per_task`` flags and, per mode, each variant's per-seed gains over the baseline
    computed in NumPy (``{mode: {variant: [gain per seed]}}``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draw = lambda: {m: rng.integers(0, 2, n).astype(float) for m in ("greedy", "sampled")}
    base = draw()
    (tmp_path / "base.json").write_text(json.dumps({m: v.tolist() for m, v in base.items()}))
    per_task = {f"{v},seed={s}": draw() for v, seeds in variants.items() for s in seeds}
    _write_sweep_with_per_task(tmp_path / "sw", list(variants.items()), per_task)
    gains = {
        m: {
            v: [float(np.mean(per_task[f"{v},seed={s}"][m] - base[m])) for s in seeds]
            for v, seeds in variants.items()
        }
        for m in ("greedy", "sampled")
    }
    return f"--sweep_dir={tmp_path / 'sw'}", f"--baseline_per_task={tmp_path / 'base.json'}", gains


def test_aggregate_cli_interaction(tmp_path):
    """--interaction over a sweep of four variants: the difference of differences and its interval
    equal a NumPy computation over the runs' per-task gains, in the JSON and the markdown; without
    --baseline_per_task, or with an unknown variant, it is refused by name."""
    variants = {"a=1": "012", "b=2": "01", "c=3": "012", "d=0": "0123"}
    sweep, base_flag, gains = _gains_sweep(tmp_path, variants, seed=4)
    run_aggregate(sweep, base_flag, "--interaction=a=1|b=2|c=3|d=0")
    agg = json.loads((tmp_path / "sw" / "aggregate.json").read_text())
    (x,) = agg["variant_interactions"]["interactions"]
    for m in ("greedy", "sampled"):
        mean, se, df = _contrast_reference(list(gains[m].values()), [1, -1, -1, 1])
        d = x["modes"][m]
        assert math.isclose(d["mean"], mean, abs_tol=1e-12)
        assert math.isclose(d["se"], se, rel_tol=1e-9) and math.isclose(d["df"], df, rel_tol=1e-9)
    md = (tmp_path / "sw" / "aggregate.md").read_text()
    assert "Differences of differences" in md and "(a=1 minus b=2) minus (c=3 minus d=0)" in md
    out = run_aggregate(sweep, "--interaction=a=1|b=2|c=3|d=0", check=False)
    assert out.returncode != 0 and "--interaction needs --baseline_per_task" in out.stderr
    out = run_aggregate(sweep, base_flag, "--interaction=a=1|b=2|c=3|e=5", check=False)
    assert out.returncode != 0 and "variant 'e=5' has no runs" in out.stderr


def test_aggregate_cli_merge_variant_and_compare(tmp_path):
    """An earlier sweep (its directories gone) merged for two of its three variants only, then
    --compare over the union: the difference and Welch interval equal a NumPy computation over
    the runs' per-task gains; an unknown variant or a missing baseline is refused, by name."""
    import shutil

    import numpy as np

    rng = np.random.default_rng(2)
    n = 40
    draw = lambda: {m: rng.integers(0, 2, n).astype(float) for m in ("greedy", "sampled")}
    base = draw()
    (tmp_path / "base.json").write_text(json.dumps({m: v.tolist() for m, v in base.items()}))
    per_task = {f"{v},seed={s}": draw() for v in ("a=1", "b=2", "d=0") for s in "0123"}
    _write_sweep_with_per_task(
        tmp_path / "old", [("a=1", "01"), ("b=2", "01"), ("d=0", "01")], per_task
    )
    _write_sweep_with_per_task(tmp_path / "new", [("a=1", "23"), ("d=0", "2")], per_task)
    base_flag = f"--baseline_per_task={tmp_path / 'base.json'}"
    run_aggregate(f"--sweep_dir={tmp_path / 'old'}", base_flag)
    shutil.copy(tmp_path / "old" / "aggregate.json", tmp_path / "old.json")
    shutil.rmtree(tmp_path / "old")
    new = [f"--sweep_dir={tmp_path / 'new'}", base_flag, f"--merge={tmp_path / 'old.json'}"]
    run_aggregate(*new, "--merge_variant=a=1", "--merge_variant=d=0", "--compare=a=1|d=0")
    agg = json.loads((tmp_path / "new" / "aggregate.json").read_text())
    assert sorted(agg["held_out_gain"]["variants"]) == ["a=1", "d=0"]  # b=2 left out
    (pair,) = agg["variant_differences"]["pairs"]
    assert pair["seeds_a"] == ["0", "1", "2", "3"] and pair["seeds_b"] == ["0", "1", "2"]
    for m in ("greedy", "sampled"):
        gain = lambda v, seeds, m=m: [
            float(np.mean(per_task[f"{v},seed={s}"][m] - base[m])) for s in seeds
        ]
        mean, se, df = _welch_reference(gain("a=1", "0123"), gain("d=0", "012"))
        d = pair["modes"][m]
        assert math.isclose(d["mean"], mean, abs_tol=1e-12) and math.isclose(
            d["se"], se, rel_tol=1e-9
        )
        assert math.isclose(d["df"], df, rel_tol=1e-9)
    assert "a=1 minus d=0" in (tmp_path / "new" / "aggregate.md").read_text()

    # Without --merge_variant every merged variant is there; with it, b=2 is not.
    run_aggregate(*new, "--compare=a=1|b=2")
    proc = run_aggregate(*new, "--merge_variant=a=1", "--compare=a=1|b=2", check=False)
    assert proc.returncode != 0 and "variant 'b=2' has no runs" in proc.stderr
    proc = run_aggregate(*new, "--merge_variant=zzz=1", check=False)
    assert proc.returncode != 0 and "no runs of --merge_variant zzz=1" in proc.stderr
    proc = run_aggregate(f"--sweep_dir={tmp_path / 'new'}", "--compare=a=1|d=0", check=False)
    assert proc.returncode != 0 and "--compare needs --baseline_per_task" in proc.stderr


def test_trend_weights_are_the_least_squares_slope_of_the_level_means():
    import numpy as np

    rng = np.random.default_rng(5)
    for xs in ([0.0, 0.1, 0.3, 0.5, 1.0], [2.0, -1.0, 0.5], [0.0, 0.0, 1.0, 3.0]):
        means = rng.normal(0, 1, len(xs))
        slope = float(np.polyfit(np.asarray(xs), means, 1)[0])
        w = R.trend_weights(xs)
        assert math.isclose(float(np.dot(w, means)), slope, rel_tol=1e-12, abs_tol=1e-14)
        assert math.isclose(math.fsum(w), 0.0, abs_tol=1e-12)  # a constant has no slope
    assert R.trend_weights([0.0, 1.0, 2.0])[1] == 0.0  # the middle level does not move the slope
    with pytest.raises(ValueError, match="all x are equal"):
        R.trend_weights([0.3, 0.3, 0.3])


def test_curvature_weights_are_the_least_squares_x2_coefficient_of_the_level_means():
    import numpy as np

    rng = np.random.default_rng(7)
    for xs in ([0.0, 0.05, 0.1, 0.3, 0.5, 1.0], [2.0, -1.0, 0.5], [0.0, 0.0, 1.0, 3.0]):
        x = np.asarray(xs)
        w = R.curvature_weights(xs)
        for _ in range(3):
            means = rng.normal(0, 1, len(xs))
            c = float(np.polyfit(x, means, 2)[0])
            assert math.isclose(float(np.dot(w, means)), c, rel_tol=1e-9, abs_tol=1e-12)
        # A straight line has no curvature; a pure parabola's coefficient is recovered.
        assert math.isclose(float(np.dot(w, 3.0 - 2.0 * x)), 0.0, abs_tol=1e-12)
        assert math.isclose(float(np.dot(w, 0.7 * x**2 + x)), 0.7, rel_tol=1e-12)
    # Three equally spaced levels: the classic (1, -2, 1) contrast over 2 h^2.
    np.testing.assert_allclose(R.curvature_weights([0.0, 0.5, 1.0]), [2.0, -4.0, 2.0], rtol=1e-12)
    with pytest.raises(ValueError, match="at least 3 distinct x"):
        R.curvature_weights([0.0, 0.0, 1.0])


def test_variant_trends_float64_reference_and_its_errors():
    import numpy as np

    g = lambda greedy, sampled: {"greedy": {"mean": greedy}, "sampled": {"mean": sampled}}
    vals = {  # unequal run counts per level; sampled rises with x, greedy is flat
        "a=0": [(0.02, -0.10), (0.00, -0.12), (0.01, -0.09)],
        "a=0.3": [(0.01, -0.05), (0.03, -0.07)],
        "a=0.5": [(0.00, -0.04), (0.02, -0.02), (0.01, -0.05), (0.02, -0.03)],
        "a=1": [(0.01, 0.00), (0.00, 0.01), (0.02, -0.01)],
    }
    gains = {"runs": {f"{v},seed={s}": g(*x) for v, xs in vals.items() for s, x in enumerate(xs)}}
    spec = R.parse_trend(" 0:a=0 |0.3:a=0.3| 0.5 : a=0.5|1:a=1")
    assert spec == ((0.0, "a=0"), (0.3, "a=0.3"), (0.5, "a=0.5"), (1.0, "a=1"))
    vt = R.variant_trends(gains, [spec])
    (t,) = vt["trends"]
    assert [lv["x"] for lv in t["levels"]] == [0.0, 0.3, 0.5, 1.0]
    assert t["levels"][2]["seeds"] == ["0", "1", "2", "3"]
    xs = np.array([0.0, 0.3, 0.5, 1.0])
    w = (xs - xs.mean()) / np.sum((xs - xs.mean()) ** 2)
    for i, m in enumerate(("greedy", "sampled")):
        cols = [[v[i] for v in vals[name]] for _, name in spec]
        level_means = np.array([np.mean(c) for c in cols])
        mean, se, df = _contrast_reference(cols, w)
        d = t["modes"][m]
        assert math.isclose(d["mean"], float(np.polyfit(xs, level_means, 1)[0]), abs_tol=1e-12)
        assert math.isclose(d["mean"], mean, abs_tol=1e-12)
        assert math.isclose(d["se"], se, rel_tol=1e-12) and math.isclose(d["df"], df, rel_tol=1e-12)
        assert math.isclose(d["half_width"], R.t_quantile(0.975, math.floor(df)) * se)
        np.testing.assert_allclose(d["level_means"], level_means, rtol=0, atol=1e-15)
        # Curvature: the x^2 row of the least-squares solution [1, x, x^2] (pseudo-inverse).
        wc = np.linalg.pinv(np.stack([np.ones_like(xs), xs, xs**2], axis=1))[2]
        mean, se, df = _contrast_reference(cols, wc)
        cv = d["curvature"]
        assert math.isclose(cv["mean"], float(np.polyfit(xs, level_means, 2)[0]), abs_tol=1e-12)
        assert math.isclose(cv["mean"], mean, abs_tol=1e-12)
        assert math.isclose(cv["se"], se, rel_tol=1e-9) and math.isclose(cv["df"], df, rel_tol=1e-9)
    assert t["modes"]["sampled"]["lo"] > 0  # the rise is resolved
    md = R.variant_trends_markdown(vt)
    assert "| 0: a=0, 0.3: a=0.3, 0.5: a=0.5, 1: a=1 | 3 / 2 / 4 / 3 |" in md
    assert "-0.103, -0.060, -0.035, +0.000" in md and "**+0.1" in md
    assert "sampled: curvature, x^2 coefficient [Welch 95% CI]" in md
    row = md.splitlines()[2].split(" | ")
    assert row[-1].rstrip(" |") == R._gain_cell(t["modes"]["sampled"]["curvature"])
    # Two distinct x among three levels: a slope, no curvature.
    two = R.variant_trends(gains, [((0.0, "a=0"), (0.0, "a=0.3"), (1.0, "a=1"))])
    assert two["trends"][0]["modes"]["sampled"]["curvature"] is None
    assert R.variant_trends_markdown(two).splitlines()[2].endswith(" | - |")
    with pytest.raises(ValueError, match=r"variant 'a=2' has no runs.*a=0\.5"):
        R.variant_trends(gains, [(*spec[:3], (2.0, "a=2"))])
    bad = {
        "0:a=0|0.3:a=0.3": "at least 3",
        "0:a=0|x:a=0.3|1:a=1": "must be '<x>:<variant>'",
        "0:a=0|0.3|1:a=1": "must be '<x>:<variant>'",
        "0:a=0|inf:a=0.3|1:a=1": "must be '<x>:<variant>'",
        "0:a=0|0.3:|1:a=1": "must be '<x>:<variant>'",
        "0:a=0|0.3:a=0|1:a=1": "repeats a variant",
        "1:a=0|1:a=0.3|1:a=1": "same x",
    }
    for spec_text, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            R.parse_trend(spec_text)


def test_trend_interval_covers_the_least_squares_slope_of_the_true_means():
    """Five levels of 3 runs with unequal spreads and a concave true response: the 95% interval
    covers the least-squares slope of the true level means in ~95% of 3000 draws (binomial
    3-sigma band 0.938-0.962; the floored df makes it slightly conservative)."""
    import numpy as np

    rng = np.random.default_rng(3)
    xs = np.array([0.0, 0.1, 0.3, 0.5, 1.0])
    true_means = 0.12 * np.sqrt(xs) - 0.1
    sds = np.array([0.02, 0.04, 0.03, 0.05, 0.02])
    target = float(np.polyfit(xs, true_means, 1)[0])
    target_c = float(np.polyfit(xs, true_means, 2)[0])
    assert target_c < 0  # concave
    w, wc = R.trend_weights(xs.tolist()), R.curvature_weights(xs.tolist())
    reps, covered, covered_c = 3000, 0, 0
    for _ in range(reps):
        groups = [rng.normal(mu, sd, 3).tolist() for mu, sd in zip(true_means, sds)]
        c = R.welch_contrast(groups, w)
        covered += c["lo"] <= target <= c["hi"]
        c = R.welch_contrast(groups, wc)
        covered_c += c["lo"] <= target_c <= c["hi"]
    assert 0.94 <= covered / reps <= 0.975, covered / reps
    assert 0.94 <= covered_c / reps <= 0.975, covered_c / reps


def test_aggregate_cli_trend(tmp_path):
    """--trend over three variants of a sweep: the slope and its interval equal a NumPy
    computation over the runs' per-task gains, in the JSON and the markdown; a malformed level or
    a missing baseline is refused by name."""
    import numpy as np

    variants = {"a=0": "012", "a=0.5": "01", "a=1": "0123"}
    sweep, base_flag, gains = _gains_sweep(tmp_path, variants, seed=6)
    run_aggregate(sweep, base_flag, "--trend=0:a=0|0.5:a=0.5|1:a=1")
    agg = json.loads((tmp_path / "sw" / "aggregate.json").read_text())
    (t,) = agg["variant_trends"]["trends"]
    xs = np.array([0.0, 0.5, 1.0])
    for m in ("greedy", "sampled"):
        groups = list(gains[m].values())
        slope = float(np.polyfit(xs, [np.mean(gr) for gr in groups], 1)[0])
        w = (xs - xs.mean()) / np.sum((xs - xs.mean()) ** 2)
        mean, se, df = _contrast_reference(groups, w)
        d = t["modes"][m]
        assert math.isclose(d["mean"], slope, abs_tol=1e-12)
        assert math.isclose(d["mean"], mean, abs_tol=1e-12)
        assert math.isclose(d["se"], se, rel_tol=1e-9) and math.isclose(d["df"], df, rel_tol=1e-9)
        curvature = float(np.polyfit(xs, [np.mean(gr) for gr in groups], 2)[0])
        assert math.isclose(d["curvature"]["mean"], curvature, rel_tol=1e-9, abs_tol=1e-12)
    md = (tmp_path / "sw" / "aggregate.md").read_text()
    assert "Linear trends of mean held-out gains" in md and "0: a=0, 0.5: a=0.5, 1: a=1" in md
    out = run_aggregate(sweep, "--trend=0:a=0|0.5:a=0.5|1:a=1", check=False)
    assert out.returncode != 0 and "--trend needs --baseline_per_task" in out.stderr
    out = run_aggregate(sweep, base_flag, "--trend=0:a=0|half:a=0.5|1:a=1", check=False)
    assert out.returncode != 0 and "must be '<x>:<variant>'" in out.stderr
