"""Trainer utilities: Orbax checkpoints (:mod:`.checkpoint`) and metrics logging (:mod:`.logging`).

Importing this package is cheap: the submodules (which import JAX, Orbax, TensorBoard, matplotlib)
load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointCorruptedError": "checkpoint",
    "CheckpointError": "checkpoint",
    "CheckpointIncompatibleError": "checkpoint",
    "CheckpointNotFoundError": "checkpoint",
    "Checkpointer": "checkpoint",
    "ConfigMismatchError": "checkpoint",
    "Restored": "checkpoint",
    "check_config": "checkpoint",
    "to_jsonable": "checkpoint",
    "MetricsLogger": "logging",
    "flatten_metrics": "logging",
    "plot_curves": "logging",
    "read_metrics": "logging",
    "summary_table": "logging",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
