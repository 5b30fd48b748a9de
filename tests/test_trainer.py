"""End-to-end trainer tests at tiny sizes: every algorithm x ActFocus, every environment (WebShop
through the host loop), exact resume, checkpoint corruption fallback, NaN handling, config errors."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from actfocus_jax.models import save_pretrained
from actfocus_jax.train.config import ConfigError, validate
from actfocus_jax.train.trainer import Experiment, TrainingDivergedError
from experiments.configs.base import get_base_config


def tiny_config(tmp_path, env="sokoban", **kw):
    c = get_base_config(env, "tiny")
    c.workdir = str(tmp_path / "run")
    c.data_dir = str(tmp_path / "data")
    c.model.init = "random"
    c.debug = True  # chex checks of every rollout buffer (shapes, dtypes, finiteness, layout)
    c.model.n_layers = 1
    c.model.d_model = 64
    c.model.mlp_dim = 128
    c.data.num_train = 16
    c.data.num_test = 4
    c.rollout.num_tasks = 2
    c.rollout.group_size = 2
    c.rollout.max_response_tokens = 12
    c.env.max_turns = 2
    c.train.steps = 2
    c.train.eval_every = 0
    c.train.save_every = 1
    c.eval.num_tasks = 2
    c.eval.batch_size = 2
    c.eval.sampled = False
    c.optim.warmup_steps = 0
    c.optim.learning_rate = 1e-3
    c.mesh.data = 2  # the batch (4 episodes) is sharded over 2 of the test's 8 host devices
    # A random policy gets the same reward in every rollout, so GRPO's advantages are all zero; the
    # entropy bonus keeps the gradient non-zero so that "parameters change" is a real check.
    c.algo.entropy_coef = 0.01
    for key, value in kw.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def final_params(workdir):
    return load_file(os.path.join(workdir, "rl", "final_policy", "model.safetensors"))


def metrics_without_time(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "rl", "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]


def assert_trained(exp, c):
    """Finite losses at every step, and the final policy differs from the (seeded) initial one."""
    rows = metrics_without_time(c.workdir)
    assert [r["step"] for r in rows] == list(range(1, c.train.steps + 1))
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    after = final_params(c.workdir)
    init_dir = os.path.join(c.workdir, "init")
    save_pretrained(Experiment(c).init_policy(), exp.tokenizer, init_dir)
    init_w = load_file(os.path.join(init_dir, "model.safetensors"))
    assert after.keys() == init_w.keys()
    assert any(not np.array_equal(after[k], init_w[k]) for k in init_w)


@pytest.mark.parametrize(
    "algo,actfocus", [("grpo", True), ("grpo", False), ("ppo", True), ("ppo", False)]
)
def test_end_to_end_algorithms(tmp_path, algo, actfocus):
    c = tiny_config(tmp_path, **{"algo.algo": algo, "actfocus.enabled": actfocus})
    exp = Experiment(c)
    summary = exp.run_rl()
    assert "final/greedy/success" in summary["final"]
    assert_trained(exp, c)
    with open(os.path.join(c.workdir, "rl", "config.json")) as f:
        saved = json.load(f)
    assert (saved["algo"]["algo"], saved["actfocus"]["enabled"]) == (algo, actfocus)
    rl = os.path.join(c.workdir, "rl")
    assert os.path.getsize(os.path.join(rl, "curves.png")) > 0
    with open(os.path.join(rl, "summary.txt")) as f:
        table = f.read()
    assert "rollout/success" in table and "train/loss" in table
    assert "eval/success" not in table  # tiny_config has no periodic evaluation


@pytest.mark.parametrize("env", ["frozenlake", "sudoku", "webshop"])
def test_end_to_end_environments(tmp_path, env):
    extra = {"rollout.path": "host"} if env == "webshop" else {}
    if env == "webshop":
        extra["env.max_actions_per_episode"] = 2
        extra["model.remat"] = True  # WebShop's long sequences are where it is meant for
    if env == "sudoku":  # runtime model / optimiser options reach the run
        extra.update({"model.scan_unroll": 2, "optim.optimizer": "sgd", "optim.b1": 0.0})
    c = tiny_config(tmp_path, env, **extra)
    exp = Experiment(c)
    exp.run_rl()
    assert_trained(exp, c)
    if env == "sudoku":
        assert exp.policy_config.scan_unroll == 2
    assert exp.policy_config.remat == (env == "webshop")


def test_resume_is_exact_and_survives_interrupted_and_corrupted_checkpoints(tmp_path):
    # With a KL term (as the main job): the frozen reference must come back from the checkpoint,
    # not be re-copied from the resumed policy.
    kw = {"train.keep": 5, "algo.kl_coef": 0.05}
    full = tiny_config(tmp_path / "a", **{"train.steps": 4, **kw})
    Experiment(full).run_rl()

    part = tiny_config(tmp_path / "b", **{"train.steps": 2, **kw})
    Experiment(part).run_rl()
    ckpt_dir = os.path.join(part.workdir, "rl", "checkpoints")
    # A write killed half-way leaves an orbax temporary directory: it must be ignored.
    os.makedirs(os.path.join(ckpt_dir, "3.orbax-checkpoint-tmp", "state"))
    resumed = tiny_config(tmp_path / "b", **{"train.steps": 4, **kw})
    Experiment(resumed).run_rl(resume=True)
    a, b = final_params(full.workdir), final_params(part.workdir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert metrics_without_time(full.workdir) == metrics_without_time(part.workdir)

    # Corrupt the newest checkpoint: resuming falls back to the previous good one and still ends
    # with the same parameters.
    state_dir = os.path.join(ckpt_dir, "4", "state")
    shutil.rmtree(state_dir)
    os.makedirs(state_dir)
    again = tiny_config(tmp_path / "b", **{"train.steps": 4, **kw})
    Experiment(again).run_rl(resume=True)
    c = final_params(part.workdir)
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from actfocus_jax.train.checkpoint import CheckpointNotFoundError

    c = tiny_config(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="resume"):
        Experiment(c).run_rl(resume=True)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    # One minibatch per step: step 1's update (lr 1e30) is finite but blows the parameters up, so
    # step 2's loss is not finite and the run must stop with the step-1 checkpoint intact.
    c = tiny_config(
        tmp_path, **{"train.steps": 3, "optim.learning_rate": 1e30, "algo.num_minibatches": 1}
    )
    c.debug = False  # debug mode would stop earlier, at the chex check of step 2's NaN rollout
    with pytest.raises(TrainingDivergedError, match="last good checkpoint"):
        Experiment(c).run_rl()
    from actfocus_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(os.path.join(c.workdir, "rl"))
    assert ckpt.all_steps() == [1]
    restored = ckpt.restore(1)
    assert restored.data_position == {"epoch": 0, "index": 2}
    ckpt.close()


def test_config_errors_name_the_field(tmp_path):
    c = tiny_config(tmp_path, **{"rollout.group_size": 1})
    with pytest.raises(ConfigError, match=r"rollout\.group_size"):
        validate(c)
    c = tiny_config(tmp_path, **{"algo.num_minibatches": 3})
    with pytest.raises(ConfigError, match="num_minibatches"):
        validate(c)
    c = tiny_config(tmp_path, "webshop")
    with pytest.raises(ConfigError, match=r"rollout\.path"):
        validate(c)
    c = tiny_config(tmp_path, **{"actfocus.tau": 0.0})
    with pytest.raises(ConfigError, match="tau"):
        validate(c)
    c = tiny_config(tmp_path, **{"optim.optimizer": "lion"})
    with pytest.raises(ConfigError, match=r"optim\.optimizer"):
        validate(c)
    c = tiny_config(tmp_path, **{"optim.eps": 0.0})
    with pytest.raises(ConfigError, match=r"optim\.eps"):
        validate(c)
    c = tiny_config(tmp_path, **{"algo.algo": "ppo", "algo.turn_baseline": True})
    with pytest.raises(ConfigError, match="turn_baseline"):
        validate(c)
    c = tiny_config(tmp_path, **{"algo.turn_baseline": True, "algo.shuffle_advantages": True})
    with pytest.raises(ConfigError, match="shuffle_advantages"):
        validate(c)
    c = tiny_config(tmp_path, **{"model.init": "sft"})
    with pytest.raises(FileNotFoundError, match=r"experiments\.sft"):
        Experiment(c).init_policy()


@pytest.mark.fresh_process  # its xdist worker died in XLA:CPU compiles (tests/_fresh_process.py)
def test_main_job_reports_the_held_out_gain_paired_by_task(tmp_path):
    """experiments.main end to end at tiny sizes: SFT, warm-start evaluation, RL, final evaluation,
    and the paired held-out gain computed from the per-task files both evaluations write."""
    from experiments.main import run_main

    c = tiny_config(
        tmp_path,
        **{
            "model.init": "sft",
            "sft.steps": 2,
            "sft.batch_size": 2,
            "sft.num_tasks": 4,
            "sft.demos_per_task": 1,
            "sft.max_len": 256,
            "eval.num_tasks": 3,
            "eval.sampled": True,
            "eval.samples_per_task": 3,
        },
    )
    result = run_main(c)
    assert result["sft"]["demos_served"] == 2 * 2  # steps x batch size
    assert 0 <= result["sft"]["demos_truncated"] <= 4
    with open(os.path.join(c.workdir, "main_result.json")) as f:
        saved = json.load(f)
    assert saved["held_out_gain"] == json.loads(json.dumps(result["held_out_gain"]))
    with open(os.path.join(c.workdir, "rl", "summary.json")) as f:
        rl_machine = json.load(f)["machine"]
    # Both summaries say what they ran on (the versions a re-run must match to reproduce them).
    assert saved["machine"] == rl_machine
    assert rl_machine["libraries"]["numpy"] == np.__version__
    warm_path = os.path.join(c.workdir, "warm_start_per_task.json")
    with open(warm_path) as f:
        before = json.load(f)
    with open(os.path.join(c.workdir, "rl", "final_per_task.json")) as f:
        after = json.load(f)
    for mode, k in (("greedy", 1), ("sampled", 3)):
        # per-task rates average k episodes each and agree with the aggregate success rate
        for per_task, metrics in ((before, result["warm_start"]), (after, result["final"])):
            rates = np.asarray(per_task[mode])
            assert rates.shape == (3,)
            np.testing.assert_allclose(rates * k, np.round(rates * k), atol=1e-9)
            key = f"{mode}/success" if metrics is result["warm_start"] else f"final/{mode}/success"
            assert np.isclose(rates.mean(), metrics[key])
        g = result["held_out_gain"][mode]
        diff = np.asarray(after[mode]) - np.asarray(before[mode])
        assert g["n"] == 3 and np.isclose(g["mean"], diff.mean())
    # The same policy evaluated twice with the same seed plays the same episodes (paired keys).
    exp = Experiment(c)
    graphdef, params = nnx.split(exp.init_policy())
    _, r1 = exp.evaluate_tasks(graphdef, params, greedy=False, samples_per_task=3)
    _, r2 = exp.evaluate_tasks(graphdef, params, greedy=False, samples_per_task=3)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(r1, before["sampled"])  # the SFT policy, as in the main job
    # experiments.evaluate --baseline: the final policy against the warm start's per-task file.
    out = exp.evaluate_checkpoint("rl", baseline_path=warm_path)
    for mode in ("greedy", "sampled"):
        assert np.isclose(out[f"gain/{mode}/success"], result["held_out_gain"][mode]["mean"])
        assert out[f"gain/{mode}/success_lo"] <= out[f"gain/{mode}/success"]
