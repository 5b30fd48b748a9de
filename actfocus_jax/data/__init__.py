"""actfocus_jax.data."""
