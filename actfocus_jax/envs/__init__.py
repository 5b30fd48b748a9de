"""actfocus_jax.envs."""
