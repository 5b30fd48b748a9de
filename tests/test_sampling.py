"""KV-cache generation vs full-sequence scoring, padding invariance, greedy / top-k / top-p, stops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from actfocus_jax.models import (
    apply,
    generate,
    get_config,
    init_model,
    make_prompt_mask,
    sample_token,
    score,
)

CFG = get_config("tiny")
B, P, N = 3, 8, 8
TEMP = 0.7
PROMPT_LENS = np.array([8, 5, 2])


@pytest.fixture(scope="module")
def model():
    m = init_model(CFG, 0)
    rng = np.random.default_rng(1)

    def fill(path, x):
        noise = rng.normal(size=x.shape)
        value = 1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else 0.08 * noise
        return jnp.asarray(value, x.dtype)

    nnx.update(m, jax.tree_util.tree_map_with_path(fill, nnx.state(m, nnx.Param)))
    return m


@pytest.fixture(scope="module")
def prompts():
    """Right-padded prompts [B, P] (pad = 0) and their real tokens per row."""
    rng = np.random.default_rng(2)
    rows = [rng.integers(4, CFG.vocab_size, n) for n in PROMPT_LENS]
    right = np.zeros((B, P), np.int32)
    for r, toks in enumerate(rows):
        right[r, : len(toks)] = toks
    return right, rows


def pad_rows(rows, width, side):
    out = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for r, toks in enumerate(rows):
        s = side[r] if isinstance(side, list) else side
        start = 0 if s == "right" else width - len(toks)
        if s == "middle":  # a hole of 2 pads after the first token
            out[r, 0], out[r, 3 : 2 + len(toks)] = toks[0], toks[1:]
            mask[r, 0], mask[r, 3 : 2 + len(toks)] = True, True
            continue
        out[r, start : start + len(toks)] = toks
        mask[r, start : start + len(toks)] = True
    return out, mask


@pytest.fixture(scope="module")
def sampled(model, prompts):
    right, _ = prompts
    return generate(
        model,
        right,
        jax.random.key(3),
        max_new_tokens=N,
        prompt_lengths=PROMPT_LENS,
        padding_side="right",
        temperature=TEMP,
    )


@pytest.fixture(scope="module")
def greedy(model, prompts):
    right, _ = prompts
    return generate(
        model, right, jax.random.key(0), max_new_tokens=N, prompt_lengths=PROMPT_LENS, greedy=True
    )


def test_generate_logp_and_entropy_match_score(model, prompts, sampled):
    right, _ = prompts
    out = sampled
    assert out.tokens.shape == (B, N) and out.logp.shape == (B, N) and out.entropy.shape == (B, N)
    assert out.tokens.dtype == jnp.int32 and out.logp.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.lengths), N)  # no stop ids: full length
    assert not np.asarray(out.done).any() and int(out.num_steps) == N
    full = np.concatenate([right, np.asarray(out.tokens)], 1)
    mask = np.concatenate([make_prompt_mask(PROMPT_LENS, P), np.asarray(out.mask)], 1)
    logp, ent = score(model, full, mask, temperature=TEMP)
    np.testing.assert_allclose(np.asarray(logp[:, P:]), np.asarray(out.logp), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent[:, P:]), np.asarray(out.entropy), atol=1e-5)
    assert (np.asarray(out.logp) < 0).all() and (np.asarray(out.entropy) > 0).all()
    # Score conventions: position 0 and padding get 0, real prompt tokens a log-prob.
    assert (np.asarray(logp[:, 0]) == 0).all()
    assert (np.asarray(logp)[~mask] == 0).all()
    assert (np.asarray(logp[0, 1:P]) < 0).all()


def test_padding_does_not_change_any_row(model, prompts, sampled):
    _, rows = prompts
    key = jax.random.key(3)
    left, left_mask = pad_rows(rows, P, "left")
    out_left = generate(model, left, key, max_new_tokens=N, prompt_mask=left_mask, temperature=TEMP)
    wide, wide_mask = pad_rows(rows, P + 3, ["left", "middle", "right"])
    out_wide = generate(model, wide, key, max_new_tokens=N, prompt_mask=wide_mask, temperature=TEMP)
    for out in (out_left, out_wide):
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(sampled.tokens))
        np.testing.assert_allclose(np.asarray(out.logp), np.asarray(sampled.logp), atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.entropy), np.asarray(sampled.entropy), atol=1e-5)


def test_score_is_padding_invariant(model, prompts):
    _, rows = prompts
    compact, cmask = pad_rows(rows, P, "right")
    holes, hmask = pad_rows(rows, P + 3, ["left", "middle", "right"])
    lp_c, ent_c = score(model, compact, cmask)
    lp_h, ent_h = score(model, holes, hmask)
    for r in range(B):
        np.testing.assert_allclose(
            np.asarray(lp_h)[r][hmask[r]], np.asarray(lp_c)[r][cmask[r]], atol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(ent_h)[r][hmask[r]], np.asarray(ent_c)[r][cmask[r]], atol=1e-5
        )


def test_greedy_is_argmax_of_full_forward_and_top_k_1_matches(model, prompts, greedy):
    right, _ = prompts
    full = np.concatenate([right, np.asarray(greedy.tokens)], 1)
    mask = np.concatenate([make_prompt_mask(PROMPT_LENS, P), np.ones((B, N), bool)], 1)
    logits = np.asarray(jax.jit(apply, static_argnums=0)(*nnx.split(model), full, None, mask))
    for r in range(B):
        real = np.flatnonzero(mask[r])
        for t in range(N):
            prev = real[PROMPT_LENS[r] + t - 1]  # the token before generated token t
            assert greedy.tokens[r, t] == logits[r, prev].argmax()
    top1 = generate(
        model,
        right,
        jax.random.key(5),
        max_new_tokens=N,
        prompt_lengths=PROMPT_LENS,
        top_k=1,
        temperature=1.0,
    )
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
    np.testing.assert_allclose(np.asarray(top1.logp), np.asarray(greedy.logp), atol=1e-6)


def test_stop_tokens_and_early_exit(model, prompts, greedy):
    right, _ = prompts
    ref = np.asarray(greedy.tokens)
    stops = sorted(set(ref[:, 1].tolist()))  # every row emits a stop token by step 2
    out = generate(
        model,
        right,
        jax.random.key(0),
        max_new_tokens=N,
        prompt_lengths=PROMPT_LENS,
        greedy=True,
        stop_ids=stops,
        pad_id=0,
    )
    toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for r in range(B):
        first = min(t for t in range(N) if ref[r, t] in stops)
        assert lengths[r] == first + 1 <= 2
        np.testing.assert_array_equal(toks[r, : first + 1], ref[r, : first + 1])
        assert (toks[r, first + 1 :] == 0).all()
        assert (np.asarray(out.logp)[r, first + 1 :] == 0).all()
        np.testing.assert_array_equal(np.asarray(out.mask)[r], np.arange(N) < first + 1)
    assert np.asarray(out.done).all()
    assert int(out.num_steps) == lengths.max() < N  # the loop exited early


@jax.jit
def _draw(logits, key, temperature):
    """4000 draws each without filters, with top-k = 2 and with top-p = 0.6 (one compilation)."""

    def draws(key, **filters):
        keys = jax.random.split(key, 4000)
        one = lambda k: sample_token(logits[None], k, temperature=temperature, **filters)
        tok, logp, ent = jax.vmap(one)(keys)
        return tok[:, 0], logp[:, 0], ent[:, 0]

    k1, k2, k3 = jax.random.split(key, 3)
    return draws(k1), draws(k2, top_k=2), draws(k3, top_p=0.6)


def test_sample_token_distribution_and_filters():
    probs = np.array([0.45, 0.25, 0.15, 0.1, 0.05])
    temp = 2.0  # logits / 2 = log of the base probabilities
    plain, top_k, top_p = _draw(
        jnp.log(jnp.asarray(probs, jnp.float32)) * 2.0, jax.random.key(0), temp
    )
    tok, logp, ent = map(np.asarray, plain)
    np.testing.assert_allclose(np.bincount(tok, minlength=5) / 4000, probs, atol=0.03)
    np.testing.assert_allclose(logp, np.log(probs)[tok], atol=1e-5)
    np.testing.assert_allclose(ent, -(probs * np.log(probs)).sum(), atol=1e-5)
    # top-k = 2: only the two best tokens, in ratio 45:25; log-probs stay untruncated.
    tok, logp, _ = map(np.asarray, top_k)
    freq = np.bincount(tok, minlength=5) / 4000
    assert freq[2:].sum() == 0
    np.testing.assert_allclose(freq[:2], probs[:2] / probs[:2].sum(), atol=0.03)
    np.testing.assert_allclose(logp, np.log(probs)[tok], atol=1e-5)
    # top-p = 0.6: the nucleus is {0, 1} (mass before token 2 is 0.70 >= 0.6).
    tok = np.asarray(top_p[0])
    freq = np.bincount(tok, minlength=5) / 4000
    assert freq[2:].sum() == 0 and freq[1] > 0.25


def test_generate_rejects_bad_arguments(model, prompts):
    right, _ = prompts
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="at least one real token"):
        generate(model, right, key, max_new_tokens=2, prompt_lengths=[8, 0, 2])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, right, key, max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, right, key, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="padding_side"):
        generate(model, right, key, max_new_tokens=2, prompt_lengths=PROMPT_LENS, padding_side="up")
