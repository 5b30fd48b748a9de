"""Generates the tiny Hugging Face golden fixtures under ``tests/fixtures/``.

NOT run by CI: it needs PyTorch + transformers (+ tokenizers, safetensors), which the CI
environment does not have. Run it by hand in a separate environment and commit its output:

    python3 -m venv /tmp/venv_torch
    /tmp/venv_torch/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    /tmp/venv_torch/bin/python tests/make_hf_fixtures.py

Everything is seeded, so a rerun with the same library versions rewrites the same files.

Per model directory ``tests/fixtures/<name>/`` it writes:

* ``config.json``, ``generation_config.json`` and the weights (``model.safetensors``, or
  ``model-0000k-of-0000n.safetensors`` shards + ``model.safetensors.index.json``), all from
  ``save_pretrained`` (``config.json`` is then touched up, see ``_touch_up_config``);
* ``tokenizer.json`` + ``tokenizer_config.json``: a tiny byte-level BPE tokenizer whose
  ``<think>``/``</think>``/``<answer>``/``</answer>`` tags are *not* added tokens, so each tag
  spans several BPE tokens;
* ``reference.npz``: inputs and the float32 outputs of the torch model (``ref`` in
  ``build_variant``; compressed, plain arrays);
* ``manifest.json``: what was generated, with which versions, and a few tokenizer cases.

``tests/fixtures/README.md`` documents the format for the (torch-free) tests that read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
# BPE vocabulary before the special tokens: 256 byte symbols + merges.
BPE_VOCAB = 300
# The pre-tokenizer split used by Qwen2-family tokenizers (letters, single digits, punctuation
# runs, newlines, whitespace), followed by the GPT-2 byte-to-unicode mapping.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BATCH, SEQ_LEN, NEW_TOKENS = 3, 24, 12
ROW_LENGTHS = (24, 17, 9)  # real tokens per row of input_ids; the rest is right padding
MIN_MARGIN = 1e-3  # greedy steps must win by at least this logit gap (robust to float noise)
MIN_DISTINCT = 6  # distinct tokens among the NEW_TOKENS greedy ones
SHARD_SIZE = "220KB"
EMBED_STD, WEIGHT_STD = 0.1, 0.15  # random init; RMSNorm gains 1 + 0.3 N(0, 1), biases 0.1 N(0, 1)

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=176,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    hidden_act="silu",
)
# name -> (architecture, config overrides, seed, shard?, legacy config.json style?)
VARIANTS = {
    "hf_tiny_qwen2_tied": (
        "qwen2",
        dict(tie_word_embeddings=True, rope_theta=1e4),
        11,
        False,
        False,
    ),
    "hf_tiny_qwen2_untied": (
        "qwen2",
        dict(tie_word_embeddings=False, rope_theta=1e6),
        12,
        False,
        True,
    ),
    "hf_tiny_qwen2_sharded": (
        "qwen2",
        dict(tie_word_embeddings=False, rope_theta=5e5),
        13,
        True,
        False,
    ),
}
PROMPTS = [
    [
        ("system", "You are a Sokoban agent."),
        ("user", "# # # #\n# P O #\n# _ X #\n# # # #\nYour move?"),
    ],
    [("user", "FrozenLake:\nP _ _ O\n_ O _ G\nWhere next?")],
    [("user", "Push the box onto the target.")],
    [("user", "<think> go </think><answer>Up</answer>")],
]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _corpus() -> list[str]:
    """A small, seeded corpus of Sokoban/FrozenLake agent text."""
    rng = random.Random(1234)
    actions = ["Up", "Down", "Left", "Right"]
    sok_syms = ["#", "_", "O", "√", "X", "P", "S"]
    fl_syms = ["P", "_", "O", "G", "X", "√"]
    thoughts = [
        "the box is at row {r} , I push it {a}",
        "the player is left of the box , so I move {a}",
        "the target is above , I should go {a} then {b}",
        "avoid the hole at row {r} column {c} , go {a}",
        "the goal is {n} steps away , move {a} || {b}",
        "I am stuck , try {a}",
    ]
    lines: list[str] = []
    for _ in range(400):
        a, b = rng.choice(actions), rng.choice(actions)
        t = rng.choice(thoughts).format(
            r=rng.randint(0, 9), c=rng.randint(0, 9), n=rng.randint(1, 9), a=a, b=b
        )
        acts = " || ".join(rng.choice(actions) for _ in range(rng.randint(1, 3)))
        lines.append(f"<think> {t} </think><answer>{acts}</answer>")
        syms = sok_syms if rng.random() < 0.5 else fl_syms
        n = rng.randint(3, 6)
        grid = "\n".join(" ".join(rng.choice(syms) for _ in range(n)) for _ in range(n))
        lines.append(grid)
        lines.append(f"Turn {rng.randint(1, 20)}: reward {rng.choice(['0.0', '1.0', '-0.1'])}")
    lines += [
        "You are a Sokoban agent. Push every box onto a target.",
        "You are a FrozenLake agent. Reach the goal without falling into a hole.",
        "Answer in the format <think> ... </think><answer>Action || Action</answer>",
        "Your move? Where next?",
    ]
    return lines


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Added *after* training so they get the last ids, as in Qwen tokenizers.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=False) for t in SPECIAL_TOKENS]
    )
    for tag in TAGS:
        assert tok.token_to_id(tag) is None
        assert len(tok.encode(tag).ids) > 1, tag
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    tok.save(str(path / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": COMMON["max_position_embeddings"],
        "split_special_tokens": False,
    }
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


TOKENIZER_CASES = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<think> the box is at row 2 , I push it Right </think><answer>Right || Up</answer>",
    "# _ √ P S O X\n# # #",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


def tokenizer_cases(path: Path) -> list[dict]:
    """text -> ids as transformers encodes them (no special tokens added around the text)."""
    auto = AutoTokenizer.from_pretrained(str(path))
    return [{"text": t, "ids": auto.encode(t, add_special_tokens=False)} for t in TOKENIZER_CASES]


def check_tokenizer(path: Path, tok: Tokenizer) -> None:
    """The saved files load in transformers and agree with the ``tokenizers`` object."""
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(path))
    text = "<think> push </think><answer>Right || Up</answer>\n# _ √ P"
    assert fast.encode(text) == auto.encode(text) == tok.encode(text).ids
    assert auto.eos_token == IM_END and auto.pad_token == ENDOFTEXT and auto.bos_token is None
    assert auto.decode(auto.encode(text)) == text
    rendered = auto.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", rendered


def render_chat(messages: list[tuple[str, str]]) -> str:
    text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in messages)
    return text + f"{IM_START}assistant\n"


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def make_model(arch: str, overrides: dict, vocab_size: int, tok: Tokenizer, seed: int):
    kwargs = dict(
        COMMON,
        **overrides,
        vocab_size=vocab_size,
        bos_token_id=None,
        eos_token_id=tok.token_to_id(IM_END),
        pad_token_id=tok.token_to_id(ENDOFTEXT),
        attn_implementation="eager",
        dtype=torch.float32,
    )
    assert arch == "qwen2", arch
    model = Qwen2ForCausalLM(Qwen2Config(**kwargs)).float().eval()
    assert model.config._attn_implementation == "eager"
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:  # RMSNorm gains: far from 1 so a loader that drops them fails
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(EMBED_STD * noise)
                # Rows past the tokenizer's vocabulary (padding up to a multiple of 64) stay
                # small, as in trained checkpoints, so greedy decoding does not pick them.
                p[n_tok:] *= 0.1
            else:
                p.copy_(WEIGHT_STD * noise)
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def forward_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


def greedy(model, prompt: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``generate`` with eos disabled (``eos_token_id=None``): exactly NEW_TOKENS argmax steps."""
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=pad_id,
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            generation_config=config,
        )
    new = out[:, prompt.shape[1] :]
    assert new.shape == (1, NEW_TOKENS), new.shape
    return new


def _touch_up_config(path: Path, legacy: bool) -> None:
    """Records ``torch_dtype``; ``legacy`` rewrites config.json in the transformers-4.x layout.

    transformers 5 writes ``dtype`` and a ``rope_parameters`` dict. Checkpoints on the Hub
    (e.g. Qwen2.5) were written by 4.x: top-level ``rope_theta`` and ``torch_dtype``, no
    ``head_dim`` (it is hidden_size / num_attention_heads), no ``layer_types``, and a
    ``sliding_window`` value that is inert because ``use_sliding_window`` is false.
    """
    cfg = json.loads((path / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    if legacy:
        rope = cfg.pop("rope_parameters")
        assert rope.get("rope_type", "default") == "default", rope
        cfg["rope_theta"] = rope["rope_theta"]
        cfg.pop("dtype", None)
        cfg.pop("layer_types", None)
        assert cfg.pop("head_dim") * cfg["num_attention_heads"] == cfg["hidden_size"]
        cfg["sliding_window"] = 32768
        cfg["max_window_layers"] = 21
    assert cfg["architectures"] and cfg["torch_dtype"] == "float32"
    with open(path / "config.json", "w") as f:
        json.dump(dict(sorted(cfg.items())), f, indent=2)
        f.write("\n")


def _margins(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def build_variant(name: str, spec, tok: Tokenizer, vocab_size: int) -> dict:
    arch, overrides, seed, sharded, legacy = spec
    path = FIXTURES / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    _seed_all(seed)
    model = make_model(arch, overrides, vocab_size, tok, seed)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    pad_id = tok.token_to_id(ENDOFTEXT)
    special_ids = {tok.token_to_id(t) for t in SPECIAL_TOKENS}

    # Batch: random ordinary token ids (no special tokens), right-padded with pad_id.
    rng = np.random.default_rng(seed)
    ordinary = np.array([i for i in range(n_tok) if i not in special_ids])
    ids = np.full((BATCH, SEQ_LEN), pad_id, dtype=np.int32)
    mask = np.zeros((BATCH, SEQ_LEN), dtype=np.int32)
    for b, n in enumerate(ROW_LENGTHS):
        ids[b, :n] = rng.choice(ordinary, size=n)
        mask[b, :n] = 1
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    logits = forward_logits(model, ids_t, mask_t)
    # Each row's real-token logits equal those of the row run alone without padding.
    for b, n in enumerate(ROW_LENGTHS):
        alone = forward_logits(model, ids_t[b : b + 1, :n], mask_t[b : b + 1, :n])
        torch.testing.assert_close(alone[0], logits[b, :n], rtol=1e-5, atol=1e-5)

    # Greedy continuation: the first prompt whose 12 greedy tokens are ordinary tokens (no
    # eos/pad/special, no id past the tokenizer's vocabulary), not stuck repeating one token,
    # with a clear argmax at each step.
    for prompt_index in range(len(PROMPTS)):
        prompt_text = render_chat(PROMPTS[prompt_index])
        prompt = torch.tensor([tok.encode(prompt_text).ids], dtype=torch.long)
        new = greedy(model, prompt, pad_id)
        full = torch.cat([prompt, new], dim=1)
        full_logits = forward_logits(model, full, torch.ones_like(full))
        step_logits = full_logits[:, prompt.shape[1] - 1 : -1]
        assert torch.equal(step_logits.argmax(-1), new), "generate != argmax of a full forward"
        ok_ids = all(int(t) < n_tok and int(t) not in special_ids for t in new[0])
        varied = len(set(new[0].tolist())) >= MIN_DISTINCT
        if ok_ids and varied and float(_margins(step_logits).min()) >= MIN_MARGIN:
            break
    else:
        raise RuntimeError(f"{name}: no prompt gives a clean greedy continuation")

    ref = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions(mask_t).numpy().astype(np.int32),
        "logits": logits.numpy().astype(np.float32),
        "prompt_ids": prompt.numpy().astype(np.int32),
        "greedy_ids": new.numpy().astype(np.int32),
        "greedy_logits": step_logits.numpy().astype(np.float32),
    }

    if sharded:
        model.save_pretrained(path, safe_serialization=True, max_shard_size=SHARD_SIZE)
    else:
        model.save_pretrained(path, safe_serialization=True)
    _touch_up_config(path, legacy)
    save_tokenizer(tok, path)
    check_tokenizer(path, tok)
    np.savez_compressed(path / "reference.npz", **ref)

    # Sanity: reload from disk and reproduce the recorded outputs.
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert type(reloaded) is type(model)
    assert reloaded.config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)
    data = np.load(path / "reference.npz")
    again = forward_logits(
        reloaded,
        torch.from_numpy(data["input_ids"]).long(),
        torch.from_numpy(data["attention_mask"]).long(),
    )
    np.testing.assert_allclose(again.numpy(), data["logits"], rtol=1e-5, atol=1e-5)
    again_new = greedy(reloaded, torch.from_numpy(data["prompt_ids"]).long(), pad_id)
    assert np.array_equal(again_new.numpy(), data["greedy_ids"])

    files = sorted(p.name for p in path.iterdir())
    weight_files = [f for f in files if f.endswith(".safetensors")]
    if sharded:
        assert "model.safetensors.index.json" in files and 2 <= len(weight_files) <= 3, files
    else:
        assert weight_files == ["model.safetensors"], files
    stored = set()
    for w in weight_files:
        with safetensors.safe_open(str(path / w), "np") as f:
            stored |= set(f.keys())
    assert ("lm_head.weight" in stored) != bool(overrides.get("tie_word_embeddings")), stored

    real = mask.astype(bool)
    manifest = {
        "architecture": type(model).__name__,
        "config_style": "transformers-4.x (legacy)" if legacy else "transformers-5",
        "seed": seed,
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": n_tok,
        "tie_word_embeddings": bool(overrides.get("tie_word_embeddings")),
        "rope_theta": overrides["rope_theta"],
        "weight_files": weight_files,
        "stored_tensors": sorted(stored),
        "reference": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in ref.items()},
        "row_lengths": list(ROW_LENGTHS),
        "pad_id": pad_id,
        "eos_id": tok.token_to_id(IM_END),
        "prompt_text": prompt_text,
        "prompt_index": prompt_index,
        "greedy_text": tok.decode(new[0].tolist(), skip_special_tokens=False),
        "greedy_generation": (
            "model.generate(prompt_ids, attention_mask=ones, do_sample=False, num_beams=1, "
            f"max_new_tokens={NEW_TOKENS}, min_new_tokens={NEW_TOKENS}, eos_token_id=None, "
            "pad_token_id=pad_id): no eos, so min_new_tokens never masks a logit; "
            "greedy_ids == argmax(greedy_logits, -1)"
        ),
        "tokenizer_cases": tokenizer_cases(path),
        "min_greedy_margin": float(_margins(step_logits).min()),
        "min_logits_margin_real_tokens": float(_margins(logits)[torch.from_numpy(real)].min()),
        "logits_std_real_tokens": float(logits[torch.from_numpy(real)].std()),
        "sha256": {
            f: hashlib.sha256((path / f).read_bytes()).hexdigest()
            for f in files
            if f.endswith((".safetensors", ".npz", ".json"))
        },
        **versions(),
    }
    with open(path / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return manifest


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    FIXTURES.mkdir(exist_ok=True)
    tok = build_tokenizer()
    assert tok.get_vocab_size(with_added_tokens=False) == BPE_VOCAB
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = -(-n_tok // 64) * 64
    for name, spec in VARIANTS.items():
        m = build_variant(name, spec, tok, vocab_size)
        print(
            f"{name}: {m['architecture']} V={vocab_size} files={m['weight_files']} "
            f"logits std={m['logits_std_real_tokens']:.3f} "
            f"min greedy margin={m['min_greedy_margin']:.4f} greedy={m['greedy_text']!r}"
        )
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"tests/fixtures: {total / 1024:.1f} KiB; versions {versions()}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
