"""Role masks from token ids: embedded word-level tokenizer and a BPE tokenizer with multi-token tags."""

import os

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actfocus_jax.rollout import Role
from actfocus_jax.rollout.masks import compute_roles, match_ends, match_starts
from actfocus_jax.text import build_embedded_tokenizer, load_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf_tiny_qwen2_tied")


def reference_roles(tokens, generated, valid, open_ids, close_ids):
    """Plain-Python reference: walk each row, track whether we are inside an answer span."""
    out = []
    for row_t, row_g, row_v in zip(tokens, generated, valid):
        roles, inside, i, n = [], False, 0, len(row_t)
        while i < n:
            if not row_v[i]:
                roles.append(Role.PAD)
                inside = False
                i += 1
                continue
            if not row_g[i]:
                roles.append(Role.PROMPT)
                inside = False
                i += 1
                continue
            k = len(open_ids)
            if (
                list(row_t[i : i + k]) == list(open_ids)
                and all(row_g[i : i + k])
                and all(row_v[i : i + k])
            ):
                inside = True
            if inside:
                roles.append(Role.ACTION)
                m = len(close_ids)
                if i - m + 1 >= 0 and list(row_t[i - m + 1 : i + 1]) == list(close_ids):
                    inside = False
            else:
                roles.append(Role.REASONING)
            i += 1
        out.append(roles)
    return np.asarray(out, np.int8)


def _layout(tok, segments):
    """Concatenates (text, generated) segments into token ids and a generated mask."""
    ids, gen = [], []
    for text, is_gen in segments:
        piece = tok.encode(text)
        ids += piece
        gen += [is_gen] * len(piece)
    return ids, gen


def _roles_for(tok, segments, pad_to=None):
    ids, gen = _layout(tok, segments)
    n = pad_to or len(ids)
    tokens = np.full((1, n), tok.pad_id, np.int32)
    tokens[0, : len(ids)] = ids
    generated = np.zeros((1, n), bool)
    generated[0, : len(ids)] = gen
    valid = np.zeros((1, n), bool)
    valid[0, : len(ids)] = True
    roles = compute_roles(
        tokens, generated, valid, tok.tag_ids("answer_open"), tok.tag_ids("answer_close")
    )
    ref = reference_roles(
        tokens, generated, valid, tok.tag_ids("answer_open"), tok.tag_ids("answer_close")
    )
    np.testing.assert_array_equal(np.asarray(roles), ref)
    return tokens[0], np.asarray(roles)[0]


def _check_layout(tok, pad_to):
    obs1 = "# _ P X O #"
    resp1 = "<think> the box is right </think>"
    ans1 = "<answer>Right || Up</answer>"
    obs2 = "# _ _ P √ #"
    resp2 = "<think> done </think>"
    ans2 = "<answer>Left</answer>"
    segments = [
        (obs1, False),
        (resp1, True),
        (ans1, True),
        (obs2, False),
        (resp2, True),
        (ans2, True),
    ]
    tokens, roles = _roles_for(tok, segments, pad_to=pad_to)
    lens = [len(tok.encode(t)) for t, _ in segments]
    expected = (
        [Role.PROMPT] * lens[0]
        + [Role.REASONING] * lens[1]
        + [Role.ACTION] * lens[2]
        + [Role.PROMPT] * lens[3]
        + [Role.REASONING] * lens[4]
        + [Role.ACTION] * lens[5]
    )
    expected += [Role.PAD] * (len(tokens) - len(expected))
    np.testing.assert_array_equal(roles, np.asarray(expected, np.int8))


def test_roles_embedded_tokenizer():
    _check_layout(build_embedded_tokenizer(), pad_to=64)


@pytest.mark.skipif(not os.path.isdir(FIXTURE), reason="BPE fixture missing")
def test_roles_bpe_tokenizer_with_multi_token_tags():
    tok = load_tokenizer(FIXTURE)
    assert len(tok.tag_ids("answer_open")) > 1 and len(tok.tag_ids("answer_close")) > 1
    _check_layout(tok, pad_to=None)


def test_observation_tokens_never_generated_even_if_they_look_like_tags():
    tok = build_embedded_tokenizer()
    # The observation contains an answer tag: it must stay PROMPT, and it must not open a span.
    segments = [("<answer>Up", False), ("Right </answer>", True)]
    _, roles = _roles_for(tok, segments)
    assert list(roles) == [Role.PROMPT, Role.PROMPT, Role.REASONING, Role.REASONING]


def test_unclosed_answer_is_action_until_response_end():
    tok = build_embedded_tokenizer()
    segments = [("obs", False), ("<think> x </think><answer>Up", True), ("# #", False)]
    _, roles = _roles_for(tok, segments)
    assert list(roles[-4:]) == [Role.ACTION, Role.ACTION, Role.PROMPT, Role.PROMPT]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=40),
    st.lists(st.booleans(), min_size=40, max_size=40),
    st.integers(0, 40),
)
def test_roles_match_reference_on_random_sequences(toks, gens, length):
    # Alphabet {0..5}; open tag = (1, 2), close tag = (3, 4): random sequences hit every edge case.
    n = 40
    tokens = np.zeros((1, n), np.int32)
    tokens[0, : len(toks)] = toks
    generated = np.asarray(gens, bool)[None, :]
    valid = (np.arange(n) < length)[None, :]
    generated &= valid
    got = np.asarray(
        jax.jit(compute_roles, static_argnums=(3, 4))(tokens, generated, valid, (1, 2), (3, 4))
    )
    np.testing.assert_array_equal(got, reference_roles(tokens, generated, valid, (1, 2), (3, 4)))


def test_match_helpers():
    x = np.array([[5, 1, 2, 1, 2, 9]])
    np.testing.assert_array_equal(np.asarray(match_starts(x, (1, 2))), [[0, 1, 0, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(match_ends(x, (1, 2))), [[0, 0, 1, 0, 1, 0]])
    with pytest.raises(ValueError):
        match_starts(x, ())
