"""What a result was produced on: library versions, devices and the CPU's vector extensions.

A float32 run on XLA:CPU reproduced bit for bit on one machine here, but the main job with the
same code, seed and library versions landed on another warm start on another machine (README,
"Main-job numbers"). XLA compiles for the host's vector extensions (AVX2, AVX-512, ...), which can
change the order of float reductions; the earlier machines' extensions were not recorded, so that
is the likely cause, not a verified one. From now on every summary the trainer and the main job
write carries :func:`machine_info`, so two results can be compared knowing whether they came from
the same kind of machine.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

__all__ = ["cpu_features", "cpu_model", "machine_info"]

# The /proc/cpuinfo flags (x86) and features (arm64) that change what XLA:CPU emits.
_VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "asimd",
    "asimdhp",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "ml_dtypes")


def _cpuinfo_lines(path: str = "/proc/cpuinfo") -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []


def cpu_model(path: str = "/proc/cpuinfo") -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``, else None."""
    for line in _cpuinfo_lines(path):
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return platform.processor() or None


def cpu_features(path: str = "/proc/cpuinfo") -> list[str] | None:
    """The vector extensions of the first CPU that XLA:CPU can compile for (sorted), from the
    ``flags`` (x86) or ``Features`` (arm64) line of ``/proc/cpuinfo``; None where there is none."""
    for line in _cpuinfo_lines(path):
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present = set(value.split())
            return sorted(f for f in _VECTOR_FLAGS if f in present)
    return None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """A JSON-serialisable record of the machine and software a result came from."""
    import jax

    devices = jax.devices()
    return dict(
        libraries={name: _version(name) for name in _LIBRARIES},
        python=sys.version.split()[0],
        arch=platform.machine(),
        cpu_model=cpu_model(),
        cpu_features=cpu_features(),
        cpu_count=os.cpu_count(),
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        device_count=len(devices),
        process_count=jax.process_count(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
