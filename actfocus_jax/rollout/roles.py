"""Token roles (DESIGN.md section 2).

Every position of a multi-turn trajectory carries one int8 role code:

* ``PROMPT`` (0): system / task prompt / observation text. Never trained on.
* ``REASONING`` (1): generated tokens outside the answer span.
* ``ACTION`` (2): generated tokens from ``<answer>`` to ``</answer>`` inclusive.
* ``PAD`` (3): padding.
"""

from __future__ import annotations

import enum

import jax.numpy as jnp

__all__ = ["ROLE_DTYPE", "Role", "is_generated"]

ROLE_DTYPE = jnp.int8


class Role(enum.IntEnum):
    """Int8 token-role codes shared by rollouts, losses, ActFocus and the analysis."""

    PROMPT = 0
    REASONING = 1
    ACTION = 2
    PAD = 3


def is_generated(roles: jnp.ndarray) -> jnp.ndarray:
    """Boolean mask of generated positions (REASONING or ACTION), same shape as ``roles``."""
    return (roles == Role.REASONING) | (roles == Role.ACTION)
