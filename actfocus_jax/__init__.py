"""actfocus_jax: agentic RL of language models in JAX/Flax with ActFocus token reweighting.

Subpackages:
  models    Flax NNX Qwen2/Llama-family decoder, KV-cache sampling, scoring, Hugging Face I/O.
  text      tokenizers (embedded word-level tokenizer, Hugging Face tokenizer.json), chat formats.
  envs      pure-JAX Sokoban / FrozenLake / Sudoku and the host WebShop environment.
  rollout   token roles and multi-turn rollouts.
  rl        advantages, losses, ActFocus token weights, train step.
"""

__version__ = "0.1.0"
