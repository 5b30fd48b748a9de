"""Fuzzing of the jit-able answer parser (word-level and BPE tokenizers) against a text reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

from actfocus_jax.envs import make
from actfocus_jax.envs.sokoban import SokobanEnv, parse_level
from actfocus_jax.text import TextTokenizer

L = 48  # fixed response length (one compilation per tokenizer)
LB = 160  # the same for the BPE tokenizer (words are several tokens)
K = 3
WORDS = ["<answer>", "</answer>", "||", "Up", "Down", "Left", "Right", "up", "right"]
NOISE = ["box", "<think>", "</think>", "hmm", "\n", "Upp", "the"]
ACTION_OF = {"up": 0, "down": 1, "left": 2, "right": 3}
SETTINGS = dict(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def reference(words):
    """Text-level reference: (actions, format_ok, num_invalid) of a response given as words."""
    opens = [i for i, w in enumerate(words) if w == "<answer>"]
    closes = [i for i, w in enumerate(words) if w == "</answer>"]
    if len(opens) != 1 or len(closes) != 1 or opens[0] > closes[0]:
        return None, False, None
    inside = [w for w in words[opens[0] + 1 : closes[0]] if w.strip()]
    segments, current = [], []
    for w in [*inside, "||"]:
        if w == "||":
            if current:
                segments.append(current)
            current = []
        else:
            current.append(w)
    actions, invalid = [], max(0, len(segments) - K)
    for seg in segments[:K]:
        if len(seg) == 1 and seg[0].lower() in ACTION_OF:
            actions.append(ACTION_OF[seg[0].lower()])
        else:
            invalid += 1
    return actions, len(segments) > 0, invalid


def check(parsed, words):
    actions, fmt, invalid = reference(words)
    assert bool(parsed.format_ok) == fmt, words
    if fmt:
        num = int(parsed.num)
        assert np.asarray(parsed.actions)[:num].tolist() == actions, words
        assert np.all(np.asarray(parsed.actions)[num:] == -1)
        assert int(parsed.num_invalid) == invalid, words
        assert bool(parsed.is_valid()) == (invalid == 0)
    else:
        assert not bool(parsed.is_valid())


word_lists = st.lists(st.sampled_from(WORDS + NOISE), max_size=20)


def answer_like():
    """Mostly well-formed answers with random content (to reach the valid branch often)."""
    inner = st.lists(st.sampled_from(WORDS[2:] + NOISE[:1] + ["||", "||"]), max_size=10)
    prefix = st.lists(st.sampled_from(["<think>", "hmm", "the", "</think>"]), max_size=4)
    return st.builds(lambda p, i: [*p, "<answer>", *i, "</answer>"], prefix, inner)


@pytest.fixture(scope="module")
def word_env():
    env = make("sokoban")
    return env, jax.jit(env.parse_actions)


def encode_padded(tok, ids, garbage=0, size=L):
    arr = np.full((size,), tok.pad_id, np.int32)
    ids = list(ids)[:size]
    arr[: len(ids)] = ids
    if garbage:  # tokens after `length` must be ignored
        arr[len(ids) :] = garbage
    return jnp.asarray(arr), jnp.asarray(len(ids), jnp.int32)


@settings(**SETTINGS)
@given(st.one_of(word_lists, answer_like()), st.booleans())
def test_word_level_matches_reference(word_env, words, garbage):
    env, parse = word_env
    tok = env.tokenizer
    ids = tok.encode(" ".join(words))
    assert len(ids) == len(words)
    g = tok.token_to_id("</answer>") if garbage else 0
    check(parse(*encode_padded(tok, ids, g)), words)


@settings(**SETTINGS)
@given(
    st.lists(st.integers(-5, 400), max_size=L),
    st.integers(-3, L + 5),
)
def test_arbitrary_ids_never_crash(word_env, ids, length):
    _, parse = word_env
    arr = np.zeros((L,), np.int32)
    arr[: len(ids)] = ids
    p = parse(jnp.asarray(arr), jnp.asarray(length, jnp.int32))
    assert p.actions.shape == (K,) and p.actions.dtype == jnp.int32
    assert 0 <= int(p.num) <= K and int(p.num_invalid) >= 0
    assert np.all((np.asarray(p.actions) >= -1) & (np.asarray(p.actions) < 4))
    if not bool(p.format_ok):
        assert not bool(p.is_valid())


def test_examples(word_env):
    env, _ = word_env
    cases = {
        "<think>ok</think><answer>Right || Right || Up</answer>": ([3, 3, 0], True, 0),
        "<answer>Up || Up || Up || Up</answer>": ([0, 0, 0], True, 1),
        "<answer></answer>": ([], False, 0),
        "<answer>Up": ([], False, 0),
        "Up</answer>": ([], False, 0),
        "<answer>Up</answer><answer>Down</answer>": (None, False, None),
        "<answer>Up box</answer>": ([], True, 1),
        "<answer>Up || || left</answer>": ([0, 2], True, 0),
    }
    for text, (acts, fmt, inv) in cases.items():
        p = env.parse_text(text)
        assert bool(p.format_ok) == fmt, text
        if acts is not None:
            assert np.asarray(p.actions)[: int(p.num)].tolist() == acts, text
        if inv is not None and fmt:
            assert int(p.num_invalid) == inv, text


def test_invalid_output_penalised_without_move(word_env):
    env, _ = word_env
    reset, step = jax.jit(env.reset), jax.jit(env.step)
    level = "# # # # # #\n# P _ _ _ #\n# _ X O _ #\n# _ _ _ _ #\n# _ _ _ _ #\n# # # # # #"
    s0, _ = reset(None, parse_level(level))
    for text in ["Right", "<answer>Right || box</answer>", "<answer></answer>", "<answer>Right"]:
        s, ts = step(s0, env.parse_text(text))
        assert float(ts.reward) == pytest.approx(env.format_penalty), text
        assert int(ts.invalid_action) >= 1 and int(ts.num_actions) == 0 and int(ts.turn) == 1
        np.testing.assert_array_equal(s.player, s0.player)
        np.testing.assert_array_equal(s.boxes, s0.boxes)
    s, ts = step(s0, env.parse_text("<answer>Right</answer>"))
    assert int(ts.invalid_action) == 0 and tuple(np.asarray(s.player)) == (1, 2)


# --------------------------------------------------------------------------------------------
# BPE tokenizer: tags are several tokens, words may be split, spaces merged into tokens
# --------------------------------------------------------------------------------------------


def build_bpe() -> TextTokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = np.random.default_rng(0)
    corpus = [
        "<think> i push the box </think> <answer> "
        + " || ".join(rng.choice(["Up", "Down", "Left", "Right"], size=3))
        + " </answer>"
        for _ in range(200)
    ] + ["State:\n# # # #\n# P X O\n# _ √ S"] * 20
    tok.train_from_iterator(corpus, trainer)
    return TextTokenizer(tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def bpe_env():
    env = SokobanEnv(tokenizer=build_bpe(), room_size=(5, 5))
    return env, jax.jit(env.parse_actions)


@settings(**{**SETTINGS, "max_examples": 80})
@given(st.one_of(word_lists, answer_like()), st.booleans())
def test_bpe_matches_reference(bpe_env, words, leading_space):
    env, parse = bpe_env
    tok = env.tokenizer
    ids = tok.encode((" " if leading_space else "") + " ".join(words))
    assume(len(ids) <= LB)
    check(parse(*encode_padded(tok, ids, size=LB)), words)


def test_bpe_tags_are_multi_token_and_obs_decodes(bpe_env):
    env, parse = bpe_env
    tok = env.tokenizer
    assert len(tok.tag_ids("answer_open")) > 1 and len(tok.tag_ids("answer_close")) > 1
    assert env.action_table.tokens.shape[1] >= 1
    text = "<think>hmm</think> <answer>Right||Up || left</answer>"
    p = parse(*encode_padded(tok, tok.encode(text), size=LB))
    assert np.asarray(p.actions).tolist() == [3, 0, 2] and bool(p.is_valid())
    s, ts = jax.jit(env.reset)(
        None, parse_level("# # # # #\n# P _ _ #\n# _ X O #\n# S √ _ #\n# # # # #")
    )
    ids = np.asarray(ts.obs_tokens[: int(ts.obs_len)])
    assert tok.decode(ids) == env.render_text(s)
