"""Multi-turn rollouts and the token-role codes."""

from actfocus_jax.rollout.roles import ROLE_DTYPE, Role, is_generated

__all__ = ["ROLE_DTYPE", "Role", "is_generated"]
