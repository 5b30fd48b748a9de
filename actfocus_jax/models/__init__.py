"""actfocus_jax.models."""
