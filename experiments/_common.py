"""Shared command-line plumbing of the entry points (absl flags + ml_collections config files)."""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "sokoban.py")

CONFIG = config_flags.DEFINE_config_file(
    "config",
    _DEFAULT_CONFIG,
    "Experiment config file; `path.py:preset` picks the model preset. Override any field with "
    "--config.<field>=<value>.",
    lock_config=True,
)
WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (default: config.workdir).")
