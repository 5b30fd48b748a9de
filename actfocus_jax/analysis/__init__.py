"""actfocus_jax.analysis."""
