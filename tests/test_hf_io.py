"""Hugging Face checkpoints: golden parity with transformers, exact save/load round trips, errors."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from actfocus_jax.models import (
    CheckpointError,
    ModelConfig,
    apply,
    generate,
    init_model,
    load_pretrained,
    save_pretrained,
)
from actfocus_jax.models.hf_io import hf_tensors_from_model, load_safetensors
from actfocus_jax.text import build_embedded_tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FIXTURE_DIRS = sorted(p for p in FIXTURES.glob("hf_tiny_*") if (p / "config.json").is_file())
TIED = FIXTURES / "hf_tiny_qwen2_tied"

_apply = jax.jit(apply, static_argnums=0)


def _params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.flatten_with_path(state)[0]}


# ------------------------------------------------------------------------ golden parity (torch)
@pytest.mark.skipif(not FIXTURE_DIRS, reason="no HF fixtures under tests/fixtures")
@pytest.mark.parametrize("path", FIXTURE_DIRS, ids=lambda p: p.name)
def test_matches_transformers_reference(path):
    model, tok = load_pretrained(path)
    ref = np.load(path / "reference.npz")
    manifest = json.loads((path / "manifest.json").read_text())
    assert model.config.vocab_size == manifest["vocab_size"] >= tok.vocab_size
    assert model.config.tie_embeddings == manifest["tie_word_embeddings"]
    assert model.config.rope_theta == manifest["rope_theta"]
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    mask = ref["attention_mask"].astype(bool)
    logits = np.asarray(_apply(*nnx.split(model), ids, None, jnp.asarray(mask)))
    assert logits.dtype == np.float32
    err = np.abs(logits - ref["logits"])[mask].max()
    assert err <= 1e-4, err
    # Greedy continuation (no stop token, as the reference) and its logits.
    prompt = ref["prompt_ids"].astype(np.int32)
    n = ref["greedy_ids"].shape[1]
    out = generate(model, prompt, jax.random.key(0), max_new_tokens=n, greedy=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref["greedy_ids"])
    # Recorded log-probs (temperature 1) = log-softmax of the reference's greedy-step logits.
    ref_logp = jax.nn.log_softmax(jnp.asarray(ref["greedy_logits"]), axis=-1)
    ref_logp = np.take_along_axis(np.asarray(ref_logp), ref["greedy_ids"][..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logp), ref_logp, atol=1e-4)


# ------------------------------------------------------------------------------ round trips
@pytest.mark.skipif(not TIED.is_dir(), reason="no HF fixtures under tests/fixtures")
@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_fixture_save_load_round_trip_is_exact(tmp_path, shard):
    src = FIXTURE_DIRS[-1] if shard else TIED
    model, tok = load_pretrained(src)
    save_pretrained(model, tok, tmp_path, max_shard_bytes=150_000 if shard else None)
    assert (tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors")).exists()
    original, written = load_safetensors(src), load_safetensors(tmp_path)
    assert original.keys() == written.keys()
    for name, x in original.items():
        assert written[name].dtype == x.dtype
        np.testing.assert_array_equal(written[name], x, err_msg=name)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["Qwen2ForCausalLM"]
    again, tok2 = load_pretrained(tmp_path)
    assert again.config == model.config and tok2.vocab_size == tok.vocab_size
    assert tok2.encode("<|im_start|>user\nhi") == tok.encode("<|im_start|>user\nhi")
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("qkv_bias,tied", [(True, True), (False, False)])
def test_random_model_round_trip_is_exact(tmp_path, qkv_bias, tied):
    tok = build_embedded_tokenizer()
    cfg = ModelConfig(
        vocab_size=-(-tok.vocab_size // 64) * 64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        mlp_dim=48,
        qkv_bias=qkv_bias,
        tie_embeddings=tied,
    )
    model = init_model(cfg, seed=4)
    save_pretrained(model, tok, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["architectures"] == ["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"]
    names = set(safetensors.numpy.load_file(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in names) == (not tied)
    assert "model.layers.1.self_attn.q_proj.weight" in names
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == qkv_bias
    again, tok2 = load_pretrained(tmp_path)
    expected_arch = "Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"
    assert again.config == cfg.replace(architecture=expected_arch)
    a, b = _params(model), _params(again)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert tok2.encode("push the box") == tok.encode("push the box")
    assert tok2.pad_id == tok.pad_id and tok2.eos_id == tok.eos_id


def test_load_with_bfloat16_dtype():
    if not TIED.is_dir():
        pytest.skip("no HF fixtures")
    model, _ = load_pretrained(TIED, dtype="bfloat16")
    assert model.config.dtype == model.config.param_dtype == "bfloat16"
    assert model.backbone.embed[...].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------- errors
@pytest.fixture
def ckpt(tmp_path) -> pathlib.Path:
    """A writable copy of the tied fixture (or a freshly saved random model)."""
    dst = tmp_path / "ckpt"
    if TIED.is_dir():
        shutil.copytree(TIED, dst)
    else:
        tok = build_embedded_tokenizer()
        cfg = ModelConfig(
            vocab_size=-(-tok.vocab_size // 64) * 64,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=8,
            mlp_dim=48,
        )
        save_pretrained(init_model(cfg), tok, dst)
    return dst


def _edit_config(path: pathlib.Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: pathlib.Path, fn) -> None:
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    fn(tensors)
    safetensors.numpy.save_file(tensors, path / "model.safetensors")


def test_missing_directory_and_files(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (ckpt / "config.json").rename(ckpt / "config.bak")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_pretrained(ckpt)
    (ckpt / "config.bak").rename(ckpt / "config.json")
    (ckpt / "model.safetensors").rename(ckpt / "weights.bak")
    with pytest.raises(CheckpointError, match=r"no weights.*model\.safetensors"):
        load_pretrained(ckpt)
    (ckpt / "weights.bak").rename(ckpt / "model.safetensors")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        load_pretrained(ckpt)


def test_missing_shard(tmp_path):
    if len(FIXTURE_DIRS) == 0:
        pytest.skip("no HF fixtures")
    model, tok = load_pretrained(TIED if TIED.is_dir() else FIXTURE_DIRS[0])
    save_pretrained(model, tok, tmp_path, max_shard_bytes=100_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard '{shard.name}'.*missing"):
        load_pretrained(tmp_path)


def test_unsupported_architecture(ckpt):
    _edit_config(ckpt, architectures=["MistralForCausalLM"])
    with pytest.raises(CheckpointError, match=r"MistralForCausalLM.*Qwen2ForCausalLM.*Llama"):
        load_pretrained(ckpt)


def test_missing_and_unexpected_tensors(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(ckpt)
    _edit_tensors(
        ckpt,
        lambda t: t.update(
            {
                "model.layers.1.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"],
                "model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32),
            }
        ),
    )
    with pytest.raises(CheckpointError, match=r"unexpected.*self_attn\.extra\.weight"):
        load_pretrained(ckpt)


def test_shape_mismatch(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    _edit_config(ckpt, intermediate_size=cfg["intermediate_size"] + 8)
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        load_pretrained(ckpt)


def test_tokenizer_larger_than_vocab(ckpt, tmp_path):
    _edit_config(ckpt, vocab_size=64)
    with pytest.raises(CheckpointError, match=r"tokenizer has \d+ ids.*vocab_size is 64"):
        load_pretrained(ckpt)
    cfg = ModelConfig(
        vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, mlp_dim=16
    )
    with pytest.raises(CheckpointError, match="vocab_size is 64"):
        save_pretrained(init_model(cfg), build_embedded_tokenizer(), tmp_path / "out")


def test_hf_tensor_layout_is_torch_out_in():
    cfg = ModelConfig(
        vocab_size=64, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=24
    )
    model = init_model(cfg)
    t = hf_tensors_from_model(model)
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (32, 16)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (16, 16)
    assert t["model.layers.0.self_attn.o_proj.weight"].shape == (16, 32)
    assert t["model.layers.0.mlp.down_proj.weight"].shape == (16, 24)
    # q_proj row (head h, dim i) multiplies the input: equals our wq[:, h, i].
    wq = np.asarray(model.backbone.layers.wq[...])[0]
    np.testing.assert_array_equal(
        t["model.layers.0.self_attn.q_proj.weight"][8 * 1 + 3], wq[:, 1, 3]
    )
