"""SFT demonstrations: rollout-identical token layout, replay, vocabulary, roles, noise, TFDS, batches."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from actfocus_jax import envs
from actfocus_jax.data import tasks as tasks_lib
from actfocus_jax.data.demos import (
    DemoGenerator,
    SftBatches,
    build_demos,
    generate_demos,
    load_sft_batches,
    make_sft_batch,
)
from actfocus_jax.data.reasoning import make_expert, task_from_state
from actfocus_jax.envs.base import ParsedActions, stack_tasks
from actfocus_jax.rollout import Role
from actfocus_jax.rollout.engine import Policy, RolloutConfig, make_turn_template, rollout_fused

#: (id, env name, options): the deterministic envs plus slippery FrozenLake.
CONFIGS = {
    "sokoban": ("sokoban", {}),
    "sudoku": ("sudoku", {}),
    "frozenlake": ("frozenlake", {"slippery": False}),
    "frozenlake_slippery": ("frozenlake", {}),
}
DETERMINISTIC = ("sokoban", "sudoku", "frozenlake")


@functools.cache
def get_env(cfg: str):
    name, opts = CONFIGS[cfg]
    return envs.make(name, **opts)


@functools.cache
def get_tasks(cfg: str, n: int = 6):
    env = get_env(cfg)
    rng = np.random.default_rng(123)
    return stack_tasks([env.generate_task(rng) for _ in range(n)])


@functools.cache
def get_generator(cfg: str):
    return DemoGenerator(get_env(cfg))


@functools.cache
def get_demos(cfg: str, epsilon: float, reps: int = 1, n: int = 6):
    return generate_demos(
        get_env(cfg),
        get_tasks(cfg, n),
        list(range(n)),
        demos_per_task=reps,
        epsilon=epsilon,
        seed=7,
        generator=get_generator(cfg),
    )


@functools.cache
def get_jitted(cfg: str):
    env = get_env(cfg)
    return jax.jit(env.reset), jax.jit(env.step)


def task_at(tasks, i):
    return jax.tree.map(lambda x: np.asarray(x)[i], tasks)


# ----------------------------------------------------------------------------------------------
# Layout: identical to the rollout engine
# ----------------------------------------------------------------------------------------------


@chex.dataclass
class ScriptCache:
    length: chex.Array  # int32[B]


def script_policy(vocab: int) -> Policy:
    """Teacher forcing: after position p the logits put all mass on ``script[b, p + 1]``."""

    def apply(script, tokens, num_valid, cache):
        t = tokens.shape[1]
        pos = cache.length[:, None] + jnp.arange(t)[None, :] + 1
        nxt = jnp.take_along_axis(script, jnp.clip(pos, 0, script.shape[1] - 1), axis=1)
        logits = 50.0 * jax.nn.one_hot(nxt, vocab, dtype=jnp.float32)
        return logits, ScriptCache(length=cache.length + num_valid)

    return Policy(
        apply=apply, init_cache=lambda b, s: ScriptCache(length=jnp.zeros((b,), jnp.int32))
    )


@pytest.mark.parametrize("cfg", ["sokoban"])
def test_demo_tokens_equal_a_rollout_that_samples_the_demo(cfg):
    """The fused rollout engine, teacher-forced on the demo, rebuilds the demo bit for bit."""
    env = get_env(cfg)
    demos = get_demos(cfg, 0.2)[:3]
    tok = env.tokenizer
    template = make_turn_template(tok, env.system_prompt(), "plain")
    script = np.full((len(demos), 1024), tok.pad_id, np.int32)
    for i, d in enumerate(demos):
        script[i, : len(d.tokens)] = d.tokens
    tasks = task_at(get_tasks(cfg), np.array([d.task_id for d in demos]))
    buf = rollout_fused(
        jnp.asarray(script),
        tasks,
        jnp.arange(len(demos), dtype=jnp.int32),
        jax.random.key(0),
        policy=script_policy(tok.vocab_size),
        env=env,
        template=template,
        cfg=RolloutConfig(max_turns=env.max_turns, max_response_tokens=64, greedy=True),
        group_size=1,
        vocab=tok.vocab_size,
    )
    for i, d in enumerate(demos):
        n = int(buf.length[i])
        assert n == len(d.tokens)
        np.testing.assert_array_equal(np.asarray(buf.tokens[i, :n]), d.tokens)
        np.testing.assert_array_equal(np.asarray(buf.generated[i, :n]), d.generated)
        np.testing.assert_array_equal(np.asarray(buf.roles[i, :n]), d.roles)
        np.testing.assert_array_equal(np.asarray(buf.turn_ids[i, :n]), d.turn_ids)
        np.testing.assert_allclose(float(buf.episode_return[i]), d.episode_return, atol=1e-5)
        assert bool(buf.success[i]) == d.success
        assert int(buf.num_turns[i]) == d.num_turns


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_layout_pieces_and_replay(cfg):
    """Prefix / obs / suffix pieces in place; obs = env rendering of replayed states; same return."""
    env = get_env(cfg)
    tok = env.tokenizer
    tpl = make_turn_template(tok, env.system_prompt(), "plain")
    reset, step = get_jitted(cfg)
    tasks = get_tasks(cfg)
    for d in get_demos(cfg, 0.2):
        state, ts = reset(jnp.asarray(d.env_key), task_at(tasks, d.task_id))
        obs = tok.encode(env.render_text(jax.device_get(state)))
        assert obs == np.asarray(ts.obs_tokens)[: int(ts.obs_len)].tolist()
        expected = [*tpl.first_prefix, *obs, *tpl.first_suffix]
        gen = [False] * len(expected)
        turns = [0] * len(expected)
        total, success = 0.0, False
        for t, resp in enumerate(d.responses):
            assert d.observations[t] == env.render_text(jax.device_get(state))
            ids = tok.encode(resp)
            expected += ids
            gen += [True] * len(ids)
            turns += [t] * len(ids)
            assert resp.split("<answer>")[1].split("</answer>")[0].split(" || ") == [
                env.action_names[a] for a in d.actions[t]
            ]
            # Replay with the answer's actions as a ParsedActions built on the host.
            state, ts = step(state, ParsedActions.from_list(d.actions[t], env.max_actions_per_turn))
            total += float(ts.reward)
            success = bool(ts.success)
            if t + 1 < len(d.responses):
                assert not bool(ts.done)
                obs = tok.encode(env.render_text(jax.device_get(state)))
                piece = [*tpl.turn_prefix, *obs, *tpl.turn_suffix]
                expected += piece
                gen += [False] * len(piece)
                turns += [t + 1] * len(piece)
        assert bool(ts.done) or len(d.responses) == env.max_turns
        assert d.tokens.tolist() == expected
        assert d.generated.tolist() == gen
        assert d.turn_ids.tolist() == turns
        np.testing.assert_allclose(total, d.episode_return, atol=1e-5)
        np.testing.assert_allclose(d.turn_rewards.sum(), d.episode_return, atol=1e-5)
        assert success == d.success and d.num_turns == len(d.responses)


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_vocabulary_roles_and_reasoning(cfg):
    env = get_env(cfg)
    tok = env.tokenizer
    unk = tok.token_to_id("<unk>")
    a_open, a_close = tok.token_to_id("<answer>"), tok.token_to_id("</answer>")
    think_close = tok.token_to_id("</think>")
    for d in get_demos(cfg, 0.2):
        assert unk not in d.tokens.tolist()
        roles = d.roles
        np.testing.assert_array_equal(roles[~d.generated], Role.PROMPT)
        assert set(roles[d.generated].tolist()) <= {Role.REASONING, Role.ACTION}
        # Each response: <think> ... </think> is REASONING, <answer> ... </answer> ACTION (the
        # system prompt quotes the tags too: only generated positions count).
        toks = d.tokens.tolist()
        starts = [i for i, t in enumerate(toks) if t == a_open and d.generated[i]]
        ends = [i for i, t in enumerate(toks) if t == a_close and d.generated[i]]
        assert len(starts) == len(ends) == d.num_turns
        for s, e in zip(starts, ends):
            assert np.all(roles[s : e + 1] == Role.ACTION)
            assert toks[s - 1] == think_close and roles[s - 1] == Role.REASONING
        assert int(np.sum(roles == Role.ACTION)) == sum(e - s + 1 for s, e in zip(starts, ends))
        for resp in d.responses:
            reasoning = resp.split("</think>")[0].removeprefix("<think>").split()
            assert 5 <= len(reasoning) <= 40, resp
            assert len(tok.encode(resp)) <= 48, resp


@pytest.mark.parametrize("cfg", ["sokoban", "frozenlake", "frozenlake_slippery"])
def test_reasoning_names_the_written_moves(cfg):
    env = get_env(cfg)
    for d in get_demos(cfg, 0.5):
        for resp, acts in zip(d.responses, d.actions):
            m = re.search(r"I (?:go|try) ([a-z ,]+) \.", resp)
            said = [w for w in m.group(1).split(" , ")]
            assert said == [env.action_names[a].lower() for a in acts], resp


def test_sudoku_reasoning_names_the_written_cells():
    env = get_env("sudoku")
    for d in get_demos("sudoku", 0.5):
        for resp, acts in zip(d.responses, d.actions):
            cells = re.findall(r"row (\d) col (\d)", resp)
            wanted = [(str(a // 16 + 1), str(a // 4 % 4 + 1)) for a in acts]
            assert cells == wanted, resp
            for a, sentence in zip(acts, resp.split("</think>")[0].split(" . ")):
                if "only" in sentence:  # "only v is missing" claims are about the written value
                    assert f"only {a % 4 + 1} is missing" in sentence
    assert env.size == 4


@pytest.mark.parametrize("cfg", DETERMINISTIC)
def test_epsilon_zero_always_succeeds_and_noise_hurts(cfg):
    clean = get_demos(cfg, 0.0)
    assert all(d.success and not d.noisy for d in clean)
    noisy = get_demos(cfg, 0.5)
    assert any(d.noisy for d in noisy)
    assert all(d.success for d in noisy if not d.noisy)
    mean = lambda xs, f: float(np.mean([f(d) for d in xs]))
    assert mean(noisy, lambda d: d.episode_return) < mean(clean, lambda d: d.episode_return)
    if cfg != "sudoku":  # sudoku's action slack absorbs most mistakes: only the return drops
        assert mean(noisy, lambda d: d.success) < 1.0


@pytest.mark.parametrize("cfg", ["sokoban", "sudoku", "frozenlake_slippery"])
def test_task_from_state_replans_mid_episode(cfg):
    env = get_env(cfg)
    reset, step = get_jitted(cfg)
    expert = make_expert(env)
    task = task_at(get_tasks(cfg), 0)
    key = jax.random.key_data(jax.random.key(3))
    state, _ = reset(key, task)
    plan = expert.plan(jax.device_get(state))
    state, _ = step(state, ParsedActions.from_list(plan[:1], env.max_actions_per_turn))
    if bool(state.done):
        pytest.skip("episode ended after one action")
    mid = task_from_state(env, state)
    restarted, _ = reset(key, mid)
    assert env.render_text(jax.device_get(restarted)) == env.render_text(jax.device_get(state))
    replan = expert.plan(jax.device_get(state))
    assert replan
    if cfg != "frozenlake_slippery":  # the optimal plan's tail is optimal from the new state
        assert len(replan) == len(plan) - 1


# ----------------------------------------------------------------------------------------------
# TFDS builder and batches
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("demos")
    kw = dict(
        num_tasks=6,
        demos_per_task=2,
        epsilon=0.2,
        seed=0,
        val_fraction=0.34,
        task_num_train=8,
        task_num_test=4,
    )
    return data_dir, kw, build_demos(data_dir, "sokoban", **kw)


def test_builder_splits_and_train_only_tasks(built):
    data_dir, kw, builder = built
    assert builder.info.file_format.value == "array_record"
    train = tfds.data_source(
        f"sft_demos/{builder.builder_config.name}", split="train", data_dir=data_dir
    )
    val = builder.as_data_source(split="validation")
    assert len(train) == 4 * 2 and len(val) == 2 * 2
    rec = train[0]
    assert rec["tokens"].dtype == np.int32 and rec["roles"].dtype == np.int8
    assert rec["generated"].shape == rec["tokens"].shape == rec["turn_ids"].shape
    train_ids = {int(train[i]["task_id"]) for i in range(len(train))}
    val_ids = {int(val[i]["task_id"]) for i in range(len(val))}
    assert not train_ids & val_ids and len(train_ids) == 4 and len(val_ids) == 2
    # Every demo's task is a train-split task; none is (or equals) a test-split task.
    task_set = builder.task_set()
    ts_train, ids, _ = tasks_lib.load_tasks(task_set, "train")
    ts_test, _, _ = tasks_lib.load_tasks(task_set, "test")
    fps_train = {
        int(i): tasks_lib.task_fingerprint(task_at(ts_train, k)) for k, i in enumerate(ids)
    }
    fps_test = {tasks_lib.task_fingerprint(task_at(ts_test, k)) for k in range(4)}
    assert train_ids | val_ids <= set(fps_train)
    assert not {fps_train[i] for i in train_ids | val_ids} & fps_test
    # The stored demos are those generate_demos makes for the same tasks and seed.
    env = get_env("sokoban")
    i = int(train[0]["task_id"])
    k = ids.tolist().index(i)  # TFDS shuffles records: task ids are not positions
    again = generate_demos(
        env,
        task_at(ts_train, np.array([k])),
        [i],
        demos_per_task=2,
        epsilon=0.2,
        seed=0,
        generator=get_generator("sokoban"),
    )
    assert any(np.array_equal(a.tokens, train[0]["tokens"]) for a in again)
    # Idempotent: a second call reuses the files.
    mtime = (builder.data_path / "dataset_info.json").stat().mtime
    again_builder = build_demos(data_dir, "sokoban", **kw)
    assert again_builder.data_dir == builder.data_dir
    assert (builder.data_path / "dataset_info.json").stat().mtime == mtime


def test_batches_shapes_padding_and_position(built):
    _, _, builder = built
    source = builder.as_data_source(split="train")
    it = load_sft_batches(builder, 3, 1024, seed=1, epoch=0, num_epochs=1)
    batches = list(it)
    assert len(batches) == 3 and it.position == (1, 0) and it.num_truncated == 0
    seen = []
    for b in batches:
        assert b["tokens"].shape == b["valid"].shape == b["loss_mask"].shape == (3, 1024)
        assert b["tokens"].dtype == np.int32 and b["valid"].dtype == bool
        assert np.all(b["tokens"][~b["valid"]] == 0)
        assert not np.any(b["loss_mask"] & ~b["valid"])
        lengths = b["valid"].sum(1)
        assert np.all(b["valid"] == (np.arange(1024)[None, :] < lengths[:, None]))  # right padded
        seen += [int(t) for t in b["task_id"] if t >= 0]
    assert batches[-1]["task_id"][-1] == -1 and not batches[-1]["valid"][-1].any()
    assert sorted(seen) == sorted(int(source[i]["task_id"]) for i in range(len(source)))
    rec = source[int(it.order(0)[0])]
    n = len(rec["tokens"])
    np.testing.assert_array_equal(batches[0]["tokens"][0, :n], rec["tokens"])
    np.testing.assert_array_equal(batches[0]["loss_mask"][0, :n], rec["generated"])
    # Resuming from a saved position gives the same stream; epochs are reshuffled.
    endless = SftBatches(builder, 3, 1024, seed=1)
    next(endless)
    state = endless.state_dict()
    want = [next(endless) for _ in range(4)]
    resumed = SftBatches(builder, 3, 1024, seed=1)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(4)]
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert resumed.position == (1, 6)
    assert not np.array_equal(endless.order(0), endless.order(1))
    # Endless by default; drop_remainder keeps every row real (8 demos: 2 full batches per epoch).
    full = load_sft_batches(builder, 3, 1024, seed=1, drop_remainder=True)
    positions = []
    for _ in range(5):
        assert next(full)["valid"].any(axis=1).all()
        positions.append(full.position)
    assert positions == [(0, 3), (0, 6), (1, 3), (1, 6), (2, 3)]


def test_pad_multiple_trims_padding_columns_and_keeps_the_sft_loss(built):
    from flax import nnx

    from actfocus_jax.data.demos import batch_width
    from actfocus_jax.models import ModelConfig, init_model
    from actfocus_jax.train.sft import sft_loss

    _, _, builder = built
    fixed = SftBatches(builder, 3, 512, seed=1, end_epoch=1)
    trimmed = SftBatches(builder, 3, 512, seed=1, end_epoch=1, pad_multiple=16)
    cfg = ModelConfig(
        vocab_size=2048, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64
    )
    graphdef, params = nnx.split(init_model(cfg, 0))
    for a, b in zip(fixed, trimmed, strict=True):
        longest = int(a["valid"].sum(1).max())
        w = b["tokens"].shape[1]
        assert w % 16 == 0 and longest <= w < longest + 16 and w == batch_width([longest], 512, 16)
        for k in ("tokens", "valid", "loss_mask", "roles", "turn_ids"):
            np.testing.assert_array_equal(b[k], a[k][:, :w])
            assert not a["valid"][:, w:].any()
        np.testing.assert_array_equal(a["task_id"], b["task_id"])
        full = sft_loss(graphdef, params, {k: jnp.asarray(v) for k, v in a.items()})
        part = sft_loss(graphdef, params, {k: jnp.asarray(v) for k, v in b.items()})
        np.testing.assert_allclose(part[0], full[0], rtol=1e-5)
        np.testing.assert_allclose(part[1]["accuracy"], full[1]["accuracy"], rtol=1e-6)
    assert batch_width([300], 256, 64) == 256  # capped at max_len (the demo is then truncated)
    assert batch_width([], 256, 64) == 64 and batch_width([5], 256, 0) == 256
    with pytest.raises(ValueError, match="pad_multiple"):
        SftBatches(builder, 3, 512, pad_multiple=-1)


def test_truncation_is_counted_and_warned(built):
    _, _, builder = built
    it = SftBatches(builder, 4, 64, seed=0, end_epoch=2)
    with pytest.warns(UserWarning, match="truncated") as record:
        batches = list(it)
    assert it.num_truncated == 16 and it.num_served == 2 * it.size
    # One warning per epoch that truncates, not one per batch.
    assert len([w for w in record if "truncated" in str(w.message)]) == 2
    assert all(b["valid"].all() for b in batches)
    batch, n = make_sft_batch([], 2, 8, pad_id=0)
    assert n == 0 and not batch["valid"].any() and np.all(batch["roles"] == Role.PAD)


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_state_reasoning_describes_the_state_not_the_decision(cfg):
    """reasoning="state": the same episodes (same actions, same noise draws), the <think> span keeps
    the state description of the "plan" style and drops every word about the chosen actions."""
    env = get_env(cfg)
    unk = env.tokenizer.token_to_id("<unk>")
    n = 4
    plan = get_demos(cfg, 0.3, n=n)
    state = generate_demos(
        env,
        get_tasks(cfg, n),
        list(range(n)),
        epsilon=0.3,
        seed=7,
        generator=DemoGenerator(env, reasoning="state"),
    )
    assert len(plan) == len(state)
    decision_words = re.compile(r"\bI (go|try|push|put)\b")
    for p, s in zip(plan, state):
        assert s.actions == p.actions and s.success == p.success
        assert unk not in s.tokens.tolist()
        for rp, rs in zip(p.responses, s.responses):
            think_p = rp.split("</think>")[0].removeprefix("<think>").strip()
            think_s = rs.split("</think>")[0].removeprefix("<think>").strip()
            assert not decision_words.search(think_s), rs
            assert rp.split("</think>")[1] == rs.split("</think>")[1]  # the same answer
            if cfg != "sudoku":  # the state sentences are the plan style's opening sentences
                assert think_p.startswith(think_s.removesuffix("I cannot solve this .").strip())
            else:  # the cells of the answer, with their candidates (no value chosen)
                assert re.findall(r"row \d col \d", think_s) == re.findall(
                    r"row \d col \d", think_p
                )
    with pytest.raises(ValueError, match="reasoning style"):
        make_expert(env, "story")
