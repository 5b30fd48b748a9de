"""Decoder model: config, NumPy reference parity, padding, KV cache with ragged appends, value model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from actfocus_jax.models import (
    LOGICAL_AXES,
    CausalLM,
    ModelConfig,
    ModelConfigError,
    apply,
    apply_values,
    forward_with_cache,
    get_config,
    init_cache,
    init_model,
    value_model_from_policy,
)
from actfocus_jax.models.hf_io import hf_tensors_from_model
from actfocus_jax.models.transformer import CAUSAL_BLOCK, attention, causal_attention
from actfocus_jax.text import build_embedded_tokenizer

CFG = ModelConfig(
    vocab_size=96,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    mlp_dim=96,
    rope_theta=10000.0,
    qkv_bias=True,
    tie_embeddings=False,
)


def randomize(model: nnx.Module, seed: int, scale: float = 0.08) -> None:
    """Replaces every parameter by random values (norm scales near 1) so no bug hides behind 0/1.

    NumPy on the host: compiling JAX random kernels takes seconds on a busy 2-core CPU.
    """
    rng = np.random.default_rng(seed)

    def fill(path, x):
        noise = rng.normal(size=x.shape)
        value = 1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else scale * noise
        return jnp.asarray(value, x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def model() -> CausalLM:
    m = init_model(CFG, 0)
    randomize(m, 1)
    return m


@pytest.fixture(scope="module")
def split(model):
    return nnx.split(model)


_apply = jax.jit(apply, static_argnums=0)
_fwd_cache = jax.jit(forward_with_cache, static_argnums=0)
_values = jax.jit(apply_values, static_argnums=0)
_hidden = jax.jit(lambda g, s, ids: nnx.merge(g, s)(ids), static_argnums=0)


# ------------------------------------------------------------------------------ NumPy reference
def np_reference(c: ModelConfig, t: dict[str, np.ndarray], ids, mask=None) -> np.ndarray:
    """Naive float64 Qwen2 forward from HF-layout tensors (explicit loops over heads)."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    b, length = ids.shape
    mask = np.ones((b, length), bool) if mask is None else mask.astype(bool)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)

    def rms(x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.rms_norm_eps)

    def rope(x):  # x [B, T, N, hd]
        inv = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
        f = pos[..., None] * inv
        cos, sin = np.cos(np.concatenate([f, f], -1)), np.sin(np.concatenate([f, f], -1))
        half = c.head_dim // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, :, None] + rot * sin[:, :, None]

    x = t["model.embed_tokens.weight"][ids]
    allowed = np.tril(np.ones((length, length), bool))[None] & mask[:, None, :]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"])
        proj = {}
        for name, n in (("q", c.n_heads), ("k", c.n_kv_heads), ("v", c.n_kv_heads)):
            y = h @ t[p + f"self_attn.{name}_proj.weight"].T
            if c.qkv_bias:
                y = y + t[p + f"self_attn.{name}_proj.bias"]
            proj[name] = y.reshape(b, length, n, c.head_dim)
        q, k, v = rope(proj["q"]), rope(proj["k"]), proj["v"]
        out = np.zeros((b, length, c.n_heads, c.head_dim))
        for head in range(c.n_heads):
            kv = head // (c.n_heads // c.n_kv_heads)
            s = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(c.head_dim)
            s = np.where(allowed, s, -1e9)  # finite: fully masked pad rows stay finite
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, :, head] = np.einsum("bts,bsd->btd", s / s.sum(-1, keepdims=True), v[:, :, kv])
        x = x + out.reshape(b, length, -1) @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"])
        g = h @ t[p + "mlp.gate_proj.weight"].T
        u = h @ t[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T
    x = rms(x, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if c.tie_embeddings else t["lm_head.weight"]
    return x @ head.T


def test_logits_match_numpy_reference(model):
    ids = np.asarray(jax.random.randint(jax.random.key(2), (2, 9), 0, CFG.vocab_size))
    logits = model(jnp.asarray(ids, jnp.int32))
    assert logits.shape == (2, 9, CFG.vocab_size) and logits.dtype == jnp.float32
    ref = np_reference(CFG, hf_tensors_from_model(model), ids)
    assert np.std(ref) > 0.3  # non-degenerate logits
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-5, rtol=1e-5)


def test_tied_embeddings_match_reference():
    cfg = CFG.replace(tie_embeddings=True, qkv_bias=False, n_kv_heads=1)
    m = init_model(cfg, 3)
    randomize(m, 4)
    assert not hasattr(m, "lm_head")
    ids = np.asarray(jax.random.randint(jax.random.key(5), (1, 7), 0, cfg.vocab_size))
    mask = np.array([[0, 0, 1, 1, 1, 1, 1]], bool)
    ref = np_reference(cfg, hf_tensors_from_model(m), ids, mask)
    got = _apply(*nnx.split(m), jnp.asarray(ids), None, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got)[mask], ref[mask], atol=2e-5, rtol=1e-5)


def _np_attention(q, k, v, mask):
    """Grouped-query softmax attention in float64 NumPy; rows without a visible key are 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, _, h, hd = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
    for i in range(b):
        for j in range(h):
            s = q[i, :, j] @ k[i, :, j // g].T / np.sqrt(hd)
            s = np.where(mask[i], s, -np.inf)
            with np.errstate(invalid="ignore"):
                p = np.exp(s - s.max(-1, keepdims=True))
                p = np.nan_to_num(p / p.sum(-1, keepdims=True))
            out[i, :, j] = p @ v[i, :, j // g]
    return out


def test_causal_block_attention_matches_reference():
    # T = 11 with blocks of 4 (3 blocks, the last one short), 1, and one block; padding inside and
    # at both ends; 4 query heads on 2 kv heads. Values and gradients (of the queries that see a key).
    b, t, h, kv, hd = 2, 11, 4, 2, 8
    keys = jax.random.split(jax.random.key(11), 4)
    q = jax.random.normal(keys[0], (b, t, h, hd))
    k = jax.random.normal(keys[1], (b, t, kv, hd))
    v = jax.random.normal(keys[2], (b, t, kv, hd))
    valid = np.ones((b, t), bool)
    valid[0, :2] = valid[0, 6] = valid[1, -3:] = False
    mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    seen = mask.any(-1)  # queries with at least one visible key
    ref = _np_attention(q, k, v, mask)
    np.testing.assert_allclose(
        np.asarray(attention(q, k, v, jnp.asarray(mask)))[seen], ref[seen], atol=1e-5
    )
    dout = jax.random.normal(keys[3], q.shape) * jnp.asarray(seen)[:, :, None, None]

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a, jnp.asarray(mask)) * dout), argnums=(0, 1, 2))(
            q, k, v
        )

    g_full = grads(attention)
    for block in (4, 1, t, 64):
        got = causal_attention(q, k, v, jnp.asarray(mask), block=block)
        np.testing.assert_allclose(np.asarray(got)[seen], ref[seen], atol=1e-5)
        assert np.isfinite(np.asarray(got)).all()
        g_block = grads(lambda q, k, v, m, block=block: causal_attention(q, k, v, m, block))
        for a, c in zip(g_block, g_full, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)


def test_long_sequence_logits_match_reference():
    # Longer than CAUSAL_BLOCK (and not a multiple of it), so the decoder's block path runs.
    assert CAUSAL_BLOCK < 150
    m = init_model(CFG, 7)
    randomize(m, 8)
    ids = np.asarray(jax.random.randint(jax.random.key(9), (2, 150), 0, CFG.vocab_size))
    mask = np.ones((2, 150), bool)
    mask[0, :5] = mask[1, 140:] = False
    ref = np_reference(CFG, hf_tensors_from_model(m), ids, mask)
    got = _apply(*nnx.split(m), jnp.asarray(ids), None, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got)[mask], ref[mask], atol=5e-5, rtol=1e-5)


def test_attn_block_is_a_runtime_option_with_the_same_logits_and_gradients():
    """attn_block (the causal attention's query-block size) changes only the graph definition:
    blocks of 16 and 48 (a remainder block at 150 tokens) and one block (the plain path) give the
    NumPy reference's logits and the default's gradients."""
    from actfocus_jax.models.transformer import set_runtime_options

    model = init_model(CFG, 7)
    randomize(model, 8)
    graphdef, state = nnx.split(model)
    ids = np.asarray(jax.random.randint(jax.random.key(9), (2, 150), 0, CFG.vocab_size))
    mask = np.ones((2, 150), bool)
    mask[0, :5] = mask[1, 140:] = False
    ref = np_reference(CFG, hf_tensors_from_model(model), ids, mask)

    def grad(g):
        def f(st):
            logits = nnx.merge(g, st)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * mask)

        return jax.jit(jax.grad(f))(state)

    g_default = grad(graphdef)
    n_proj = 8  # q, k, v, o, gate, up, down in the layer scan's body + the LM head
    for block in (16, 48, 150):
        m = set_runtime_options(init_model(CFG, 0), attn_block=block)
        assert m.config.attn_block == block and m.backbone.config.attn_block == block
        g = nnx.split(m)[0]
        assert g != graphdef
        # The block size reaches the attention: two score / value einsums per query block.
        jaxpr = str(jax.make_jaxpr(lambda st, g=g: nnx.merge(g, st)(jnp.asarray(ids)))(state))
        assert jaxpr.count("dot_general") == n_proj + 2 * -(-150 // block)
        got = _apply(g, state, jnp.asarray(ids), None, jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(got)[mask], ref[mask], atol=5e-5, rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grad(g), g_default
        )
    for bad in (0, 64.0):
        with pytest.raises(ModelConfigError, match="attn_block"):
            CFG.replace(attn_block=bad)


def test_padding_does_not_change_real_tokens(split):
    graphdef, state = split
    ids = jax.random.randint(jax.random.key(6), (1, 6), 1, CFG.vocab_size)
    ref = _apply(graphdef, state, ids)
    # Same tokens, left-padded by 3 and right-padded by 2.
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids, jnp.zeros((1, 2), jnp.int32)], 1)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]], bool)
    got = _apply(graphdef, state, padded, None, mask)
    np.testing.assert_allclose(np.asarray(got[:, 3:9]), np.asarray(ref), atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()


def test_bfloat16_compute_gives_float32_logits(model, split):
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    m = init_model(cfg, 0)
    nnx.update(m, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
    assert m.backbone.layers.wq[...].dtype == jnp.bfloat16
    ids = jax.random.randint(jax.random.key(7), (1, 5), 0, CFG.vocab_size)
    got = _apply(*nnx.split(m), ids)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(_apply(*split, ids)), atol=0.15)


# ------------------------------------------------------------------------------------ KV cache
def test_ragged_chunked_appends_equal_full_forward(split):
    """Three ragged chunks per row (different lengths per row, padding in every chunk)."""
    graphdef, state = split
    rng = np.random.default_rng(0)
    chunk_valid = np.array([[3, 0, 4], [1, 5, 2], [4, 4, 4]])  # [B, n_chunks]
    b, chunk_len = 3, 5
    seqs = [rng.integers(0, CFG.vocab_size, chunk_valid[r].sum()) for r in range(b)]
    cache = init_cache(CFG, b, 16)
    got = [[] for _ in range(b)]
    offsets = np.zeros(b, int)
    for j in range(chunk_valid.shape[1]):
        tokens = rng.integers(0, CFG.vocab_size, (b, chunk_len))  # padding = random ids
        for r in range(b):
            n = chunk_valid[r, j]
            tokens[r, :n] = seqs[r][offsets[r] : offsets[r] + n]
        logits, cache = _fwd_cache(
            graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(chunk_valid[:, j]), cache
        )
        for r in range(b):
            got[r].append(np.asarray(logits[r, : chunk_valid[r, j]]))
        offsets += chunk_valid[:, j]
    np.testing.assert_array_equal(np.asarray(cache.length), chunk_valid.sum(1))
    for r in range(b):
        ref = _apply(graphdef, state, jnp.asarray(seqs[r][None], jnp.int32))[0]
        np.testing.assert_allclose(np.concatenate(got[r]), np.asarray(ref), atol=1e-5)


def test_cache_writes_past_the_end_are_dropped(split):
    """Padding that runs past the last slot must not be clamped onto valid slots."""
    graphdef, state = split
    ids = jax.random.randint(jax.random.key(8), (1, 6), 0, CFG.vocab_size)
    cache = init_cache(CFG, 1, 6)
    _, cache = _fwd_cache(graphdef, state, ids[:, :4], jnp.array([4]), cache)
    snapshot = np.asarray(cache.k[:, :, :4])
    # Chunk of 5 with 2 real tokens: slots 4, 5 real, slots 6..8 do not exist.
    chunk = jnp.concatenate([ids[:, 4:], jnp.full((1, 3), 7, jnp.int32)], 1)
    logits, cache = _fwd_cache(graphdef, state, chunk, jnp.array([2]), cache)
    np.testing.assert_array_equal(np.asarray(cache.k[:, :, :4]), snapshot)
    assert int(cache.length[0]) == 6
    full = _apply(graphdef, state, ids)
    np.testing.assert_allclose(np.asarray(logits[:, :2]), np.asarray(full[:, 4:]), atol=1e-5)


# ---------------------------------------------------------------------------------- value model
def test_value_model_copies_backbone(model):
    critic = value_model_from_policy(model)
    ids = jax.random.randint(jax.random.key(9), (2, 5), 0, CFG.vocab_size)
    values = _values(*nnx.split(critic), ids)
    assert values.shape == (2, 5) and values.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(values), 0.0)  # zero-initialised head
    w = jnp.asarray(np.random.default_rng(10).normal(size=CFG.d_model), jnp.float32)
    critic.value_w[...] = w
    critic.value_b[...] = jnp.float32(0.5)
    hidden = _hidden(*nnx.split(model.backbone), ids)
    np.testing.assert_allclose(
        np.asarray(_values(*nnx.split(critic), ids)), np.asarray(hidden @ w) + 0.5, atol=1e-5
    )
    # Independent variables: changing the critic's backbone leaves the policy untouched.
    before = np.asarray(model.backbone.embed[...])
    critic.backbone.embed[...] = critic.backbone.embed[...] + 1.0
    np.testing.assert_array_equal(np.asarray(model.backbone.embed[...]), before)


# ------------------------------------------------------------------------------ sharding names
def test_parameters_carry_logical_axis_names(model):
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree.flatten_with_path(specs)[0]}
    shapes = {
        jax.tree_util.keystr(p): x.shape
        for p, x in jax.tree.flatten_with_path(nnx.state(model, nnx.Param))[0]
    }
    assert flat.keys() == shapes.keys()
    for path, spec in flat.items():
        assert len(spec) == len(shapes[path]), path
        assert all(a is None or a in LOGICAL_AXES for a in spec), (path, spec)
    wq = next(s for p, s in flat.items() if "wq" in p)
    assert tuple(wq) == ("layers", "embed", "heads", None)
    emb = next(s for p, s in flat.items() if "embed" in p and "layers" not in p)
    assert tuple(emb) == ("vocab", "embed")


# ---------------------------------------------------------------------------------------- config
def test_presets_and_validation():
    tiny = get_config("tiny")
    assert tiny.vocab_size >= build_embedded_tokenizer().vocab_size and tiny.vocab_size % 64 == 0
    # Parameter counts of the real Qwen2.5 checkpoints (tied embeddings).
    assert get_config("qwen2.5-0.5b").num_params() == 494_032_768
    assert get_config("qwen2.5-1.5b").num_params() == 1_543_714_304
    assert get_config("qwen2.5-3b").num_params() == 3_085_938_688
    with pytest.raises(ModelConfigError, match="multiple of n_kv_heads"):
        CFG.replace(n_heads=6, n_kv_heads=4)
    with pytest.raises(ModelConfigError, match="even"):
        CFG.replace(head_dim=15)
    with pytest.raises(ModelConfigError, match="dtype"):
        CFG.replace(dtype="float8")
    with pytest.raises(ModelConfigError, match="unknown model preset"):
        get_config("gpt2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.d_model = 1  # type: ignore[misc]


def test_hf_config_round_trip_and_errors():
    for name in ("tiny", "qwen2.5-0.5b"):
        cfg = get_config(name)
        assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    llama = CFG.replace(qkv_bias=False)
    hf = llama.to_hf_config()
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["attention_bias"] is False
    assert ModelConfig.from_hf_config(hf) == llama.replace(architecture="LlamaForCausalLM")
    v5 = CFG.to_hf_config()
    del v5["rope_theta"]
    v5["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    assert ModelConfig.from_hf_config(v5).rope_theta == 5e5
    with pytest.raises(ModelConfigError, match=r"MistralForCausalLM.*Qwen2ForCausalLM"):
        ModelConfig.from_hf_config({**hf, "architectures": ["MistralForCausalLM"]})
    with pytest.raises(ModelConfigError, match="rope"):
        ModelConfig.from_hf_config({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelConfigError, match="hidden_size"):
        ModelConfig.from_hf_config({k: v for k, v in hf.items() if k != "hidden_size"})


def test_unrolled_layer_scan_gives_the_same_outputs():
    """scan_unroll is a runtime option: fully unrolled (and partially, 3 of 4 layers: a remainder
    iteration) gives the rolled model's logits, cached logits and cache; set_scan_unroll changes
    only the graph definition."""
    from actfocus_jax.models.transformer import set_scan_unroll

    c = CFG.replace(n_layers=4)
    rolled = init_model(c, 0)
    randomize(rolled, 7)
    g_rolled, state = nnx.split(rolled)
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, c.vocab_size, (2, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [6]]))
    ref = np.asarray(_apply(g_rolled, state, ids, None, mask))
    cache0 = init_cache(c, 2, 12)
    ref_c, ref_cache = _fwd_cache(g_rolled, state, ids, jnp.array([9, 6]), cache0)
    for unroll in (4, 3, 99):
        m = set_scan_unroll(init_model(c, 0), unroll)
        assert m.config.scan_unroll == unroll and m.backbone.config.scan_unroll == unroll
        g = nnx.split(m)[0]
        assert g != g_rolled
        np.testing.assert_allclose(np.asarray(_apply(g, state, ids, None, mask)), ref, atol=2e-6)
        got_c, got_cache = _fwd_cache(g, state, ids, jnp.array([9, 6]), cache0)
        np.testing.assert_allclose(np.asarray(got_c), np.asarray(ref_c), atol=2e-6)
        np.testing.assert_allclose(np.asarray(got_cache.k), np.asarray(ref_cache.k), atol=2e-6)
    with pytest.raises(ModelConfigError, match="scan_unroll"):
        CFG.replace(scan_unroll=0)


def test_remat_gives_the_same_gradients_and_keeps_less_for_the_backward():
    """remat (jax.checkpoint on the layer scan body) is a runtime option: the same logits and
    gradients, and the compiled gradient keeps less temporary memory on a long sequence."""
    from actfocus_jax.models.transformer import set_runtime_options

    c = CFG.replace(n_layers=4)
    model = init_model(c, 0)
    randomize(model, 5)
    graphdef, state = nnx.split(model)
    remat = set_runtime_options(init_model(c, 0), remat=True)
    assert remat.config.remat and remat.backbone.config.remat and not model.config.remat
    g_remat = nnx.split(remat)[0]
    rng = np.random.default_rng(0)
    t = 512
    ids = jnp.asarray(rng.integers(0, c.vocab_size, (2, t)), jnp.int32)
    mask = jnp.asarray(np.arange(t)[None] < np.array([[t], [300]]))

    def loss(g):
        def f(st):
            logits = nnx.merge(g, st)(ids, attention_mask=mask)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)

        return jax.jit(jax.value_and_grad(f))

    (v0, g0), (v1, g1) = loss(graphdef)(state), loss(g_remat)(state)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g0)
    temp = {
        name: loss(g).lower(state).compile().memory_analysis().temp_size_in_bytes
        for name, g in (("keep", graphdef), ("remat", g_remat))
    }
    assert temp["remat"] < 0.6 * temp["keep"], temp
    with pytest.raises(ModelConfigError, match="remat"):
        CFG.replace(remat=1)
