"""The analysis tooling end to end on a tiny real run: the Action Bottleneck along RL training
(``experiments/bottleneck.py``'s function), the real run's files vs the fake sweep of
``tests/fake_sweep.py``, and both notebooks executed with nbclient on a fresh kernel running this
interpreter.

One module-scoped tiny RL run (``test_trainer.tiny_config``, 2 steps, a checkpoint per step) is the
first run of a 2-variant x 2-seed sweep directory whose three other runs are hand-written.
"""

import fcntl
import json
import os
import sys

import nbformat
import numpy as np
import pytest
from fake_sweep import write_fake_run
from safetensors.numpy import load_file
from test_trainer import tiny_config

from actfocus_jax.analysis import policy_report as pr
from actfocus_jax.analysis import results as R
from actfocus_jax.rollout.roles import Role
from actfocus_jax.train.trainer import Experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
REAL_RUN = "actfocus.enabled=true,seed=0"
KERNEL = "actfocus_nbtest"


def _run_config(root):
    c = tiny_config(root, **{"train.eval_every": 1, "train.keep": 5, "debug": False})
    c.workdir = str(root / "sweep" / REAL_RUN)
    return c


def _build(root):
    """The tiny run, its bottleneck analysis along training, and the three fake runs."""
    c = _run_config(root)
    exp = Experiment(c)
    exp.run_rl()
    # Step 0 (the run's initial policy) and checkpoints 1 and 2, with the experiment that trained
    # (its compiled rollout is reused: 3 tasks = 2 rollout calls of 2 tasks x 2 rollouts).
    pr.bottleneck_analysis(
        experiment=exp,
        rl_dir=os.path.join(c.workdir, "rl"),
        num_tasks=3,
        num_resamples=200,
        num_permutations=20,
        gradients=True,
        verbose=False,
    )
    sweep = root / "sweep"
    write_fake_run(sweep / "actfocus.enabled=true,seed=1", (0.5,), 0.5, steps=2, eval_every=2)
    write_fake_run(sweep / "actfocus.enabled=false,seed=0", (0.0,), 0.0, steps=2, eval_every=2)
    write_fake_run(sweep / "actfocus.enabled=false,seed=1", (0.5,), 0.0, steps=2, eval_every=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Built once per test session: under pytest-xdist the workers share one directory (the
    first one builds it under a file lock, the others wait for it)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "notebooks_tiny_run"
        root.mkdir(exist_ok=True)
    else:
        root = tmp_path_factory.mktemp("nb")
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / "done").exists():
                _build(root)
                (root / "done").write_text("ok")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    c = _run_config(root)
    analysis = pr.load_analysis(os.path.join(c.workdir, "bottleneck", "rl_train"))
    return {
        "root": root,
        "sweep": root / "sweep",
        "run": c.workdir,
        "config": c,
        "analysis": analysis,
    }


def test_bottleneck_along_training(tiny_run):
    a, c = tiny_run["analysis"], tiny_run["config"]
    meta = a["meta"]
    assert meta["group_size"] == c.rollout.group_size == 2
    assert meta["num_tasks"] == 3 and len(meta["task_indices"]) == 3
    assert [r["label"] for r in a["results"]] == ["step_0", "step_1", "step_2"]
    for r in a["results"]:
        b = r["bottleneck"]
        assert b["skipped"] == []
        for energy in ("neg_logprob", "entropy", "neg_logit"):
            for variant in ("sum", "mean"):
                e = b[energy][variant]
                assert e["n_groups_total"] == 3
                assert len(e["per_turn"]) == c.env.max_turns
                for role in ("reasoning", "action"):
                    assert set(e[role]) >= {"mean_abs_rho", "density", "excess_density"}
        share = r["token_share"]
        assert share["reasoning"] + share["action"] == pytest.approx(1.0)
        assert len(share["per_turn"]) == c.env.max_turns
        arrays = pr.load_rollouts(r["rollouts"])
        assert arrays["roles"].shape[0] == 3 * 2
        np.testing.assert_array_equal(arrays["group_id"], np.repeat(np.arange(3), 2))
        # The saved arrays reproduce the report.
        again = pr.analyze_buffer(arrays, 2, num_resamples=200, num_permutations=20)
        assert again["bottleneck"] == r["bottleneck"]
        # The gradient variant: each role's share of the GRPO gradient on the same rollouts.
        g = r["gradients"]
        assert g["advantages"] == "grpo" and g["groups"]["n_groups_total"] == 3
        assert g["batch"]["linearity_error"] < 1e-4 and g["max_group_linearity_error"] < 1e-4
        contrib = [g["batch"][k]["contribution"] for k in ("reasoning", "action")]
        if g["batch"]["full_norm"] > 0:
            assert sum(contrib) == pytest.approx(1.0, abs=1e-4)
        n_tok = [g["batch"][k]["num_tokens"] for k in ("reasoning", "action")]
        assert n_tok == [float(np.sum(arrays["roles"] == k)) for k in (Role.REASONING, Role.ACTION)]

    # The restored last checkpoint is the run's final policy; step 0 is its initial policy.
    exp = Experiment(c)
    steps = {s: p for _, s, _, p in pr.checkpoint_policies(exp, os.path.join(c.workdir, "rl"))}
    final = load_file(os.path.join(c.workdir, "rl", "final_policy", "model.safetensors"))

    def fingerprint(leaves):
        return sorted(round(float(np.abs(np.asarray(x, np.float64)).sum()), 3) for x in leaves)

    import jax

    assert fingerprint(jax.tree.leaves(steps[2])) == fingerprint(final.values())
    assert fingerprint(jax.tree.leaves(steps[0])) != fingerprint(final.values())


def test_run_config_overlay(tiny_run):
    # A caller's config that differs from the run's: the run's saved config wins (but not workdir).
    rl_dir = os.path.join(tiny_run["run"], "rl")
    other = tiny_config(tiny_run["root"] / "other", **{"rollout.group_size": 4, "seed": 3})
    merged, changed = pr.overlay_config(other, pr.saved_run_config(rl_dir))
    assert merged.rollout.group_size == 2 and merged.seed == 0
    assert merged.workdir == other.workdir and other.rollout.group_size == 4
    assert {"rollout.group_size", "seed", "data_dir"} <= set(changed)
    assert "workdir" not in changed
    assert pr.checkpoint_steps(rl_dir) == [1, 2]


def test_format_and_render_helpers(tiny_run):
    a = tiny_run["analysis"]
    text = pr.format_report(a["results"][-1], a["meta"])
    assert "neg_logit" in text and "per turn" in text
    assert "step_2" in pr.format_training_table(a)
    arrays = pr.load_rollouts(a["results"][-1]["rollouts"])
    w = pr.actfocus_token_weights(arrays, a["meta"]["config"]["actfocus"])
    roles = arrays["roles"]
    np.testing.assert_allclose(w[roles == 1], a["meta"]["config"]["actfocus"]["alpha"], rtol=1e-6)
    assert np.all(w[(roles == 0) | (roles == 3)] == 0)
    html = pr.trajectory_html(["a", "<b>", "c", "x"], [0, 1, 2, 3], [0.0, 0.1, 2.0, 0.0])
    assert "&lt;b&gt;" in html and 'class="action"' in html and "x</span>" not in html


def test_real_run_has_the_fake_sweep_layout(tiny_run, monkeypatch):
    runs = R.read_sweep(tiny_run["sweep"])
    real = next(r for r in runs if r["name"] == REAL_RUN)
    fake = next(r for r in runs if r["name"] == "actfocus.enabled=true,seed=1")
    assert real["complete"] and real["steps"] == 2
    assert set(real["evals"]) == {1, 2}  # periodic evaluations at steps 1, 2 (+ the final one)
    # The greedy metrics the fake runs record are the trainer's (the tiny run is greedy only) ...
    fake_greedy = {k for k in fake["evals"][2] if k.startswith("greedy/")}
    assert fake_greedy <= set(real["evals"][1]) and fake_greedy <= set(real["evals"][2])
    # ... and so are the sampled ones: the keys of the trainer's final greedy + sampled evaluation.
    exp = Experiment(_run_config(tiny_run["root"] / "keys"))
    exp.config.eval.sampled = True
    monkeypatch.setattr(
        exp, "evaluate_tasks", lambda *a, greedy=True, **k: ({"success": 1.0 - greedy}, np.zeros(1))
    )
    final = exp.evaluate_modes(None, None, prefix="final/")
    pts = R.eval_points([], {"steps": 2, "final": final})
    assert pts == {2: {"greedy/success": 0.0, "sampled/success": 1.0}}
    assert {k for k in fake["evals"][2] if k.endswith("success")} == set(pts[2])

    agg = R.aggregate(runs)
    assert [(v["variant"], v["n_runs"]) for v in agg["variants"]] == [
        ("actfocus.enabled=false", 2),
        ("actfocus.enabled=true", 2),
    ]
    for v in agg["variants"]:
        assert v["metrics"]["greedy/success"]["final"]["n"] == 2
        assert v["metrics"]["greedy/success"]["final"]["half_width"] is not None
        n_sampled = 1 if v["variant"] == "actfocus.enabled=true" else 2
        assert v["metrics"]["sampled/success"]["final"]["n"] == n_sampled


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec that runs this interpreter (found first through JUPYTER_PATH)."""
    share = tmp_path_factory.mktemp("jupyter")
    spec_dir = share / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "actfocus test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return {"JUPYTER_PATH": str(share)}


def _execute(name, env, monkeypatch, cwd):
    from nbclient import NotebookClient

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=300,
        startup_timeout=120,
        resources={"metadata": {"path": cwd}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    data = [
        o.get("data", {}) for o in outputs if o.output_type in ("display_data", "execute_result")
    ]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    return data, text


def test_action_bottleneck_notebook(tiny_run, kernel_env, monkeypatch):
    env = dict(kernel_env, ACTFOCUS_NB_RUN_DIR=tiny_run["run"], ACTFOCUS_NB_POLICY="rl")
    data, text = _execute("action_bottleneck.ipynb", env, monkeypatch, NOTEBOOKS)
    images = [d for d in data if "image/png" in d]
    html = [d["text/html"] for d in data if "text/html" in d]
    # Per role, per turn + token share, along training, training-rollout statistic.
    assert len(images) >= 4
    assert len(html) == 2 and all('class="reasoning"' in h for h in html)
    assert "3 policies (step_0, step_1, step_2)" in text
    assert "along training" in text and "per turn" in text


def test_results_notebook(tiny_run, kernel_env, monkeypatch, tmp_path):
    # A baseline that failed every held-out task: the real run's gain is its own success rate.
    with open(os.path.join(tiny_run["run"], "rl", "final_per_task.json")) as f:
        final = json.load(f)
    (tmp_path / "base.json").write_text(json.dumps({m: [0.0] * len(v) for m, v in final.items()}))
    # A reference run of seed 0 that solved every held-out task: the real run's difference from
    # it is its own success rate minus 1 (the fake runs have no per-task results: unmatched).
    ref = tmp_path / "ref" / "actfocus.enabled=false,seed=0"
    write_fake_run(ref, (1.0,), 1.0, steps=2, eval_every=2)
    (ref / "rl" / "final_per_task.json").write_text(
        json.dumps({m: [1.0] * len(v) for m, v in final.items()})
    )
    # A saved aggregate of a 4-level dose-response (as experiments.aggregate --trend writes it):
    # its trend is plotted, and a 3-level one is fitted in the notebook over its gains.
    xs, rng = [0.0, 0.1, 0.5, 1.0], np.random.default_rng(0)
    gain = {(x, s): 0.2 * x + 0.05 * rng.standard_normal() for x in xs for s in range(3)}
    saved = R.merge_gains(
        [
            {
                "runs": {
                    f"actfocus.alpha={x:g},seed={s}": {"greedy": {"mean": g}}
                    for (x, s), g in gain.items()
                }
            }
        ]
    )
    spec = "|".join(f"{x:g}:actfocus.alpha={x:g}" for x in xs)
    trends = R.variant_trends(saved, [R.parse_trend(spec)])
    (tmp_path / "agg.json").write_text(
        json.dumps({"held_out_gain": saved, "variant_trends": trends})
    )
    env = dict(
        kernel_env,
        ACTFOCUS_NB_RUN_DIRS=tiny_run["run"],
        ACTFOCUS_NB_SWEEP_DIR=str(tiny_run["sweep"]),
        ACTFOCUS_NB_BASELINE=str(tmp_path / "base.json"),
        ACTFOCUS_NB_REFERENCE_RUNS=str(ref),
        ACTFOCUS_NB_AGGREGATE=str(tmp_path / "agg.json"),
        ACTFOCUS_NB_TRENDS="0:actfocus.alpha=0|0.5:actfocus.alpha=0.5|1:actfocus.alpha=1",
    )
    data, text = _execute("results.ipynb", env, monkeypatch, NOTEBOOKS)
    images = [d for d in data if "image/png" in d]
    tables = [d["text/markdown"] for d in data if "text/markdown" in d]
    # learning curves, per-variant bars, held-out gains, differences from the reference, seed
    # means, the saved and the fitted dose-response
    assert len(images) >= 7
    assert "agg.json: 1 saved dose-responses" in text
    assert "levels: 0: actfocus.alpha=0, 0.1: actfocus.alpha=0.1, 0.5:" in text
    # The fitted slope over the three levels: NumPy's least-squares line through the level means.
    fitted = next(t for t in tables if t.startswith("| levels (x: variant) |"))
    level_means = [np.mean([gain[x, s] for s in range(3)]) for x in (0.0, 0.5, 1.0)]
    slope = np.polyfit([0.0, 0.5, 1.0], level_means, 1)[0]
    assert f"{slope:+.3f} [" in fitted.splitlines()[2]
    assert any(t.startswith("| run | metric") for t in tables)
    agg_table = next(t for t in tables if t.startswith("| variant | metric"))
    assert "actfocus.enabled=false | greedy/success | 2 |" in agg_table
    gain_table = next(t for t in tables if t.startswith("| variant | seed"))
    row = next(x for x in gain_table.splitlines() if x.startswith("| actfocus.enabled=true | 0 |"))
    assert f"{np.mean(final['greedy']):+.3f}" in row
    modes = " / ".join(m for m in ("greedy", "sampled") if m in final)
    per_seed = next(t for t in tables if t.startswith(f"| variant | seed 0 {modes} gain |"))
    assert per_seed.splitlines()[2].startswith("| actfocus.enabled=true | ")
    ref_table = [t for t in tables if t.startswith("| variant | seed |")][1]
    row = next(x for x in ref_table.splitlines() if x.startswith("| actfocus.enabled=true | 0 |"))
    assert f"{np.mean(final['greedy']) - 1.0:+.3f}" in row
    assert "no reference of their seed: actfocus.enabled=false,seed=0" in text
    assert "1 runs" in text


@pytest.mark.parametrize("name", ["action_bottleneck.ipynb", "results.ipynb"])
def test_committed_notebooks_are_clean(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "os.environ.get(" in code[0].source
