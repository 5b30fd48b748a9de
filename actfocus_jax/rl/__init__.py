"""actfocus_jax.rl."""
