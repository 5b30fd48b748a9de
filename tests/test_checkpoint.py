"""Orbax checkpoints of the train state: bitwise round trip (params, AdamW state, PRNG keys),
sharded restore, keep-last-K, corrupted / incompatible / interrupted checkpoints, config checks."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from actfocus_jax.models import get_config, init_model
from actfocus_jax.rl.train_step import TrainState, make_optimizer
from actfocus_jax.train.checkpoint import (
    TMP_SUFFIX,
    CheckpointCorruptedError,
    Checkpointer,
    CheckpointError,
    CheckpointIncompatibleError,
    CheckpointNotFoundError,
    ConfigMismatchError,
)

REPO = Path(__file__).resolve().parents[1]
MODEL_KW = dict(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64)
CONFIG = {"model": {"name": "tiny", **MODEL_KW}, "algo": {"algo": "grpo", "kl_coef": 0.01}}


def make_state(seed: int = 0, d_model: int = 32, optimizer=None) -> TrainState:
    """A realistic TrainState after one AdamW step (non-zero moments, count = 1), with a reference.

    The model is a ``CausalLM`` built on the host (``init_model``: no XLA random kernels to compile).
    """
    model = init_model(get_config("tiny", **dict(MODEL_KW, d_model=d_model)), seed)
    _, params = nnx.split(model)
    opt = optimizer or make_optimizer(1e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed + 1)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)

    @jax.jit
    def one_step(params, grads):
        opt_state = opt.init(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    new_params, opt_state = one_step(params, grads)
    return TrainState(
        step=jnp.asarray(7, jnp.int32),
        params=new_params,
        opt_state=opt_state,
        ref_params=params,
    )


@pytest.fixture(scope="module")
def state():
    return make_state()


def assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def save(ckpt, step, st, key=None, **kw):
    ckpt.save(
        step,
        st,
        rng_key=jax.random.key(step) if key is None else key,
        data_position={"epoch": 1, "index": step},
        config=CONFIG,
        metrics={"train/loss": 0.5 * step},
        **kw,
    )


def test_round_trip_bitwise(tmp_path, state):
    key = jax.random.fold_in(jax.random.key(3), 11)
    with Checkpointer(tmp_path, save_every=5, max_to_keep=3) as ckpt:
        # An asynchronous save copies the arrays to host before returning: deleting (or donating)
        # them right after does not affect the checkpoint.
        doomed = jax.tree.map(jnp.copy, state)
        save(ckpt, 5, doomed, key=key)
        for x in jax.tree.leaves(doomed):
            x.delete()
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 5
        # Concrete target and abstract (ShapeDtypeStruct) target give the same result.
        for target in (state, jax.eval_shape(lambda: state)):
            r = ckpt.restore(target=target)
            assert r.step == 5
            assert_bitwise_equal(r.train_state, state)
            assert isinstance(r.train_state, TrainState)
            assert int(r.train_state.opt_state[1][0].count) == 1
            assert r.rng_key.dtype == key.dtype
            assert np.array_equal(jax.random.key_data(r.rng_key), jax.random.key_data(key))
            assert r.data_position == {"epoch": 1, "index": 5}
            assert r.config == CONFIG
            assert r.metrics == {"train/loss": 2.5}
    # A new process (new Checkpointer) sees the same checkpoint.
    r = Checkpointer(tmp_path, resume=True).restore(target=state)
    assert_bitwise_equal(r.train_state, state)


def test_typed_key_leaves_and_raw_rng(tmp_path):
    tree = {
        "keys": jax.random.split(jax.random.key(1, impl="rbg"), 3),
        "key": jax.random.key(2),
        "x": jnp.arange(4, dtype=jnp.bfloat16),
        "n": np.int64(5),
    }
    raw = jax.random.PRNGKey(9)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, tree, rng_key=raw, data_position={}, config={})
    r = ckpt.restore(target=tree)
    assert_bitwise_equal(r.train_state, jax.tree.map(jnp.asarray, tree))
    assert str(jax.random.key_impl(r.train_state["keys"])) == "rbg"
    assert r.rng_key.dtype == jnp.uint32 and np.array_equal(r.rng_key, raw)
    # No target: the stored nested dict, key leaves as raw key data.
    raw_tree = ckpt.restore().train_state
    assert np.array_equal(raw_tree["key"], jax.random.key_data(tree["key"]))
    ckpt.close()


def test_sharded_restore(tmp_path, state):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    P = jax.sharding.PartitionSpec

    def shard(x):
        spec = P("data", None) if x.ndim == 2 and x.shape[0] % 4 == 0 else P()
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    sharded = jax.tree.map(shard, state)
    ckpt = Checkpointer(tmp_path)
    save(ckpt, 1, state)  # saved unsharded, restored sharded
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), sharded
    )
    r = ckpt.restore(target=target)
    for got, want in zip(jax.tree.leaves(r.train_state), jax.tree.leaves(sharded)):
        assert got.sharding == want.sharding
    assert r.train_state.params["backbone"]["embed"].value.sharding.spec == P("data", None)
    assert_bitwise_equal(r.train_state, state)
    ckpt.close()


def test_keep_last_k_and_should_save(tmp_path):
    small = {"w": jnp.ones((3,))}
    ckpt = Checkpointer(tmp_path, save_every=10, max_to_keep=2)
    assert [s for s in range(0, 41) if ckpt.should_save(s)] == [10, 20, 30, 40]
    for s in (10, 20, 30, 40):
        ckpt.save(s, {"w": small["w"] * s}, data_position={"index": s}, config={})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [30, 40]
    assert sorted(os.listdir(ckpt.directory)) == ["30", "40"]
    assert float(ckpt.restore(30, target=small).train_state["w"][0]) == 30.0
    # Saving an existing step again replaces it.
    ckpt.save(40, {"w": small["w"] * -1}, data_position={}, config={})
    assert float(ckpt.restore(target=small).train_state["w"][0]) == -1.0
    with pytest.raises(CheckpointNotFoundError, match=r"step 20 .*available: \[30, 40\]"):
        ckpt.restore(20, target=small)
    ckpt.close()


def _truncate(paths):
    for p in paths:
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)


def _array_files(step_dir: Path):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    return files


CORRUPTIONS = {
    "truncated": lambda d: _truncate(_array_files(d)),
    "deleted": lambda d: [p.unlink() for p in _array_files(d)],
    "garbage_metadata": lambda d: (d / "state" / "_METADATA").write_text("{not json"),
    "garbage_manifest": lambda d: [
        p.write_bytes(b"\x00garbage" * 8) for p in (d / "state").rglob("manifest.ocdbt")
    ],
    "garbage_meta_json": lambda d: (d / "meta" / "metadata").write_text("]]"),
    "deleted_state_dir": lambda d: shutil.rmtree(d / "state"),
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("mode", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_falls_back(tmp_path, mode):
    small = {"w": jnp.arange(1000, dtype=jnp.float32), "b": {"c": jnp.ones((4, 4))}}
    ckpt = Checkpointer(tmp_path, max_to_keep=5, async_save=False)
    for s in (1, 2, 3):
        scaled = jax.tree.map(lambda x, s=s: x * s, small)
        ckpt.save(s, scaled, data_position={"index": s}, config={})
    CORRUPTIONS[mode](ckpt.step_dir(3))
    ckpt = Checkpointer(tmp_path, max_to_keep=5, resume=True)  # a resuming process
    assert ckpt.latest_step() == 3
    with pytest.raises(CheckpointCorruptedError, match=r"step 3 .* corrupted.*restore_latest_good"):
        ckpt.restore(target=small)
    r = ckpt.restore_latest_good(target=small)
    assert r.step == 2 and r.skipped == (3,) and r.data_position == {"index": 2}
    assert_bitwise_equal(r.train_state, jax.tree.map(lambda x: x * 2, small))
    assert ckpt.discard_after(r.step) == [3]
    assert ckpt.latest_step() == 2


def test_checksums_catch_bit_rot(tmp_path):
    small = {"w": jnp.arange(64, dtype=jnp.float32)}
    ckpt = Checkpointer(tmp_path, async_save=False, checksums=True)
    ckpt.save(1, small, data_position={}, config={})
    ckpt.save(2, small, data_position={}, config={})
    # Flip the stored checksum (stands in for a silent flip of an array byte).
    import json

    meta_file = ckpt.step_dir(2) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["layout"][0]["crc32"] ^= 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointCorruptedError, match="CRC32"):
        ckpt.restore(target=small)
    assert ckpt.restore_latest_good(target=small).step == 1


def test_all_corrupted(tmp_path):
    small = {"w": jnp.ones((8,))}
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, small, data_position={}, config={})
    shutil.rmtree(ckpt.step_dir(1) / "state")
    with pytest.raises(CheckpointCorruptedError, match="all 1 checkpoints"):
        ckpt.restore_latest_good(target=small)


def test_incompatible_target(tmp_path, state):
    ckpt = Checkpointer(tmp_path, async_save=False)
    save(ckpt, 1, state)
    bigger = jax.eval_shape(lambda: make_state(d_model=48))
    with pytest.raises(CheckpointIncompatibleError) as e:
        ckpt.restore(target=bigger)
    msg = str(e.value)
    assert ".params['backbone']['embed'].value" in msg
    assert "(1280, 32) float32" in msg and "(1280, 48) float32" in msg
    assert "Fix:" in msg
    # Another optimiser (SGD: no moments) -> structural mismatch naming the missing path.
    sgd = jax.eval_shape(lambda: make_state(optimizer=optax.sgd(1e-3)))
    with pytest.raises(CheckpointIncompatibleError, match=r"opt_state.*that the target lacks"):
        ckpt.restore(target=sgd)
    # A target lacking the reference params -> the checkpoint has entries the target lacks.
    no_ref = state.replace(ref_params=None)
    with pytest.raises(CheckpointIncompatibleError, match=r"\.ref_params.*that the target lacks"):
        ckpt.restore(target=no_ref)
    # Incompatibility is not corruption: no fallback to older checkpoints.
    with pytest.raises(CheckpointIncompatibleError):
        ckpt.restore_latest_good(target=bigger)
    # Different dtype.
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, state)
    with pytest.raises(CheckpointIncompatibleError, match=r"float32 vs target .* bfloat16"):
        ckpt.restore(target=bf16)


def test_config_mismatch(tmp_path, state):
    ckpt = Checkpointer(tmp_path, async_save=False)
    save(ckpt, 1, state)
    other = {"model": {**CONFIG["model"], "d_model": 64}, "algo": CONFIG["algo"]}
    with pytest.raises(ConfigMismatchError, match=r"'model.d_model' is 32 .* but 64"):
        ckpt.restore(target=state, config=other, must_match=["model.d_model", "algo.algo"])
    # Keys not asked for may differ.
    r = ckpt.restore(target=state, config=other, must_match=["algo.algo", "algo.kl_coef"])
    assert r.step == 1
    with pytest.raises(ConfigMismatchError, match="<missing>"):
        ckpt.restore(target=state, config=CONFIG, must_match=["model.rope_theta"])


def test_missing_workdir_and_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"does not exist.*--resume"):
        Checkpointer(tmp_path / "nope", resume=True)
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint in .*--resume"):
        Checkpointer(tmp_path, resume=True)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() is None
    with pytest.raises(CheckpointNotFoundError):
        ckpt.restore(target={"w": jnp.ones(2)})
    with pytest.raises(CheckpointNotFoundError):
        ckpt.restore_latest_good(target={"w": jnp.ones(2)})
    assert issubclass(CheckpointNotFoundError, CheckpointError)


def test_interrupted_write_simulated(tmp_path):
    """A save that died before Orbax's final rename leaves '<step>.orbax-checkpoint-tmp'."""
    small = {"w": jnp.arange(16.0)}
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, small, data_position={"index": 1}, config={})
    # As Orbax leaves it: everything but the state item written (and no rename).
    tmp = ckpt.directory / f"2{TMP_SUFFIX}"
    shutil.copytree(ckpt.step_dir(1), tmp)
    shutil.rmtree(tmp / "state")
    assert ckpt.latest_step() == 1
    resumed = Checkpointer(tmp_path, resume=True)
    assert resumed.latest_step() == 1 and resumed.all_steps() == [1]
    r = resumed.restore(target=small)
    assert r.step == 1 and r.data_position == {"index": 1}
    resumed.save(2, small, data_position={"index": 2}, config={})
    resumed.wait_until_finished()
    assert resumed.all_steps() == [1, 2]
    # Orbax deletes stale temporary dirs in the background when the next run opens the directory
    # (awaited before its first save).
    assert not tmp.exists()
    assert_bitwise_equal(resumed.restore(target=small).train_state, small)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from actfocus_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], async_save=False)
    ckpt.save(1, {"w": jnp.arange(8.0)}, data_position={"index": 1}, config={})
    print("saved", flush=True)
    big = jnp.ones((48 * 1024 * 1024,), jnp.float32)  # 192 MiB: a slow write
    for step in range(2, 50):
        ckpt.save(step, {"w": big}, data_position={"index": step}, config={})
    """
)


def test_killed_mid_save(tmp_path):
    """SIGKILL a process while it writes a large checkpoint: the previous one stays the latest."""
    script = tmp_path / "save.py"
    script.write_text(KILL_SCRIPT)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
        XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=",
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    ckpt_dir = tmp_path / "run" / "checkpoints"
    tmp = ckpt_dir / f"2{TMP_SUFFIX}"
    try:
        assert proc.stdout.readline().strip() == b"saved"
        deadline = time.time() + 30
        while not tmp.exists() and time.time() < deadline:
            time.sleep(0.005)
        assert tmp.exists(), "the large save never started"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert tmp.exists() and not (ckpt_dir / "2").exists()
    ckpt = Checkpointer(tmp_path / "run", resume=True)
    assert ckpt.latest_step() == 1
    r = ckpt.restore(target={"w": jnp.zeros(8)})
    assert r.data_position == {"index": 1}
    assert np.array_equal(r.train_state["w"], np.arange(8.0))
