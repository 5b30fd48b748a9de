"""WebShop demonstrations: the replanning expert, the episodes' token layout, the TFDS dataset, and
SFT -> RL end to end on the host env."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from test_trainer import tiny_config

from actfocus_jax import envs
from actfocus_jax.data.demos import build_demos, generate_demos, make_demo_generator
from actfocus_jax.data.webshop_demos import WebShopDemoGenerator, WebShopExpert
from actfocus_jax.rollout.roles import Role


@pytest.fixture(scope="module")
def env():
    return envs.make("webshop")


def _play(env, expert, state, ts):
    while not ts.done:
        state, ts = env.step(state, [expert.action(state)])
    return state, ts


def test_expert_recovers_from_any_page(env):
    """From states reached by 0-4 random listed actions (any page: wrong items, later results
    pages, description pages, options chosen wrongly), the expert alone buys the target with all
    goal options: reward 1 (given the action budget to do so)."""
    roomy = envs.make("webshop", max_actions=40)
    expert = WebShopExpert(roomy)
    rng = random.Random(0)
    pages = set()
    for gi in roomy.goals("train")[:40]:
        for _walk in range(3):
            state, ts = roomy.reset(gi)
            for _ in range(rng.randrange(5)):
                listed = roomy.available_actions(state)
                if state.page == "search":
                    action = f"search[{expert.query(gi)}]"
                else:
                    action = rng.choice([a for a in listed if a != "click[buy now]"])
                state, ts = roomy.step(state, [action])
            pages.add(state.page)
            state, ts = _play(roomy, expert, state, ts)
            assert ts.success and state.reward == 1.0 and state.bought == roomy.goal(gi).asin
    assert pages >= {"search", "results", "item"}


@pytest.mark.parametrize("style", ["plan", "state"])
def test_demo_episodes_layout_and_success(env, style):
    gen = WebShopDemoGenerator(env, epsilon=0.0, reasoning=style)
    tok, tpl = env.tokenizer, gen.template
    goals = env.goals("train")[:12]
    demos = generate_demos(env, np.asarray(goals), list(goals), epsilon=0.0, generator=gen)
    assert len(demos) == len(goals)
    for ep, gi in zip(demos, goals):
        # Noise-free demos follow env.solve's action list exactly and earn reward 1.
        assert [a for (a,) in ep.actions] == env.solve(int(gi))
        assert ep.success and ep.episode_return == pytest.approx(1.0) and not ep.noisy
        assert ep.num_turns == len(ep.responses) == len(ep.turn_rewards) == ep.num_actions
        # Layout: [first_prefix obs_0 first_suffix] resp_0 [turn_prefix obs_1 turn_suffix] resp_1 ...
        # with the env's own observation ids, no observation after the last response.
        state, ts = env.reset(int(gi))
        want, gen_mask, turns = [], [], []
        for t, resp in enumerate(ep.responses):
            pre, suf = (
                (tpl.first_prefix, tpl.first_suffix)
                if t == 0
                else (tpl.turn_prefix, tpl.turn_suffix)
            )
            chunk = [*pre, *ts.obs_tokens, *suf]
            ids = tok.encode(resp)
            want += chunk + ids
            gen_mask += [False] * len(chunk) + [True] * len(ids)
            turns += [t] * (len(chunk) + len(ids))
            state, ts = env.step(state, resp)
        assert ts.done
        np.testing.assert_array_equal(ep.tokens, want)
        np.testing.assert_array_equal(ep.generated, gen_mask)
        np.testing.assert_array_equal(ep.turn_ids, turns)
        # Roles: exactly the answer span (tags included, DESIGN.md) is ACTION, and every response
        # has reasoning; nothing outside the responses has a generated role.
        roles = np.asarray(ep.roles)
        for t, (action,) in enumerate(ep.actions):
            sel = ep.generated & (ep.turn_ids == t)
            act_ids = ep.tokens[sel & (roles == Role.ACTION)]
            want_span = f"{tok.tags['answer_open']}{action}{tok.tags['answer_close']}"
            assert tok.decode(act_ids.tolist()).replace(" ", "") == want_span.replace(" ", "")
            assert np.any(roles[sel] == Role.REASONING)
        assert not np.any(np.isin(roles[~ep.generated], [Role.ACTION, Role.REASONING]))
    if style == "state":  # the decision is left to the answer: no asin or option value in <think>
        for ep in demos:
            for resp, (action,) in zip(ep.responses, ep.actions):
                think = resp.split("</think>")[0]
                target = action[action.index("[") + 1 : -1]
                if action.startswith("click[b"):
                    assert target not in think


def test_noisy_demos_recover_and_use_listed_actions(env):
    """epsilon = 0.3 over all train goals (plan style; any word outside the tokenizer's
    vocabulary would raise): noisy turns take a listed, non-purchase action, the expert recovers,
    and most demos still succeed; each demo depends only on (seed, goal, repetition)."""
    goals = np.asarray(env.goals("train"))
    demos = generate_demos(env, goals, goals.tolist(), epsilon=0.3, seed=3)
    assert len(demos) == len(goals)
    noisy = [d for d in demos if d.noisy]
    assert 0.5 < len(noisy) / len(demos) < 0.95
    success = np.mean([d.success for d in demos])
    assert 0.55 < success < 0.95, success
    assert np.mean([d.success for d in noisy]) < 1.0
    for d in noisy[:30]:
        state, _ = env.reset(d.task_id)
        for (action,) in d.actions:
            assert state.page == "search" or action in env.available_actions(state)
            assert action != "click[buy now]" or state.asin == env.goal(d.task_id).asin
            state, _ = env.step(state, [action])
    again = generate_demos(env, goals[5:8], goals[5:8].tolist(), epsilon=0.3, seed=3)
    for a, b in zip(again, demos[5:8]):
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_generator_choice_and_bad_input(env):
    assert isinstance(make_demo_generator(env), WebShopDemoGenerator)
    with pytest.raises(ValueError, match="epsilon"):
        WebShopDemoGenerator(env, epsilon=1.5)
    with pytest.raises(ValueError, match="reasoning style"):
        WebShopDemoGenerator(env, reasoning="story")
    with pytest.raises(ValueError, match="not a host env"):
        WebShopDemoGenerator(envs.make("sokoban"))


def test_webshop_demo_dataset(tmp_path):
    builder = build_demos(
        tmp_path, "webshop", num_tasks=10, demos_per_task=2, epsilon=0.2, reasoning="state"
    )
    train = builder.as_data_source(split="train")
    val = builder.as_data_source(split="validation")
    assert (len(train), len(val)) == (18, 2)
    env = envs.make("webshop")
    train_goals = set(env.goals("train"))
    for ex in list(train) + list(val):
        assert int(ex["task_id"]) in train_goals  # never a test goal
        assert np.any(ex["roles"] == Role.ACTION) and len(ex["tokens"]) > 300
    # Built once: a second call reuses the files.
    again = build_demos(
        tmp_path, "webshop", num_tasks=10, demos_per_task=2, epsilon=0.2, reasoning="state"
    )
    assert again.data_dir == builder.data_dir


def test_webshop_main_job_end_to_end(tmp_path):
    """SFT on WebShop demonstrations, then RL on the host env, with the paired evaluation."""
    from experiments.main import run_main

    c = tiny_config(
        tmp_path,
        "webshop",
        **{
            "rollout.path": "host",
            "env.max_actions_per_episode": 3,
            "model.init": "sft",
            "sft.steps": 2,
            "sft.batch_size": 2,
            "sft.num_tasks": 4,
            "sft.demos_per_task": 1,
            "sft.max_len": 512,
            "sft.reasoning": "state",
            "eval.num_tasks": 2,
            "train.trim_block": 64,
        },
    )
    result = run_main(c)
    with open(os.path.join(c.workdir, "main_result.json")) as f:
        saved = json.load(f)
    assert saved["held_out_gain"]["greedy"]["n"] == 2
    assert os.path.isfile(os.path.join(c.workdir, "sft", "model.safetensors"))
    assert result["final"]["final/greedy/success"] in (0.0, 0.5, 1.0)
    # The updates trained on batches trimmed to their episodes (blocks of 64), not the budget.
    with open(os.path.join(c.workdir, "rl", "metrics.jsonl")) as f:
        widths = [
            json.loads(line)["train/batch_width"] for line in f if "train/batch_width" in line
        ]
    from actfocus_jax.rollout.engine import sequence_budget
    from actfocus_jax.train.config import rollout_config_from
    from actfocus_jax.train.trainer import Experiment

    exp = Experiment(c)
    rcfg = rollout_config_from(c, max_turns=exp.env.max_turns)
    budget = sequence_budget(exp.template(), exp.env.max_obs_len, rcfg)
    assert widths and all(w % 64 == 0 and w < budget for w in widths), (widths, budget)
