"""Test configuration: 8 host CPU devices (for sharding tests) and float32 matmuls at full precision."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
    """'No tests collected' (exit 5) is not a failure for this project's CI."""
    if exitstatus == 5:
        session.exitstatus = 0
