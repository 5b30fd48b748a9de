"""Sharded train step on 8 host CPU devices equals the single-device step (within 1e-5).

The optimiser here is SGD: Adam's first update is ``lr * g / (|g| + eps)``, i.e. about ``lr * sign(g)``,
which turns reduction-order noise on parameters whose gradient is ~0 into full-size differences and
would test Adam's sign sensitivity rather than the sharding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _distributed_worker import build_problem  # the same model, optimiser and batch

from actfocus_jax.parallel import logical_to_mesh, make_mesh, shard_batch, shard_params
from actfocus_jax.rl.train_step import init_train_state, train_step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")


def _run(mesh_sizes):
    model, statics, batch = build_problem()
    state = init_train_state(model, statics)
    batch = jax.tree.map(jnp.asarray, batch)
    if mesh_sizes is not None:
        mesh = make_mesh(*mesh_sizes)
        state = state.replace(
            params=shard_params(state.params, mesh),
            ref_params=shard_params(state.ref_params, mesh),
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
