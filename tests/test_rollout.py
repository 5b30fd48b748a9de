"""Rollout engine: fused vs host paths, buffer invariants, log-probs vs re-scoring, early stops.

The policy here is a bigram table (logits of the next token depend only on the current token) with a
cache holding each row's last token. It satisfies the same per-row write-position cache contract as
the transformer, compiles in a blink, and can be re-scored exactly in NumPy; the transformer policy is
covered by the same engine in the integration tests.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from actfocus_jax import envs
from actfocus_jax.rollout import Role
from actfocus_jax.rollout.buffer import check_buffer
from actfocus_jax.rollout.engine import (
    Policy,
    RolloutConfig,
    make_turn_template,
    rollout_fused,
    rollout_host,
    sample_from_logits,
)


@chex.dataclass
class BigramCache:
    last: chex.Array  # int32[B]
    length: chex.Array  # int32[B]


def bigram_apply(params, tokens, num_valid, cache):
    logits = params[tokens]  # [B, T, V]
    t = tokens.shape[1]
    idx = jnp.clip(num_valid - 1, 0, t - 1)
    last = jnp.where(num_valid > 0, jnp.take_along_axis(tokens, idx[:, None], 1)[:, 0], cache.last)
    return logits, BigramCache(last=last, length=cache.length + num_valid)


def bigram_init(batch, max_len):
    del max_len
    return BigramCache(last=jnp.zeros((batch,), jnp.int32), length=jnp.zeros((batch,), jnp.int32))


POLICY = Policy(apply=bigram_apply, init_cache=bigram_init)


def build_setup(num_tasks=3):
    """``(env, tokenizer, bigram params, tasks, template)`` for Sokoban (also used by
    ``tests/test_rollout_sharding.py``)."""
    env = envs.make("sokoban")
    tok = env.tokenizer
    vocab = tok.vocab_size
    rng = np.random.default_rng(0)
    # A table that prefers plausible continuations: think text, then an answer with one action.
    table = rng.normal(0.0, 1.0, (vocab, vocab)).astype(np.float32)
    ids = {
        w: tok.token_to_id(w)
        for w in ["<think>", "</think>", "<answer>", "</answer>", "Up", "Left"]
    }
    table[:, ids["<think>"]] += 2.0
    table[ids["<think>"], ids["</think>"]] += 4.0
    table[ids["</think>"], ids["<answer>"]] += 8.0
    table[ids["<answer>"], ids["Up"]] += 6.0
    table[ids["<answer>"], ids["Left"]] += 6.0
    table[ids["Up"], ids["</answer>"]] += 6.0
    table[ids["Left"], ids["</answer>"]] += 6.0
    params = jnp.asarray(table)
    tasks = [env.generate_task(rng) for _ in range(num_tasks)]
    tasks = jax.tree.map(lambda *x: np.stack(x), *tasks)
    template = make_turn_template(tok, env.system_prompt(), "plain")
    return env, tok, params, tasks, template


@pytest.fixture(scope="module")
def setup():
    return build_setup()


def run_rollout(setup, path, cfg, key=0, group_size=2, **kwargs):
    """One rollout of the bigram policy over all tasks of ``setup`` (``kwargs``: e.g. ``mesh``)."""
    env, tok, params, tasks, template = setup
    fn = rollout_fused if path == "fused" else rollout_host
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    return fn(
        params,
        tasks,
        np.arange(num_tasks, dtype=np.int32),
        jax.random.key(key),
        policy=POLICY,
        env=env,
        template=template,
        cfg=cfg,
        group_size=group_size,
        vocab=tok.vocab_size,
        **kwargs,
    )


def _rescore(params, buf, temperature):
    """NumPy float64 re-scoring of the buffer's generated tokens under the bigram policy."""
    table = np.asarray(params, np.float64) / temperature
    tokens = np.asarray(buf.tokens)
    gen = np.asarray(buf.generated)
    out = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
        for j in range(1, tokens.shape[1]):
            if gen[b, j]:
                row = table[tokens[b, j - 1]]
                row = row - row.max()
                out[b, j] = row[tokens[b, j]] - np.log(np.exp(row).sum())
    return out


@pytest.mark.parametrize("greedy", [True, False])
def test_fused_and_host_paths_agree(setup, greedy):
    cfg = RolloutConfig(max_turns=3, max_response_tokens=12, temperature=0.7, greedy=greedy)
    fused = run_rollout(setup, "fused", cfg)
    host = run_rollout(setup, "host", cfg)
    check_buffer(fused)
    check_buffer(host)
    chex.assert_trees_all_equal(fused, host)


def test_buffer_logprobs_equal_rescoring_and_layout(setup):
    _, _, params, _, template = setup
    cfg = RolloutConfig(max_turns=3, max_response_tokens=12, temperature=0.8)
    buf = run_rollout(setup, "fused", cfg, key=3)
    check_buffer(buf)
    ref = _rescore(params, buf, cfg.temperature)
    np.testing.assert_allclose(np.asarray(buf.old_logp), ref, atol=1e-5)
    roles = np.asarray(buf.roles)
    tokens = np.asarray(buf.tokens)
    for b in range(tokens.shape[0]):
        n = int(buf.length[b])
        # The episode opens with the template's prefix, which is prompt.
        prefix = template.first_prefix
        assert tokens[b, : len(prefix)].tolist() == list(prefix)
        assert (roles[b, : len(prefix)] == Role.PROMPT).all()
        assert (roles[b, n:] == Role.PAD).all()
        # Every reward sits on a generated token that ends a response.
        for t in range(cfg.max_turns):
            pos = int(buf.reward_pos[b, t])
            if t < int(buf.num_turns[b]):
                assert bool(buf.generated[b, pos])
                assert pos + 1 == n or not bool(buf.generated[b, pos + 1])
            else:
                assert pos == -1 and float(buf.turn_rewards[b, t]) == 0.0
    assert np.asarray(buf.group_id).tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(buf.episode_return, np.asarray(buf.turn_rewards).sum(1), rtol=1e-6)


def test_episodes_that_end_stop_generating(setup):
    # A policy that always answers "Up" ends episodes at different times (action cap / success);
    # after done no token is generated and no turn is counted.
    cfg = RolloutConfig(max_turns=5, max_response_tokens=8, greedy=True)
    buf = run_rollout(setup, "fused", cfg)
    gen_turns = np.asarray(buf.turn_ids)[np.asarray(buf.generated)]
    for b in range(buf.tokens.shape[0]):
        turns_b = np.asarray(buf.turn_ids[b])[np.asarray(buf.generated[b])]
        assert turns_b.max() + 1 == int(buf.num_turns[b])
    assert gen_turns.size > 0
    done = np.asarray(buf.done)
    assert (np.asarray(buf.num_turns)[done] <= cfg.max_turns).all()
    assert (np.asarray(buf.truncated) == ~done).all()


def test_sample_from_logits_truncations():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    top_k = RolloutConfig(top_k=2)
    toks = jax.vmap(lambda k: sample_from_logits(k, logits, top_k)[0])(keys)
    assert set(np.unique(toks).tolist()) == {0, 1}
    top_p = RolloutConfig(top_p=0.7)
    toks = jax.vmap(lambda k: sample_from_logits(k, logits, top_p)[0])(keys)
    assert set(np.unique(toks).tolist()) == {0, 1}
    freq = np.mean(np.asarray(toks) == 0)
    assert abs(freq - 0.5 / 0.8) < 0.05
    tok, logp, ent, logit = sample_from_logits(keys[0], logits, RolloutConfig(greedy=True))
    assert int(tok[0]) == 0
    np.testing.assert_allclose(float(logit[0]), float(logits[0, 0]))
    np.testing.assert_allclose(float(logp[0]), np.log(0.5), rtol=1e-5)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(float(ent[0]), -(p * np.log(p)).sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        RolloutConfig(temperature=0.0)
