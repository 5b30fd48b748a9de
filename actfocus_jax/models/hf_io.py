"""Hugging Face checkpoint directories: :func:`load_pretrained` and :func:`save_pretrained`.

A directory holds ``config.json`` (``Qwen2ForCausalLM`` or ``LlamaForCausalLM``), the weights as
``model.safetensors`` or as shards listed in ``model.safetensors.index.json``, and ``tokenizer.json``
(+ ``tokenizer_config.json``). Tensor names and layouts are Hugging Face's (torch ``[out, in]``
linear weights, e.g. ``model.layers.0.self_attn.q_proj.weight``); they are converted to and from the
stacked layout of :class:`~actfocus_jax.models.transformer.DecoderLayers` exactly (transposes and
reshapes only), so ``save -> load`` reproduces every parameter bit for bit.

Every problem raises :class:`CheckpointError` with a message naming the problem and the fix.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from actfocus_jax.models.config import ModelConfig, ModelConfigError
from actfocus_jax.models.transformer import CausalLM
from actfocus_jax.text.tokenizer import TextTokenizer, TokenizerError, load_tokenizer

__all__ = [
    "CheckpointError",
    "hf_tensors_from_model",
    "load_hf_config",
    "load_pretrained",
    "load_safetensors",
    "model_from_hf_tensors",
    "save_pretrained",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters store that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded or a model that cannot be saved."""


# ------------------------------------------------------------------------------ name mapping
def _layer_names(config: ModelConfig, i: int) -> dict[str, str]:
    """Our stacked-parameter name -> HF tensor name, for layer ``i``."""
    pre = f"model.layers.{i}."
    names = {
        "attn_norm": pre + "input_layernorm.weight",
        "wq": pre + "self_attn.q_proj.weight",
        "wk": pre + "self_attn.k_proj.weight",
        "wv": pre + "self_attn.v_proj.weight",
        "wo": pre + "self_attn.o_proj.weight",
        "mlp_norm": pre + "post_attention_layernorm.weight",
        "w_gate": pre + "mlp.gate_proj.weight",
        "w_up": pre + "mlp.up_proj.weight",
        "w_down": pre + "mlp.down_proj.weight",
    }
    if config.qkv_bias:
        names.update(
            bq=pre + "self_attn.q_proj.bias",
            bk=pre + "self_attn.k_proj.bias",
            bv=pre + "self_attn.v_proj.bias",
        )
    return names


def _hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> expected shape, for every tensor the checkpoint must contain."""
    c = config
    d, h, k, hd, m, v = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size
    per_layer = {
        "attn_norm": (d,),
        "wq": (h * hd, d),
        "wk": (k * hd, d),
        "wv": (k * hd, d),
        "wo": (d, h * hd),
        "mlp_norm": (d,),
        "w_gate": (m, d),
        "w_up": (m, d),
        "w_down": (d, m),
        "bq": (h * hd,),
        "bk": (k * hd,),
        "bv": (k * hd,),
    }
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(c.n_layers):
        for ours, theirs in _layer_names(c, i).items():
            shapes[theirs] = per_layer[ours]
    return shapes


def _from_hf(name: str, x: np.ndarray, c: ModelConfig) -> np.ndarray:
    """One layer's HF tensor -> our per-layer layout (see transformer module docstring)."""
    d, h, k, hd = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    if name == "wq":
        return x.T.reshape(d, h, hd)
    if name in ("wk", "wv"):
        return x.T.reshape(d, k, hd)
    if name == "wo":
        return x.T.reshape(h, hd, d)
    if name == "bq":
        return x.reshape(h, hd)
    if name in ("bk", "bv"):
        return x.reshape(k, hd)
    if name in ("w_gate", "w_up", "w_down"):
        return x.T
    return x  # norms


def _to_hf(name: str, x: np.ndarray, c: ModelConfig) -> np.ndarray:
    """Inverse of :func:`_from_hf`."""
    d = c.d_model
    if name in ("wq", "wk", "wv"):
        return x.reshape(d, -1).T
    if name == "wo":
        return x.reshape(-1, d).T
    if name in ("bq", "bk", "bv"):
        return x.reshape(-1)
    if name in ("w_gate", "w_up", "w_down"):
        return x.T
    return x


# ------------------------------------------------------------------------------------- loading
def load_hf_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """Reads ``config.json`` of a checkpoint directory into a :class:`ModelConfig`."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise CheckpointError(
            f"no {CONFIG_FILE} in {path!r}; a Hugging Face checkpoint directory needs the model's "
            "config.json next to its weights"
        )
    try:
        with open(cfg_file) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    try:
        return ModelConfig.from_hf_config(hf, **overrides)
    except ModelConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file or sharded index), by HF name."""
    path = os.fspath(path)
    single = os.path.join(path, WEIGHTS_FILE)
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'; regenerate the sharded checkpoint")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise CheckpointError(
                    f"shard {os.path.basename(file)!r} listed in {INDEX_FILE} is missing from "
                    f"{path!r}; copy all shards of the checkpoint"
                )
    else:
        raise CheckpointError(
            f"no weights in {path!r}: expected {WEIGHTS_FILE} or {INDEX_FILE} plus its shards "
            "(only safetensors checkpoints are supported; convert .bin files with transformers' "
            "save_pretrained(safe_serialization=True))"
        )
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            part = safetensors.numpy.load_file(file)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {file}: {e}") from e
        tensors.update(part)
    return tensors


def _check_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], where: str) -> None:
    expected = _hf_shapes(config)
    present = {
        n for n in tensors if not n.endswith(_IGNORED_SUFFIXES) and n != "lm_head.weight"
    } | ({"lm_head.weight"} & set(tensors) if not config.tie_embeddings else set())
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensor(s) missing from the weights, e.g. {missing[:5]}; the "
            "weights do not match config.json (layers, qkv bias, tie_word_embeddings?)"
        )
    if unexpected:
        raise CheckpointError(
            f"{where}: {len(unexpected)} unexpected tensor(s) in the weights, e.g. "
            f"{unexpected[:5]}; the weights do not match config.json or the architecture"
        )
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {got} but config.json implies {shape}; "
                "fix config.json (hidden_size, heads, head_dim, intermediate_size, vocab_size) "
                "to match the weights"
            )


def _pure_params(config: ModelConfig, tensors: dict[str, np.ndarray], dtype: Any) -> dict[str, Any]:
    """HF tensors -> the pure-dict state of a :class:`CausalLM` (stacked layers)."""

    def conv(x: np.ndarray) -> jnp.ndarray:
        return jnp.asarray(np.asarray(x).astype(dtype))

    per_layer = [_layer_names(config, i) for i in range(config.n_layers)]
    layers = {
        ours: conv(np.stack([_from_hf(ours, tensors[names[ours]], config) for names in per_layer]))
        for ours in per_layer[0]
    }
    pure: dict[str, Any] = {
        "backbone": {
            "embed": conv(tensors["model.embed_tokens.weight"]),
            "final_norm": conv(tensors["model.norm.weight"]),
            "layers": layers,
        }
    }
    if not config.tie_embeddings:
        pure["lm_head"] = conv(tensors["lm_head.weight"].T)
    return pure


def model_from_hf_tensors(
    config: ModelConfig, tensors: dict[str, np.ndarray], *, where: str = "weights"
) -> CausalLM:
    """Builds a :class:`CausalLM` from HF-named tensors (no random init; names/shapes checked)."""
    _check_tensors(config, tensors, where)
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, _pure_params(config, tensors, jnp.dtype(config.param_dtype)))
    return nnx.merge(graphdef, state)


def load_pretrained(
    path: str | os.PathLike, *, dtype: str | None = None
) -> tuple[CausalLM, TextTokenizer]:
    """Loads a Hugging Face checkpoint directory.

    Args:
      path: directory with ``config.json``, ``model.safetensors`` (or ``model.safetensors.index.json``
        + shards), ``tokenizer.json`` and optionally ``tokenizer_config.json``.
      dtype: parameter and compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``). None means
        float32 (as Hugging Face ``from_pretrained``): exact, and bf16 checkpoints upcast losslessly.

    Returns:
      ``(model, tokenizer)``: a :class:`CausalLM` (``model(input_ids) -> float32 [B, L, V]``) and a
      :class:`~actfocus_jax.text.TextTokenizer`.

    Raises:
      CheckpointError: missing directory / files, unsupported architecture, tensors missing or
        unexpected, shapes that contradict config.json, a tokenizer larger than the vocabulary.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint directory {path!r} does not exist; pass a local directory holding "
            "config.json, model.safetensors and tokenizer.json (e.g. a huggingface_hub snapshot)"
        )
    dtype = dtype or "float32"
    config = load_hf_config(path, param_dtype=dtype, dtype=dtype)
    tensors = load_safetensors(path)
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as e:
        raise CheckpointError(f"tokenizer of {path!r}: {e}") from e
    _check_tokenizer_fits(config, tokenizer, path)
    return model_from_hf_tensors(config, tensors, where=path), tokenizer


def _check_tokenizer_fits(config: ModelConfig, tokenizer: TextTokenizer, where: str) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{config.vocab_size}; use the tokenizer that belongs to this model or a model whose "
            "vocab_size is at least the tokenizer's"
        )


# -------------------------------------------------------------------------------------- saving
def hf_tensors_from_model(model: CausalLM) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named NumPy tensors (torch ``[out, in]`` layout)."""
    c = model.config
    layers = model.backbone.layers.stacked()
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np.asarray(model.backbone.embed[...]),
        "model.norm.weight": np.asarray(model.backbone.final_norm[...]),
    }
    if not c.tie_embeddings:
        tensors["lm_head.weight"] = np.asarray(model.lm_head[...]).T
    for i in range(c.n_layers):
        for ours, theirs in _layer_names(c, i).items():
            tensors[theirs] = _to_hf(ours, np.asarray(layers[ours][i]), c)
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def save_pretrained(
    model: CausalLM,
    tokenizer: TextTokenizer,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes a Hugging Face checkpoint directory loadable by :func:`load_pretrained` and transformers.

    Files: ``config.json`` (HF Qwen2 format, ``architectures: ["Qwen2ForCausalLM"]``; a model without
    qkv bias is written as ``LlamaForCausalLM``), ``model.safetensors`` (or, when the tensors exceed
    ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``),
    ``tokenizer.json`` and ``tokenizer_config.json``. ``lm_head.weight`` is written only if untied.
    Tensors keep the parameter dtype.
    """
    if not isinstance(model, CausalLM):
        raise CheckpointError(f"save_pretrained expects a CausalLM, got {type(model).__name__}")
    path = os.fspath(path)
    config = model.config
    _check_tokenizer_fits(config, tokenizer, path)
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # weights of an earlier save would shadow or mix with ours
        if name in (WEIGHTS_FILE, INDEX_FILE) or (
            name.startswith("model-") and name.endswith(".safetensors")
        ):
            os.remove(os.path.join(path, name))
    hf = config.to_hf_config(
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id
    )
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf, f, indent=2)
    tensors = hf_tensors_from_model(model)
    total = sum(t.nbytes for t in tensors.values())
    meta = {"format": "pt"}
    if max_shard_bytes is None or total <= max_shard_bytes:
        safetensors.numpy.save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata=meta)
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name in sorted(tensors):
            if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensors[name]
            size += tensors[name].nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(shard, os.path.join(path, fname), metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    tokenizer.save(path)
