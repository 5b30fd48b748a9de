"""Policy / value models (Qwen2 / Llama family in Flax NNX), KV-cache sampling and HF checkpoint I/O."""

from actfocus_jax.models.config import (
    LOGICAL_AXES,
    PRESETS,
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    ModelConfigError,
    get_config,
)
from actfocus_jax.models.hf_io import CheckpointError, load_pretrained, save_pretrained
from actfocus_jax.models.sampling import (
    GenerateOutput,
    compact_left,
    generate,
    make_prompt_mask,
    sample_token,
    score,
    token_logprobs,
)
from actfocus_jax.models.transformer import (
    Backbone,
    CausalLM,
    KVCache,
    ValueModel,
    apply,
    apply_values,
    as_graph_state,
    forward_with_cache,
    init_cache,
    init_model,
    value_model_from_policy,
)

__all__ = [
    "LOGICAL_AXES",
    "PRESETS",
    "SUPPORTED_ARCHITECTURES",
    "Backbone",
    "CausalLM",
    "CheckpointError",
    "GenerateOutput",
    "KVCache",
    "ModelConfig",
    "ModelConfigError",
    "ValueModel",
    "apply",
    "apply_values",
    "as_graph_state",
    "compact_left",
    "forward_with_cache",
    "generate",
    "get_config",
    "init_cache",
    "init_model",
    "load_pretrained",
    "make_prompt_mask",
    "sample_token",
    "save_pretrained",
    "score",
    "token_logprobs",
    "value_model_from_policy",
]
