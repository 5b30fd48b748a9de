"""Tests of the embedded tokenizer, tokenizer I/O and prompt formats."""

import json

import pytest

from actfocus_jax.text import TokenizerError, build_embedded_tokenizer, load_tokenizer
from actfocus_jax.text.chat import format_observation, format_prompt
from actfocus_jax.text.tokenizer import embedded_vocabulary


def test_embedded_vocab_is_deterministic_and_unique():
    v1, v2 = embedded_vocabulary(), embedded_vocabulary()
    assert v1 == v2
    assert len(set(v1)) == len(v1)
    assert v1[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]


def test_embedded_tokenizer_encodes_env_text_without_unknowns():
    tok = build_embedded_tokenizer()
    text = "<think> the box is at row 2 , I push it Right </think><answer>Right || Up</answer>\n# _ √ P S O X"
    ids = tok.encode(text)
    assert tok.tokenizer.token_to_id("<unk>") not in ids
    # Tags are single tokens and are split off adjacent words.
    assert tok.tag_ids("answer_open") == (tok.token_to_id("<answer>"),)
    assert ids.count(tok.token_to_id("||")) == 1
    words = tok.decode(ids).split()
    assert words[-7:] == ["#", "_", "√", "P", "S", "O", "X"]
    assert "Right" in words and "Up" in words


def test_unknown_word_maps_to_unk():
    tok = build_embedded_tokenizer()
    assert tok.encode("zebra") == [tok.token_to_id("<unk>")]


def test_save_load_round_trip(tmp_path):
    tok = build_embedded_tokenizer(extra_words=["zebra"])
    tok.save(tmp_path)
    tok2 = load_tokenizer(tmp_path)
    text = "<answer>Left || zebra</answer> row 3"
    assert tok2.encode(text) == tok.encode(text)
    assert (tok2.pad_id, tok2.eos_id, tok2.bos_id) == (tok.pad_id, tok.eos_id, tok.bos_id)
    assert tok2.vocab_size == tok.vocab_size
    assert tok2.tags == tok.tags


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid"):
        load_tokenizer(tmp_path)
    tok = build_embedded_tokenizer()
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "<nonexistent>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    # A pad token that is not in the vocabulary falls back to <pad>, which exists.
    assert load_tokenizer(tmp_path).pad_token == "<pad>"
    with pytest.raises(TokenizerError, match="tag"):
        tok.tag_ids("nope")


def test_chatml_format():
    msgs = [("system", "You are an agent."), ("user", "obs")]
    text = format_prompt(msgs, "chatml")
    assert text == (
        "<|im_start|>system\nYou are an agent.<|im_end|>\n"
        "<|im_start|>user\nobs<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_observation("o2", "chatml").startswith("<|im_end|>\n<|im_start|>user\no2")
    assert format_prompt(msgs, "plain") == "You are an agent.\nobs\n"
    with pytest.raises(ValueError, match="unknown chat format"):
        format_prompt(msgs, "llama3")
    with pytest.raises(ValueError, match="unknown message role"):
        format_prompt([("robot", "x")], "chatml")
