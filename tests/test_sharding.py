"""Sharded train step on 8 host CPU devices equals the single-device step (within 1e-5).

The optimiser here is SGD: Adam's first update is ``lr * g / (|g| + eps)``, i.e. about ``lr * sign(g)``,
which turns reduction-order noise on parameters whose gradient is ~0 into full-size differences and
would test Adam's sign sensitivity rather than the sharding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from actfocus_jax.models import get_config
from actfocus_jax.models.transformer import init_model
from actfocus_jax.parallel import logical_to_mesh, make_mesh, shard_batch, shard_params
from actfocus_jax.rl.actfocus import ActFocusConfig
from actfocus_jax.rl.train_step import (
    AlgoConfig,
    TrainBatch,
    TrainStatics,
    init_train_state,
    train_step,
)
from actfocus_jax.rollout import Role

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")

B, L = 8, 24


def _batch(vocab):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (B, L)).astype(np.int32)
    length = rng.integers(L // 2, L + 1, B)
    valid = np.arange(L)[None, :] < length[:, None]
    roles = np.where(np.arange(L)[None, :] < 6, Role.PROMPT, rng.integers(1, 3, (B, L)))
    roles = np.where(valid, roles, Role.PAD).astype(np.int8)
    gen = (roles == Role.REASONING) | (roles == Role.ACTION)
    turn_ids = np.where(valid, np.arange(L)[None, :] // 12, -1).astype(np.int32)
    old_logp = np.where(gen, -rng.uniform(0.5, 4.0, (B, L)), 0.0).astype(np.float32)
    rewards = rng.normal(size=B).astype(np.float32)
    token_rewards = np.zeros((B, L), np.float32)
    token_rewards[np.arange(B), length - 1] = rewards
    return TrainBatch(
        tokens=tokens,
        valid=valid,
        loss_mask=gen,
        roles=roles,
        turn_ids=turn_ids,
        old_logp=old_logp,
        entropy=np.abs(old_logp),
        logit=-old_logp,
        token_rewards=token_rewards,
        episode_return=rewards,
    )


def _run(mesh_sizes):
    config = get_config("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16)
    model = init_model(config, 0)
    graphdef, _ = nnx.split(model)
    statics = TrainStatics(
        policy_graphdef=graphdef,
        critic_graphdef=None,
        optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5)),
        critic_optimizer=None,
        config=AlgoConfig(group_size=4, num_minibatches=2, kl_coef=0.01, actfocus=ActFocusConfig()),
    )
    state = init_train_state(model, statics)
    batch = jax.tree.map(jnp.asarray, _batch(config.vocab_size))
    if mesh_sizes is not None:
        mesh = make_mesh(*mesh_sizes)
        state = state.replace(
            params=shard_params(state.params, mesh), ref_params=shard_params(state.ref_params, mesh)
        )
        state = state.replace(opt_state=statics.optimizer.init(state.params))
        batch = shard_batch(batch, mesh)
    state, metrics = train_step(state, batch, jax.random.key(0), statics=statics)
    return jax.tree.map(np.asarray, state.params), float(metrics.loss)


@pytest.fixture(scope="module")
def reference():
    return _run(None)


@pytest.mark.parametrize(
    "mesh_sizes", [(8, 1, 1), (2, 4, 1), (2, 2, 2)], ids=["dp8", "fsdp4", "dp2-fsdp2-tp2"]
)
def test_sharded_step_matches_single_device(reference, mesh_sizes):
    params_ref, loss_ref = reference
    params, loss = _run(mesh_sizes)
    assert abs(loss - loss_ref) <= 1e-5
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_logical_rules_replicate_non_divisible_dims():
    mesh = make_mesh(2, 2, 2)
    spec = logical_to_mesh(("vocab", "embed"), (10, 64), mesh)
    assert tuple(spec) == ("tensor", "fsdp")
    spec = logical_to_mesh(("vocab", "embed"), (9, 63), mesh)
    assert tuple(spec) == (None, None)
    with pytest.raises(ValueError, match="devices"):
        make_mesh(3, -1, 1)
    with pytest.raises(ValueError, match="devices"):
        make_mesh(3, 3, 1)
    assert make_mesh(2, 1, 1).devices.size == 2
