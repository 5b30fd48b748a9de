"""One process of the multi-process train-step test (launched by ``tests/test_distributed.py``).

Usage: ``python tests/_distributed_worker.py --process-id I --num-processes N --port P --out DIR``.

Each process joins ``jax.distributed`` on ``127.0.0.1:P`` with CPU collectives (gloo), builds a
global mesh over all processes' host CPU devices, builds the global parameters with
``jax.make_array_from_callback`` and the global batch with ``jax.make_array_from_process_local_data``
(each process only supplies the rows its own devices hold), runs one :func:`train_step`, and writes
the loss and the gathered parameters to ``DIR/result_<mesh>_<I>.npz``.

The module is also imported by the test for :func:`build_problem` (the model, optimiser and batch
shared with the single-process reference); importing it has no side effects.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

B, L = 8, 24
#: Mesh shapes (data, fsdp, tensor) run by the worker; device order is process-major, so in
#: "dp2-fsdp2" the data axis spans the processes, in "fsdp2-tp2" the fsdp axis does.
MESHES = {"dp2-fsdp2": (2, 2, 1), "fsdp2-tp2": (1, 2, 2)}


def make_batch(vocab: int):
    """A synthetic rollout batch (NumPy leaves) shared by this worker and ``tests/test_sharding.py``."""
    from actfocus_jax.rl.train_step import TrainBatch
    from actfocus_jax.rollout import Role

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


def build_problem():
    """``(model, statics, batch)``: tiny 2-layer model, GRPO + ActFocus + KL, SGD (see the test)."""
    import optax
    from flax import nnx

    from actfocus_jax.models import get_config
    from actfocus_jax.models.transformer import init_model
    from actfocus_jax.rl.actfocus import ActFocusConfig
    from actfocus_jax.rl.train_step import AlgoConfig, TrainStatics

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
    return model, statics, make_batch(config.vocab_size)


def _global_from_host(x: np.ndarray, sharding):
    """A global array from a value every process knows in full (each fills its own shards)."""
    x = np.asarray(x)
    return __import__("jax").make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def run_mesh(mesh_sizes, statics, model, batch):
    """One train step on the global mesh; returns ``(loss, params)`` as host NumPy (all processes)."""
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from actfocus_jax.parallel import BATCH_AXES, make_mesh, param_shardings
    from actfocus_jax.rl.train_step import init_train_state, train_step

    mesh = make_mesh(*mesh_sizes)  # over jax.devices(): every process's devices
    _, params = nnx.split(model)
    host_params = jax.tree.map(np.asarray, params)
    shardings = param_shardings(params, mesh)
    global_params = jax.tree.map(_global_from_host, host_params, shardings)
    state = init_train_state(model, statics)
    state = state.replace(
        params=global_params,
        ref_params=jax.tree.map(_global_from_host, host_params, shardings),
        opt_state=statics.optimizer.init(global_params),
    )

    # Rows of the batch this process supplies: the rows its addressable devices hold.
    n_dp = mesh.shape["data"] * mesh.shape["fsdp"]
    rows_per_shard = B // n_dp

    def put(x):
        x = np.asarray(x)
        sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1))))
        idx = sharding.addressable_devices_indices_map(x.shape)
        starts = sorted({(sl[0].start or 0) for sl in idx.values()})
        local = np.concatenate([x[s : s + rows_per_shard] for s in starts])
        return jax.make_array_from_process_local_data(sharding, local, x.shape)

    gbatch = jax.tree.map(put, batch)
    key = _global_from_host(
        jax.random.key_data(jax.random.key(0)), NamedSharding(mesh, PartitionSpec())
    )
    key = jax.random.wrap_key_data(key)
    state, metrics = train_step(state, gbatch, key, statics=statics)
    loss = float(np.asarray(metrics.loss.addressable_data(0)))
    params_np = multihost_utils.process_allgather(state.params, tiled=True)
    return loss, jax.tree.map(np.asarray, params_np)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--meshes", default=",".join(MESHES))
    args = p.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    print(
        f"[worker {jax.process_index()}/{jax.process_count()}] local devices "
        f"{jax.local_device_count()}, global {jax.device_count()}",
        flush=True,
    )
    model, statics, batch = build_problem()
    for name in args.meshes.split(","):
        loss, params = run_mesh(MESHES[name], statics, model, batch)
        leaves = {f"p{i}": a for i, a in enumerate(jax.tree.leaves(params))}
        np.savez(
            os.path.join(args.out, f"result_{name}_{args.process_id}.npz"),
            loss=np.float64(loss),
            **leaves,
        )
        print(f"[worker {args.process_id}] {name}: loss {loss:.8f}", flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
