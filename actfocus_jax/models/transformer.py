"""Flax NNX decoder of the Qwen2 / Llama family, with a KV cache that has per-row write positions.

Architecture (matches Hugging Face ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` so their weights load
unchanged): token embedding -> ``n_layers`` x [RMSNorm -> grouped-query attention with RoPE
("rotate_half" convention) and optional q/k/v bias -> residual -> RMSNorm -> SwiGLU MLP -> residual]
-> RMSNorm -> LM head (tied to the embedding or separate). Logits are always float32.

Layout decisions:

* **Stacked layers + ``lax.scan``.** The parameters of all blocks are stacked on a leading
  ``"layers"`` axis (:class:`DecoderLayers`) and the forward pass scans over it, so the compile time
  does not grow with depth (24-36 layers for the Qwen2.5 presets compile like one).
* **Kernel layouts** (``D`` = d_model, ``H`` / ``K`` = query / kv heads, ``hd`` = head_dim,
  ``M`` = mlp_dim, ``V`` = vocab, ``L`` = n_layers): ``wq [L,D,H,hd]``, ``wk/wv [L,D,K,hd]``,
  ``wo [L,H,hd,D]``, ``w_gate/w_up [L,D,M]``, ``w_down [L,M,D]``, ``embed [V,D]``, ``lm_head [D,V]``.
  Every parameter carries logical axis names in its ``out_sharding`` metadata (see
  :data:`actfocus_jax.models.config.LOGICAL_AXES`); read them with ``nnx.get_partition_spec``.
* **Causal block attention.** The full-sequence pass (training, scoring) splits the queries into
  blocks of :attr:`ModelConfig.attn_block` (default :data:`CAUSAL_BLOCK`) and lets each block
  attend only to the keys up to its end (:func:`causal_attention`), in a head-major layout whose
  matmuls have one contracting axis each.
* **2-D matmuls.** Every projection is one ``[N, K] x [K, M]`` dot (:func:`dense`), so that the
  weight gradients are too; XLA's CPU backend adds layout copies for einsums whose gradients
  contract two axes. The measured effect of both: ``experiments/results/README.md`` ("Layout").
* **Pure functions at the core.** The modules are thin: :func:`apply` and :func:`forward_with_cache`
  take ``(graphdef, state)`` (from ``nnx.split``) and merge inside, so ``jit`` / ``shard_map`` /
  checkpointing only ever see plain pytrees.

KV cache (:class:`KVCache`): ``k``/``v`` ``[L, B, S, K, hd]`` and ``length int32[B]``. Slots
``[0, length[b])`` of row ``b`` are valid and slot ``j`` holds the token at RoPE position ``j``.
:func:`forward_with_cache` appends a ragged chunk per row (scatter with ``mode="drop"``, so writes past
``S`` are dropped instead of clamped onto valid slots).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actfocus_jax.models.config import ModelConfig

__all__ = [
    "Backbone",
    "CausalLM",
    "DecoderLayers",
    "KVCache",
    "ModelLike",
    "ValueModel",
    "apply",
    "apply_rope",
    "apply_values",
    "as_graph_state",
    "attention",
    "causal_attention",
    "default_positions",
    "dense",
    "forward_with_cache",
    "init_cache",
    "init_model",
    "resize_cache",
    "rms_norm",
    "rope_cos_sin",
    "set_runtime_options",
    "set_scan_unroll",
    "value_model_from_policy",
]

_NEG_INF = -1e30  # finite "minus infinity": fully-masked rows give a uniform softmax, never NaN


_INITIALIZERS: dict[str, Callable[..., jax.Array]] = {
    "normal": nnx.initializers.normal(stddev=0.02),  # HF initializer_range
    "zeros": nnx.initializers.zeros_init(),
    "ones": nnx.initializers.ones_init(),
}


def _param(
    init: str,
    key: jax.Array | None,
    shape: tuple[int, ...],
    dtype: Any,
    axes: tuple[str | None, ...],
) -> nnx.Param:
    """A parameter annotated with logical axis names (no eager sharding: no mesh is needed).

    ``init`` ("normal" / "zeros" / "ones") is kept in the metadata so :func:`init_model` can
    initialise on the host without compiling random-number kernels.
    """
    assert len(axes) == len(shape), (shape, axes)
    if init == "normal":
        value = _INITIALIZERS[init](key, shape, dtype)
    else:  # deterministic: no key needed (and no random-number kernel to compile)
        value = _INITIALIZERS[init](None, shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, init=init)


# ----------------------------------------------------------------------------------- primitives
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """RMSNorm as in HF: normalise in float32, cast to ``dtype``, multiply by ``scale``.

    ``x [..., D]``, ``scale [D]`` -> ``[..., D]`` of ``dtype``.
    """
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * xf.astype(dtype)


def dense(x: jax.Array, w: jax.Array, n_contract: int = 1, **dot_kwargs: Any) -> jax.Array:
    """Contracts the last ``n_contract`` axes of ``x`` with the first ``n_contract`` axes of ``w``
    as one 2-D matmul: ``[..., *K] x [*K, *M] -> [..., *M]``.

    The same products as the equivalent ``einsum`` (``btd,dm->btm``), written as a
    ``[N, K] x [K, M]`` dot: differentiated, its weight gradient is again a 2-D dot with a single
    contracting axis, where the einsum's (``btd,btm->dm``) contracts two, for which XLA's CPU
    backend inserts layout copies of the ``[B, T, M]`` operand (``python -m experiments.bench
    --suite layout`` measures the difference).
    """
    lead, k_shape = x.shape[: x.ndim - n_contract], x.shape[x.ndim - n_contract :]
    k = math.prod(k_shape)
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), **dot_kwargs)
    return y.reshape(*lead, *w.shape[n_contract:])


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos / sin tables ``[B, T, head_dim]`` (float32) for integer ``positions [B, T]``.

    HF convention: frequencies ``theta ** (-2i / head_dim)`` for ``i < head_dim / 2``, duplicated
    (``cat(freqs, freqs)``) so that :func:`apply_rope` can use ``rotate_half``.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding, HF "rotate_half" form. ``x [B, T, N, hd]``, ``cos/sin [B, T, hd]``."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query softmax attention.

    Args:
      q: ``[B, T, H, hd]`` queries.
      k, v: ``[B, S, K, hd]`` keys / values, ``H % K == 0``; query head ``h`` uses kv head
        ``h // (H // K)`` (HF ``repeat_kv`` order).
      mask: bool ``[B, T, S]``, True where query ``t`` may attend to key ``s``.

    Returns:
      ``[B, T, H, hd]`` in ``q``'s dtype. Scores and softmax are float32.
    """
    b, t, h, hd = q.shape
    n_kv = k.shape[2]
    qg = q.reshape(b, t, n_kv, h // n_kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


#: Default query-block size of :func:`causal_attention` (:attr:`ModelConfig.attn_block`).
CAUSAL_BLOCK = ModelConfig.attn_block


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int = CAUSAL_BLOCK
) -> jax.Array:
    """:func:`attention` over a full sequence whose ``mask`` is causal, skipping the masked upper part.

    The queries are split into blocks of ``block`` (a static Python loop); the block of queries
    ``[lo, hi)`` only computes scores against the keys ``[0, hi)``, since the causal mask hides every
    later key from all of its queries: for ``n`` blocks, ``(n + 1) / 2n`` of the score, softmax and
    probability work and memory of the full ``[B, K, G, T, T]`` tensor (0.5625 at ``T = 512``,
    ``block = 64``), in smaller tensors.

    Layout: the queries of a block are laid out head-major, ``[B, K, G * n, hd]`` (keys and values
    ``[B, K, S, hd]``, transposed once), so that every matmul of the forward and backward pass has
    one contracting axis and the batch axes ``(B, K)`` in front, which XLA's CPU backend runs
    without the layout copies of :func:`attention`'s ``btkgd,bskd->bkgts`` (whose gradients contract
    two axes). ``python -m experiments.bench --suite layout`` measures both.

    Shapes as in :func:`attention`, with ``S = T``; requires ``mask[b, t, s] = False`` for ``s > t``.
    Every query with at least one visible key gets the same result as :func:`attention` (up to
    float summation order); a fully masked query row (padding, whose output is meaningless anyway)
    averages the values of the keys ``[0, hi)`` of its block instead of all keys.
    """
    b, t, h, hd = q.shape
    if k.shape[1] != t:
        return attention(q, k, v, mask)
    n_kv = k.shape[2]
    g = h // n_kv
    qh = q.reshape(b, t, n_kv, g, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, hd]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, hd]
    outs = []
    for lo in range(0, t, block):
        hi = min(t, lo + block)
        n = hi - lo
        qb = qh[:, :, :, lo:hi].reshape(b, n_kv, g * n, hd)
        scores = jnp.einsum(
            "bkqd,bksd->bkqs", qb, kh[:, :, :hi], preferred_element_type=jnp.float32
        )
        scores = scores * (1.0 / math.sqrt(hd))
        m = jnp.broadcast_to(mask[:, None, None, lo:hi, :hi], (b, 1, g, n, hi)).reshape(
            b, 1, g * n, hi
        )
        probs = jax.nn.softmax(jnp.where(m, scores, _NEG_INF), axis=-1).astype(v.dtype)
        out = jnp.einsum("bkqs,bksd->bkqd", probs, vh[:, :, :hi])
        outs.append(out.reshape(b, n_kv, g, n, hd))
    out = jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


def default_positions(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    """RoPE positions ``int32 [B, L]``: ``cumsum(mask) - 1`` (clipped at 0), or ``arange`` without mask.

    With a mask, the valid tokens of every row get positions ``0, 1, 2, ...`` whatever the padding
    (left, right or in the middle), which is what the KV-cache path does after compaction.
    """
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
    return jnp.maximum(pos, 0)


# -------------------------------------------------------------------------------------- modules
class DecoderLayers(nnx.Module):
    """All decoder blocks, parameters stacked on a leading ``layers`` axis (see module docstring)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        pd = jnp.dtype(c.param_dtype)
        L, D, H, K, hd, M = c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim
        self.config = c
        self.attn_norm = _param("ones", None, (L, D), pd, ("layers", None))
        self.wq = _param(
            "normal", rngs.params(), (L, D, H, hd), pd, ("layers", "embed", "heads", None)
        )
        self.wk = _param(
            "normal", rngs.params(), (L, D, K, hd), pd, ("layers", "embed", "kv_heads", None)
        )
        self.wv = _param(
            "normal", rngs.params(), (L, D, K, hd), pd, ("layers", "embed", "kv_heads", None)
        )
        if c.qkv_bias:
            self.bq = _param("zeros", None, (L, H, hd), pd, ("layers", "heads", None))
            self.bk = _param("zeros", None, (L, K, hd), pd, ("layers", "kv_heads", None))
            self.bv = _param("zeros", None, (L, K, hd), pd, ("layers", "kv_heads", None))
        self.wo = _param(
            "normal", rngs.params(), (L, H, hd, D), pd, ("layers", "heads", None, "embed")
        )
        self.mlp_norm = _param("ones", None, (L, D), pd, ("layers", None))
        self.w_gate = _param("normal", rngs.params(), (L, D, M), pd, ("layers", "embed", "mlp"))
        self.w_up = _param("normal", rngs.params(), (L, D, M), pd, ("layers", "embed", "mlp"))
        self.w_down = _param("normal", rngs.params(), (L, M, D), pd, ("layers", "mlp", "embed"))

    def stacked(self) -> dict[str, jax.Array]:
        """The stacked parameter arrays by name (leading axis = layer)."""
        names = ["attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"]
        if self.config.qkv_bias:
            names += ["bq", "bk", "bv"]
        return {n: getattr(self, n)[...] for n in names}


def _qkv(
    c: ModelConfig, p: dict[str, jax.Array], x: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-norm + q/k/v projections + RoPE for one layer. ``x [B,T,D]`` -> q ``[B,T,H,hd]``, k/v."""
    dt = jnp.dtype(c.dtype)
    h = rms_norm(x, p["attn_norm"], c.rms_norm_eps, dt)
    q = dense(h, p["wq"].astype(dt))
    k = dense(h, p["wk"].astype(dt))
    v = dense(h, p["wv"].astype(dt))
    if c.qkv_bias:
        q = q + p["bq"].astype(dt)
        k = k + p["bk"].astype(dt)
        v = v + p["bv"].astype(dt)
    cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _finish_block(c: ModelConfig, p: dict[str, jax.Array], x: jax.Array, attn: jax.Array):
    """Output projection + residual + SwiGLU MLP + residual. ``attn [B,T,H,hd]``, ``x [B,T,D]``."""
    dt = jnp.dtype(c.dtype)
    x = x + dense(attn, p["wo"].astype(dt), 2)
    h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps, dt)
    gate = dense(h, p["w_gate"].astype(dt))
    up = dense(h, p["w_up"].astype(dt))
    return x + dense(jax.nn.silu(gate) * up, p["w_down"].astype(dt))


@flax.struct.dataclass
class KVCache:
    """Key/value cache with a per-row fill length.

    Attributes:
      k, v: ``[n_layers, B, S, n_kv_heads, head_dim]`` in the model's compute dtype.
      length: ``int32 [B]``; slots ``[0, length[b])`` of row ``b`` are valid, slot ``j`` holds the
        token at RoPE position ``j``. Slots at or beyond ``length`` may hold stale data; they are
        never visible to attention.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array

    @property
    def max_len(self) -> int:
        """Number of slots ``S`` per row."""
        return self.k.shape[2]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache (``length = 0``) with ``max_len`` slots per row, ``dtype`` = compute dtype."""
    dt = jnp.dtype(dtype or config.dtype)
    shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), length=jnp.zeros((batch,), jnp.int32)
    )


def resize_cache(cache: KVCache, max_len: int) -> KVCache:
    """``cache`` with ``max_len`` slots per row: slots ``[0, max_len)`` kept, new slots zero.

    Attention reads every slot of the cache (masked), so a cache sized to what the episodes have
    used so far, grown in blocks (:func:`actfocus_jax.rollout.engine.rollout_host`), costs
    attention work in proportion to that rather than to the worst-case budget. It only grows
    (shrinking could drop visible slots).
    """
    s = cache.max_len
    if max_len == s:
        return cache
    if max_len < s:
        raise ValueError(f"resize_cache only grows a cache ({s} slots), asked for {max_len}")
    pad = [(0, 0)] * cache.k.ndim
    pad[2] = (0, max_len - s)
    return cache.replace(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad))


class Backbone(nnx.Module):
    """Embedding + decoder blocks + final norm; returns hidden states ``[B, T, D]`` (compute dtype)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd = jnp.dtype(config.param_dtype)
        self.embed = _param(
            "normal", rngs.params(), (config.vocab_size, config.d_model), pd, ("vocab", "embed")
        )
        self.layers = DecoderLayers(config, rngs=rngs)
        self.final_norm = _param("ones", None, (config.d_model,), pd, (None,))

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(self.config.dtype))

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Full-sequence forward pass (no cache).

        Args:
          input_ids: ``int32 [B, T]``.
          positions: ``int32 [B, T]`` RoPE positions; default :func:`default_positions`.
          attention_mask: ``[B, T]`` (bool or 0/1), 1 = real token. Keys that are padding are never
            attended to; causality follows the sequence index. Outputs at padding positions are
            meaningless (finite).

        Returns:
          Hidden states ``[B, T, D]`` after the final norm, compute dtype.
        """
        c = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = default_positions(attention_mask, b, t)
        causal = jnp.tril(jnp.ones((t, t), bool))[None]
        if attention_mask is None:
            mask = jnp.broadcast_to(causal, (b, t, t))
        else:
            mask = causal & attention_mask.astype(bool)[:, None, :]
        x = self._embed(input_ids)

        def body(x, p):
            q, k, v = _qkv(c, p, x, positions)
            return _finish_block(c, p, x, causal_attention(q, k, v, mask, c.attn_block)), None

        if c.remat:  # the backward pass recomputes each block from its input
            body = jax.checkpoint(body, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, self.layers.stacked(), unroll=_unroll(c))
        return rms_norm(x, self.final_norm[...], c.rms_norm_eps, jnp.dtype(c.dtype))

    def forward_with_cache(
        self, tokens: jax.Array, num_valid: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Appends a ragged chunk to the cache; see :func:`forward_with_cache`. Returns hidden states."""
        c = self.config
        t = tokens.shape[1]
        length = cache.length
        positions = length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
        slots = jnp.arange(cache.max_len, dtype=jnp.int32)
        mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]: s < length + t + 1
        x = self._embed(tokens)

        def write(cache_kv, layer, new):
            # Per row (vmap over B, axis 1 of the cache): the scatter has an explicit batch
            # dimension, so a batch-sharded cache is updated locally under SPMD partitioning.
            return jax.vmap(
                lambda ckv, pos, n: ckv.at[layer, pos].set(n.astype(ckv.dtype), mode="drop"),
                in_axes=(1, 0, 0),
                out_axes=1,
            )(cache_kv, positions, new)

        def body(carry, xs):
            x, ck, cv = carry
            p, layer = xs
            q, k, v = _qkv(c, p, x, positions)
            ck = write(ck, layer, k)
            cv = write(cv, layer, v)
            k_all = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
            v_all = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
            attn = attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
            return (_finish_block(c, p, x, attn), ck, cv), None

        layer_ids = jnp.arange(c.n_layers, dtype=jnp.int32)
        (x, ck, cv), _ = jax.lax.scan(
            body, (x, cache.k, cache.v), (self.layers.stacked(), layer_ids), unroll=_unroll(c)
        )
        h = rms_norm(x, self.final_norm[...], c.rms_norm_eps, jnp.dtype(c.dtype))
        new_len = length + jnp.clip(num_valid.astype(jnp.int32), 0, t)
        return h, KVCache(k=ck, v=cv, length=new_len)


def _unroll(c: ModelConfig) -> int:
    """``lax.scan``'s ``unroll`` for the layer loop (capped at the depth)."""
    return min(c.scan_unroll, c.n_layers)


class CausalLM(nnx.Module):
    """Policy model: :class:`Backbone` + LM head. ``model(input_ids) -> float32 logits [B, T, V]``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.backbone = Backbone(config, rngs=rngs)
        if not config.tie_embeddings:
            self.lm_head = _param(
                "normal",
                rngs.params(),
                (config.d_model, config.vocab_size),
                jnp.dtype(config.param_dtype),
                ("embed", "vocab"),
            )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: ``hidden [..., D]`` -> float32 logits ``[..., V]``."""
        dt = jnp.dtype(self.config.dtype)
        if self.config.tie_embeddings:
            w = self.backbone.embed[...].astype(dt)
            w = w.T
        else:
            w = self.lm_head[...].astype(dt)
        return dense(hidden, w, preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``float32 [B, T, V]`` for ``int32 input_ids [B, T]`` (see :meth:`Backbone.__call__`)."""
        return self.logits(self.backbone(input_ids, positions, attention_mask))

    def forward_with_cache(
        self, tokens: jax.Array, num_valid: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Cached forward pass; see :func:`forward_with_cache`."""
        h, cache = self.backbone.forward_with_cache(tokens, num_valid, cache)
        return self.logits(h), cache


class ValueModel(nnx.Module):
    """PPO critic: a :class:`Backbone` plus a scalar head. ``model(input_ids) -> float32 [B, T]``.

    The head (``value_w [D]``, ``value_b []``) is zero-initialised, so a fresh critic predicts 0.
    """

    def __init__(
        self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, backbone: Backbone | None = None
    ) -> None:
        if backbone is None and rngs is None:
            raise ValueError("ValueModel needs rngs to initialise a new backbone, or a backbone")
        self.config = config
        self.backbone = backbone if backbone is not None else Backbone(config, rngs=rngs)
        pd = jnp.dtype(config.param_dtype)
        self.value_w = _param("zeros", None, (config.d_model,), pd, ("embed",))
        self.value_b = _param("zeros", None, (), pd, ())

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Values ``float32 [B, T]`` (value of the state after token ``t``)."""
        h = self.backbone(input_ids, positions, attention_mask)
        w = self.value_w[...].astype(h.dtype)
        v = jnp.einsum("btd,d->bt", h, w, preferred_element_type=jnp.float32)
        return v + self.value_b[...].astype(jnp.float32)


def value_model_from_policy(policy: CausalLM) -> ValueModel:
    """A critic whose backbone is a copy of ``policy``'s backbone (no shared variables) and whose
    value head is zero."""
    return ValueModel(policy.config, backbone=nnx.clone(policy.backbone))


def init_model(config: ModelConfig, seed: int = 0) -> CausalLM:
    """A randomly initialised :class:`CausalLM`, built on the host with NumPy.

    Same distributions as the module's own initialisers (normal(0.02) matrices and embeddings,
    zero biases, unit norm scales), but no XLA random-number kernels are compiled, which takes
    seconds on a small CPU. Deterministic in ``seed``.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(var: nnx.Variable) -> nnx.Variable:
        kind = var.get_metadata().get("init", "normal")
        shape, dtype = var.shape, var.dtype
        if kind == "ones":
            value = np.ones(shape, np.float32)
        elif kind == "zeros":
            value = np.zeros(shape, np.float32)
        else:
            value = rng.normal(0.0, 0.02, shape).astype(np.float32)
        return var.replace(jnp.asarray(value, dtype))

    state = jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------ functional entry points
ModelLike = CausalLM | tuple[nnx.GraphDef, nnx.State]


def set_runtime_options(model: nnx.Module, **options: Any) -> nnx.Module:
    """Sets runtime fields of :class:`ModelConfig` (``scan_unroll``, ``remat``, ``attn_block``) on
    every submodule of ``model`` in place: the parameters do not change, only the graph
    definition. Returns ``model``."""
    for _, m in model.iter_modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, ModelConfig) and any(getattr(cfg, k) != v for k, v in options.items()):
            m.config = cfg.replace(**options)
    return model


def set_scan_unroll(model: nnx.Module, unroll: int) -> nnx.Module:
    """Sets :attr:`ModelConfig.scan_unroll` on every submodule (see :func:`set_runtime_options`)."""
    return set_runtime_options(model, scan_unroll=unroll)


def as_graph_state(model: ModelLike) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of a module, or the pair itself."""
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    graphdef, state = model
    return graphdef, state


def apply(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids: jax.Array,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Pure forward pass of a :class:`CausalLM`: float32 logits ``[B, T, V]``.

    ``(graphdef, state) = nnx.split(model)``; safe to call inside ``jit`` with ``graphdef`` static.
    """
    return nnx.merge(graphdef, state)(input_ids, positions, attention_mask)


def apply_values(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids: jax.Array,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Pure forward pass of a :class:`ValueModel`: float32 values ``[B, T]``."""
    return nnx.merge(graphdef, state)(input_ids, positions, attention_mask)


def forward_with_cache(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    num_valid: jax.Array,
    cache: KVCache,
) -> tuple[jax.Array, KVCache]:
    """Appends a ragged chunk of tokens to every row of the cache and returns its logits.

    Args:
      graphdef, state: ``nnx.split`` of a :class:`CausalLM`.
      tokens: ``int32 [B, T]``; row ``b``'s real tokens are ``tokens[b, :num_valid[b]]``, the rest
        is padding (any id).
      num_valid: ``int32 [B]`` in ``[0, T]``.
      cache: the :class:`KVCache`; row ``b`` holds ``cache.length[b]`` valid slots.

    Returns:
      ``(logits, new_cache)``: ``logits float32 [B, T, V]`` where ``logits[b, t]`` (for
      ``t < num_valid[b]``) predicts the token after ``tokens[b, t]``; entries for padding are
      meaningless. Token ``t`` of row ``b`` is written at slot ``length[b] + t`` with RoPE position
      ``length[b] + t`` and attends to slots ``< length[b] + t + 1``.
      ``new_cache.length = length + num_valid``. Padding tokens may be written at slots beyond the
      new length (they are overwritten by the next append before ever becoming visible); writes at
      slots ``>= S`` are dropped, so the caller must keep ``length + num_valid <= S``.
    """
    return nnx.merge(graphdef, state).forward_with_cache(tokens, num_valid, cache)
