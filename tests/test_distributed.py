"""Two local processes with ``jax.distributed`` (gloo CPU collectives) equal a single-process step.

Two worker processes (``tests/_distributed_worker.py``), each with 2 host CPU devices, join a
coordinator on a free loopback port and run one :func:`train_step` on a 4-device global mesh
(``data=2 x fsdp=2`` with the data axis across the processes, and ``fsdp=2 x tensor=2`` with the fsdp
axis across the processes, so gradients / FSDP all-gathers cross the process boundary). The batch is
assembled with ``jax.make_array_from_process_local_data`` (each process supplies only its rows) and
the parameters with ``jax.make_array_from_callback``. The loss and the updated parameters must equal
this process's single-device run within 1e-5.

The optimiser is SGD, as in ``tests/test_sharding.py``: Adam's first update is ``lr * g / (|g| + eps)``,
about ``lr * sign(g)``, which turns the reduction-order noise of sharded sums on near-zero gradients
into full-size parameter differences and would test Adam's sign sensitivity, not the distribution.

Everything is bounded: the coordinator and gloo wait at most 60 s, the workers are killed after
``TIMEOUT`` seconds. Loopback only (``127.0.0.1``).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "_distributed_worker.py"
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT = 150  # s, for both workers together (startup + 2 compilations each, on a busy 2-core box)

_spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference():
    """The single-process, single-device step on the same problem."""
    from actfocus_jax.rl.train_step import init_train_state, train_step

    model, statics, batch = worker.build_problem()
    state = init_train_state(model, statics)
    batch = jax.tree.map(jnp.asarray, batch)
    state, metrics = train_step(state, batch, jax.random.key(0), statics=statics)
    return float(metrics.loss), [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Launches the workers, computes the reference while they run, then waits for them."""
    if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
        pytest.skip("this jax has no jax_cpu_collectives_implementation (gloo CPU collectives)")
    out = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS} "
        "--xla_cpu_experimental_ynn_fusion_type=",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    )
    procs, logs = [], []
    try:
        for i in range(NUM_PROCESSES):
            log = open(out / f"worker_{i}.log", "w+")
            logs.append(log)
            cmd = [sys.executable, str(WORKER), "--process-id", str(i)]
            cmd += ["--num-processes", str(NUM_PROCESSES), "--port", str(port), "--out", str(out)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        reference = _reference()
        deadline = time.monotonic() + TIMEOUT
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append("timeout")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for i, log in enumerate(logs):
        log.seek(0)
        texts.append(f"--- worker {i} (exit {procs[i].returncode}) ---\n{log.read()[-4000:]}")
        log.close()
    if codes != [0] * NUM_PROCESSES:
        pytest.fail(f"distributed workers failed ({codes}):\n" + "\n".join(texts))
    return out, reference


@pytest.mark.parametrize("mesh_name", list(worker.MESHES))
def test_two_process_step_matches_single_process(results, mesh_name):
    out, (loss_ref, params_ref) = results
    for pid in range(NUM_PROCESSES):
        res = np.load(out / f"result_{mesh_name}_{pid}.npz")
        assert abs(float(res["loss"]) - loss_ref) <= 1e-5
        params = [res[f"p{i}"] for i in range(len(params_ref))]
        assert len(res.files) == len(params_ref) + 1
        for a, b in zip(params, params_ref, strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5)
