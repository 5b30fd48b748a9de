"""The fused rollout sharded over a device mesh (8 host CPU devices) equals the unsharded one.

``rollout_fused(..., mesh=mesh)`` splits the episodes over the mesh's ``("data", "fsdp")`` axes. Every
random draw depends only on the key and the episode's row (partitionable threefry), so greedy and
sampled rollouts give the same episodes as one device (the bigram policy of ``tests/test_rollout.py``
and a tiny transformer): the same tokens, roles, rewards and counters exactly, and the float32
log-probs / entropies / logits up to the last bits (XLA's kernels for another per-device batch size
round differently, ~1e-6). The returned buffer is split on its batch dimension, and
on a pure data mesh the compiled loop exchanges nothing but the loops' "any episode running?" flags.
"""

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from test_rollout import build_setup, run_rollout

from actfocus_jax import envs
from actfocus_jax.models import get_config
from actfocus_jax.models.transformer import init_model
from actfocus_jax.parallel import BATCH_AXES, make_mesh, shard_params
from actfocus_jax.rollout.buffer import check_buffer
from actfocus_jax.rollout.engine import (
    RolloutConfig,
    make_turn_template,
    rollout_fused,
    transformer_policy,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")

GROUP = 2
NUM_TASKS = 4  # 8 episodes


def assert_batch_sharded(buf, mesh):
    """Every buffer array is split on its first axis over all ``data x fsdp`` shards."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for x in jax.tree.leaves(buf):
        spec = tuple(x.sharding.spec)
        assert spec[0] in (BATCH_AXES, "data", ("data",)), spec
        assert all(s is None for s in spec[1:]), spec
        rows = {s.data.shape[0] for s in x.addressable_shards}
        assert rows == {x.shape[0] // shards}
        assert len(x.sharding.device_set) == mesh.size


def assert_same_episodes(buf, ref):
    """Identical tokens, roles, rewards and counters; float32 per-token stats within 1e-5."""
    floats = ("old_logp", "entropy", "logit")
    for name, x in buf.items():
        if name in floats:
            np.testing.assert_allclose(np.asarray(x), ref[name], atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(x), ref[name], err_msg=name)


@pytest.fixture(scope="module")
def bigram():
    return build_setup(num_tasks=NUM_TASKS)


def test_bigram_greedy_sharded_over_data_equals_unsharded(bigram):
    cfg = RolloutConfig(max_turns=2, max_response_tokens=10, greedy=True)
    mesh = make_mesh(4, 1, 1)
    ref = run_rollout(bigram, "fused", cfg, key=1, group_size=GROUP)
    buf = run_rollout(bigram, "fused", cfg, key=1, group_size=GROUP, mesh=mesh)
    check_buffer(buf)
    assert_batch_sharded(buf, mesh)
    assert_same_episodes(buf, jax.tree.map(np.asarray, ref))


def test_batch_not_divisible_by_data_shards_is_a_clear_error():
    setup = build_setup(num_tasks=3)  # 3 x 2 = 6 episodes on 4 data shards
    cfg = RolloutConfig(max_turns=2, max_response_tokens=4)
    with pytest.raises(
        ValueError, match=r"6 episodes \(num_tasks=3 x group_size=2\).*multiple of 4"
    ):
        run_rollout(setup, "fused", cfg, group_size=GROUP, mesh=make_mesh(4, 1, 1))
    with pytest.raises(ValueError, match=r"data=2 x fsdp=2"):
        run_rollout(setup, "fused", cfg, group_size=GROUP, mesh=make_mesh(2, 2, 1))


@pytest.fixture(scope="module")
def tiny_lm():
    """A random 1-layer transformer in Sokoban, and its unsharded rollout (sampled: temperature 1)."""
    env = envs.make("sokoban", max_turns=2)
    tok = env.tokenizer
    config = get_config(
        "tiny",
        n_layers=1,
        d_model=64,
        mlp_dim=128,
        vocab_size=max(320, -(-tok.vocab_size // 64) * 64),
    )
    graphdef, params = nnx.split(init_model(config, 0))
    rng = np.random.default_rng(2)
    tasks = jax.tree.map(
        lambda *x: np.stack(x), *[env.generate_task(rng) for _ in range(NUM_TASKS)]
    )
    args = (tasks, np.arange(NUM_TASKS, dtype=np.int32), jax.random.key(0))
    kwargs = dict(
        policy=transformer_policy(graphdef, config),
        env=env,
        template=make_turn_template(tok, env.system_prompt(), "plain"),
        cfg=RolloutConfig(max_turns=2, max_response_tokens=8, temperature=1.0),
        group_size=GROUP,
        vocab=config.vocab_size,
    )
    ref = rollout_fused(params, *args, **kwargs)
    return params, args, kwargs, jax.tree.map(np.asarray, ref)


def test_transformer_sharded_over_data_keeps_episodes_local(tiny_lm):
    params, args, kwargs, ref = tiny_lm
    mesh = make_mesh(4, 1, 1)
    params = shard_params(params, mesh)  # replicated: no fsdp / tensor axes
    compiled = rollout_fused.lower(params, *args, mesh=mesh, **kwargs).compile()
    # Only the loops' conditions (any episode / response still running) cross devices: the
    # KV cache, buffer and environment state writes stay on the device that owns the rows.
    collectives = re.findall(
        r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(",
        compiled.as_text(),
    )
    assert collectives and all(c == ("pred[]", "all-reduce") for c in collectives), collectives
    buf = compiled(params, *args)
    check_buffer(buf)
    assert_batch_sharded(buf, mesh)
    assert_same_episodes(buf, ref)


def test_transformer_sharded_over_data_and_fsdp_equals_unsharded(tiny_lm):
    params, args, kwargs, ref = tiny_lm
    mesh = make_mesh(2, 2, 1)
    params = shard_params(params, mesh)  # the embedding dimension split over fsdp, as in training
    assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree.leaves(params))
    buf = rollout_fused(params, *args, mesh=mesh, **kwargs)
    assert buf.tokens.sharding.spec == PartitionSpec(BATCH_AXES)
    assert_batch_sharded(buf, mesh)
    assert_same_episodes(buf, ref)


def test_trainer_shards_fused_rollouts_over_data_shards(tmp_path):
    from test_trainer import tiny_config

    from actfocus_jax.train.trainer import Experiment

    def mesh_of(**kw):
        return Experiment(tiny_config(tmp_path, **kw)).rollout_mesh()

    assert dict(mesh_of(**{"mesh.data": 2}).shape) == {"data": 2, "fsdp": 1, "tensor": 1}
    assert dict(mesh_of(**{"mesh.data": 1, "mesh.fsdp": 2}).shape)["fsdp"] == 2
    assert mesh_of(**{"mesh.data": 1, "mesh.tensor": 2}) is None  # one data shard: unsharded
    assert mesh_of(**{"mesh.data": 2, "rollout.path": "host"}) is None
