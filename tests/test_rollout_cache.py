"""rollout_host grows the KV cache in blocks: the same episodes as a cache of the whole budget."""

import jax
import numpy as np
import pytest
from flax import nnx

from actfocus_jax import envs
from actfocus_jax.models import get_config
from actfocus_jax.models.transformer import KVCache, init_cache, init_model, resize_cache
from actfocus_jax.rollout.buffer import check_buffer
from actfocus_jax.rollout.engine import (
    Policy,
    RolloutConfig,
    make_turn_template,
    rollout_fused,
    rollout_host,
    sequence_budget,
    transformer_policy,
)


def _tiny(vocab_size):
    config = get_config(
        "tiny", n_layers=1, d_model=64, mlp_dim=128, vocab_size=-(-vocab_size // 64) * 64
    )
    graphdef, params = nnx.split(init_model(config, 0))
    return config, graphdef, params


def _recording_policy(graphdef, config, sizes):
    """The transformer policy whose resize_cache records every size it is traced for."""
    base = transformer_policy(graphdef, config)

    def resize(cache, max_len):
        sizes.append(max_len)
        return resize_cache(cache, max_len)

    return Policy(
        apply=base.apply, init_cache=base.init_cache, cache_axes=base.cache_axes,
        resize_cache=resize,
    )  # fmt: skip


def _assert_same_episodes(buf, ref):
    for name, x in buf.items():
        if name in ("old_logp", "entropy", "logit"):  # attention over fewer (masked) slots
            np.testing.assert_allclose(np.asarray(x), np.asarray(ref[name]), atol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(ref[name]), err_msg=name)


@pytest.mark.parametrize("greedy", [True, False])
def test_growing_cache_gives_the_budget_cache_episodes_on_webshop(greedy):
    env = envs.make("webshop", num_products=20, num_goals=8, max_actions=4, max_obs_len=96)
    tok = env.tokenizer
    config, graphdef, params = _tiny(tok.vocab_size)
    cfg = RolloutConfig(max_turns=env.max_turns, max_response_tokens=12, greedy=greedy)
    template = make_turn_template(tok, "webshop : buy the product .", "plain")
    sizes = []
    kwargs = dict(
        policy=_recording_policy(graphdef, config, sizes),
        env=env,
        template=template,
        cfg=cfg,
        group_size=2,
        vocab=config.vocab_size,
    )
    goals = [0, 1, 2]
    ids = np.arange(3, dtype=np.int32)
    key = jax.random.key(1)
    full = rollout_host(params, goals, ids, key, cache_block=0, **kwargs)
    assert sizes == []  # cache_block=0: the whole budget from the start
    grown = rollout_host(params, goals, ids, key, cache_block=32, **kwargs)
    check_buffer(grown)
    _assert_same_episodes(grown, full)
    budget = sequence_budget(template, env.max_obs_len, cfg)
    # The cache grew turn by turn in blocks of 32 and never past the budget.
    assert sizes and sizes == sorted(set(sizes)) and sizes[-1] <= budget
    assert all(s % 32 == 0 or s == budget for s in sizes)
    assert int(np.max(np.asarray(full.length))) <= sizes[-1]


def test_growing_cache_on_a_jax_env_matches_the_fused_rollout():
    env = envs.make("sokoban", max_turns=3)
    tok = env.tokenizer
    config, graphdef, params = _tiny(tok.vocab_size)
    rng = np.random.default_rng(0)
    tasks = jax.tree.map(lambda *x: np.stack(x), *[env.generate_task(rng) for _ in range(3)])
    kwargs = dict(
        policy=transformer_policy(graphdef, config),
        env=env,
        template=make_turn_template(tok, env.system_prompt(), "plain"),
        cfg=RolloutConfig(max_turns=3, max_response_tokens=8, temperature=1.0),
        group_size=2,
        vocab=config.vocab_size,
    )
    ids = np.arange(3, dtype=np.int32)
    fused = rollout_fused(params, tasks, ids, jax.random.key(3), **kwargs)
    host = rollout_host(params, tasks, ids, jax.random.key(3), cache_block=16, **kwargs)
    _assert_same_episodes(host, fused)


def test_resize_cache_keeps_slots_and_only_grows():
    config, _, _ = _tiny(64)
    cache = init_cache(config, 2, 8)
    key = jax.random.key(0)
    cache = cache.replace(
        k=jax.random.normal(key, cache.k.shape),
        v=jax.random.normal(jax.random.fold_in(key, 1), cache.v.shape),
        length=np.array([3, 8], np.int32),
    )
    big = resize_cache(cache, 24)
    assert isinstance(big, KVCache) and big.max_len == 24
    np.testing.assert_array_equal(big.k[:, :, :8], cache.k)
    np.testing.assert_array_equal(big.v[:, :, :8], cache.v)
    assert not np.asarray(big.k[:, :, 8:]).any() and not np.asarray(big.v[:, :, 8:]).any()
    np.testing.assert_array_equal(big.length, cache.length)
    assert resize_cache(cache, 8) is cache
    with pytest.raises(ValueError, match="only grows"):
        resize_cache(cache, 4)
    with pytest.raises(ValueError, match="cache_block"):
        rollout_host(None, [], np.zeros(0, np.int32), key, policy=None, env=None, template=None,
                     cfg=RolloutConfig(), group_size=1, vocab=1, cache_block=-1)  # fmt: skip
