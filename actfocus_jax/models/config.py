"""Model configuration for the Qwen2 / Llama decoder family (DESIGN.md section 7).

:class:`ModelConfig` is a frozen (hashable) dataclass, so it can be a static argument of ``jax.jit``.
Presets: ``tiny`` (the embedded CPU model; its vocabulary fits the embedded word-level tokenizer),
``qwen2.5-0.5b``, ``qwen2.5-1.5b`` and ``qwen2.5-3b`` (the real Qwen2.5 shapes, so real weights load).
:meth:`ModelConfig.from_hf_config` / :meth:`ModelConfig.to_hf_config` convert from / to a Hugging Face
``config.json`` dict (architectures ``Qwen2ForCausalLM`` and ``LlamaForCausalLM``).

Logical sharding axis names used to annotate parameters (a sharding module maps them to mesh axes):
``"vocab"``, ``"embed"``, ``"heads"``, ``"kv_heads"``, ``"mlp"``, ``"layers"``; ``None`` = replicated
(head_dim and norm scales).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "LOGICAL_AXES",
    "PRESETS",
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "ModelConfigError",
    "get_config",
]

#: Logical axis names that appear in the parameters' ``out_sharding`` metadata.
LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "mlp", "layers")
#: Hugging Face architectures this decoder implements.
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
_DTYPES = ("float32", "bfloat16", "float16")


class ModelConfigError(ValueError):
    """An invalid or unsupported model configuration."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only transformer (Qwen2 / Llama family).

    Attributes:
      vocab_size: rows of the embedding table (>= the tokenizer's vocab size).
      d_model: hidden size.
      n_layers: number of decoder blocks.
      n_heads: query heads; ``n_heads % n_kv_heads == 0`` (grouped-query attention).
      n_kv_heads: key/value heads.
      head_dim: per-head size (need not equal ``d_model // n_heads``); must be even (RoPE).
      mlp_dim: SwiGLU intermediate size.
      rope_theta: RoPE base frequency.
      rms_norm_eps: epsilon of RMSNorm.
      qkv_bias: biases on the q/k/v projections (Qwen2: True; Llama: False).
      tie_embeddings: the LM head reuses the embedding table.
      max_seq_len: longest sequence the model is meant for (HF ``max_position_embeddings``).
      param_dtype: storage dtype of the parameters (``"float32"`` / ``"bfloat16"`` / ``"float16"``).
      dtype: compute dtype of activations and matmuls. Softmax, norms and logits are float32.
      architecture: HF architecture name written to ``config.json``.
      scan_unroll: layers per iteration of the ``lax.scan`` over the stacked blocks (1 = a rolled
        loop, ``n_layers`` or more = fully unrolled). A runtime option, not part of the HF config:
        unrolling lets XLA fuse across layer boundaries (faster steps) at the price of compile time
        that grows with depth; ``python -m experiments.bench --suite unroll`` measures both.
      remat: recompute each decoder block's activations in the backward pass (``jax.checkpoint``
        on the layer scan's body) instead of keeping them: a train step keeps one block's
        attention tensors at a time rather than all ``n_layers`` (long sequences: WebShop), for
        about one more forward pass of compute. A runtime option, not part of the HF config.
      attn_block: query-block size of the full-sequence causal attention
        (:func:`actfocus_jax.models.transformer.causal_attention`): each block of queries only
        computes scores against the keys up to its end. Smaller blocks skip more of the causally
        masked square (``(n + 1) / 2n`` of it for ``n`` blocks) in more, smaller ops. A runtime
        option, not part of the HF config; the result is the same up to float summation order,
        so changing it changes a training run's float trajectory (``python -m experiments.bench
        --suite layout`` measures the step time).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    param_dtype: str = "float32"
    dtype: str = "float32"
    architecture: str = "Qwen2ForCausalLM"
    scan_unroll: int = 1
    remat: bool = False
    attn_block: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
            raise ModelConfigError(
                f"scan_unroll must be an int >= 1 (1 = rolled loop, >= n_layers = fully unrolled), "
                f"got {self.scan_unroll!r}"
            )
        if not isinstance(self.remat, bool):
            raise ModelConfigError(f"remat must be a bool, got {self.remat!r}")
        if not isinstance(self.attn_block, int) or self.attn_block < 1:
            raise ModelConfigError(
                f"attn_block must be an int >= 1 (query-block size of the causal attention; "
                f"{ModelConfig.attn_block} is the default), got {self.attn_block!r}"
            )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.mlp_dim, int) or self.mlp_dim <= 0:
            raise ModelConfigError(f"mlp_dim must be a positive int, got {self.mlp_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention shares each kv head among n_heads // n_kv_heads heads)"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ModelConfigError(
                    f"{name}={getattr(self, name)!r} is not supported; use one of {_DTYPES}"
                )
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"architecture {self.architecture!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ModelConfigError("rope_theta and rms_norm_eps must be positive")

    @property
    def n_groups(self) -> int:
        """Query heads per kv head."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters of the causal LM (embeddings counted once when tied)."""
        d, h, k, hd, m = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.mlp_dim
        attn = d * (h + 2 * k) * hd + h * hd * d + (h + 2 * k) * hd * int(self.qkv_bias)
        per_layer = attn + 3 * d * m + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Builds a config from a Hugging Face ``config.json`` dict.

        Args:
          hf: the parsed ``config.json``.
          **overrides: fields to set afterwards (e.g. ``param_dtype="bfloat16"``).

        Raises:
          ModelConfigError: unsupported architecture or feature (rope scaling, sliding window,
            MLP bias, ...), or missing keys.
        """
        archs = hf.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        arch = archs[0] if archs else None
        if arch is None:
            model_type = hf.get("model_type")
            arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}.get(model_type)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {arch!r} (model_type={hf.get('model_type')!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            d_model = int(hf["hidden_size"])
            n_heads = int(hf["num_attention_heads"])
            fields: dict[str, Any] = dict(
                vocab_size=int(hf["vocab_size"]),
                d_model=d_model,
                n_layers=int(hf["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                head_dim=int(hf.get("head_dim") or d_model // n_heads),
                mlp_dim=int(hf["intermediate_size"]),
            )
        except KeyError as e:
            raise ModelConfigError(f"config.json lacks the required key {e.args[0]!r}") from e
        # transformers >= 5 writes "rope_parameters" ({"rope_theta", "rope_type"}); older versions
        # write "rope_theta" and an optional "rope_scaling".
        rope_theta = hf.get("rope_theta")
        for key in ("rope_parameters", "rope_scaling"):
            rope = hf.get(key)
            if not rope:
                continue
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise ModelConfigError(
                    f"{key}={rope!r} is not supported; only plain RoPE (rope_type 'default') is "
                    "implemented"
                )
            rope_theta = rope_theta if rope_theta is not None else rope.get("rope_theta")
        if any(t != "full_attention" for t in hf.get("layer_types") or ()):
            raise ModelConfigError(
                f"layer_types={hf['layer_types']!r}: only 'full_attention' layers are supported"
            )
        if arch == "Qwen2ForCausalLM":
            if hf.get("use_sliding_window"):
                raise ModelConfigError(
                    "use_sliding_window=true is not supported; set it to false (Qwen2.5 default)"
                )
            qkv_bias = True  # Qwen2 always has q/k/v biases
        else:
            if hf.get("mlp_bias"):
                raise ModelConfigError("mlp_bias=true is not supported for LlamaForCausalLM")
            qkv_bias = bool(hf.get("attention_bias", False))
        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ModelConfigError(f"hidden_act={hidden_act!r} is not supported; only 'silu'")
        torch_dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        param_dtype = torch_dtype if torch_dtype in _DTYPES else "float32"
        fields.update(
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=qkv_bias,
            tie_embeddings=bool(hf.get("tie_word_embeddings", arch == "Qwen2ForCausalLM")),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            param_dtype=param_dtype,
            dtype=param_dtype,
            architecture=arch,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self, **extra: Any) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this config (plus ``extra`` keys).

        A Llama-architecture config gets ``attention_bias``; a Qwen2 config without qkv bias cannot be
        expressed (HF Qwen2 always has it), so it is written as ``LlamaForCausalLM``.
        """
        arch = self.architecture
        if arch == "Qwen2ForCausalLM" and not self.qkv_bias:
            arch = "LlamaForCausalLM"
        hf: dict[str, Any] = {
            "architectures": [arch],
            "model_type": "qwen2" if arch == "Qwen2ForCausalLM" else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.mlp_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_seq_len,
            "torch_dtype": self.param_dtype,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if arch == "Qwen2ForCausalLM":
            hf.update(
                use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layers
            )
        else:
            hf.update(attention_bias=self.qkv_bias, mlp_bias=False)
        hf.update(extra)
        return hf


def _tiny() -> ModelConfig:
    # The embedded word-level tokenizer's vocabulary (a few hundred ids; it grows with the
    # environments' word lists), rounded up to a multiple of 64.
    from actfocus_jax.text.tokenizer import build_embedded_tokenizer

    n = build_embedded_tokenizer().vocab_size
    return ModelConfig(
        vocab_size=-(-n // 64) * 64,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        mlp_dim=352,
        rope_theta=10000.0,
        qkv_bias=True,
        tie_embeddings=True,
        max_seq_len=2048,
    )


_QWEN25 = dict(
    vocab_size=151936,
    n_kv_heads=2,
    head_dim=128,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    qkv_bias=True,
    tie_embeddings=True,
    max_seq_len=32768,
    param_dtype="bfloat16",
    dtype="bfloat16",
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": _tiny(),
    "qwen2.5-0.5b": ModelConfig(
        d_model=896, n_layers=24, n_heads=14, mlp_dim=4864, **{**_QWEN25, "head_dim": 64}
    ),
    "qwen2.5-1.5b": ModelConfig(d_model=1536, n_layers=28, n_heads=12, mlp_dim=8960, **_QWEN25),
    "qwen2.5-3b": ModelConfig(d_model=2048, n_layers=36, n_heads=16, mlp_dim=11008, **_QWEN25),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name (``"tiny"``, ``"qwen2.5-0.5b"``, ``"qwen2.5-1.5b"``, ``"qwen2.5-3b"``)."""
    if name not in PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
