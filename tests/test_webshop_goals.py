"""WebShop goals as a TFDS dataset: built by the project, read through tfds.data_source."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from actfocus_jax import envs
from actfocus_jax.data.tasks import TaskSetError
from actfocus_jax.data.webshop_goals import build_webshop_goals, load_goal_indices

OPTIONS = {"seed": 5, "num_products": 60, "num_goals": 48, "test_fraction": 0.25}


def _text(x):
    return x.decode() if isinstance(x, bytes) else str(x)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return data_dir, build_webshop_goals(data_dir, env_options=OPTIONS)


def test_splits_match_the_catalog_and_records_match_its_goals(built):
    data_dir, builder = built
    env = envs.make("webshop", **OPTIONS)
    records = {}
    for split in ("train", "test"):
        name = f"{builder.name}/{builder.builder_config.name}"
        source = tfds.data_source(name, split=split, data_dir=data_dir)
        records[split] = [source[i] for i in range(len(source))]
        ids = load_goal_indices(builder, split)
        assert ids.dtype == np.int32
        assert ids.tolist() == [int(r["goal_index"]) for r in records[split]]
        assert sorted(ids.tolist()) == list(env.goals(split))
    train = {int(r["goal_index"]) for r in records["train"]}
    test = {int(r["goal_index"]) for r in records["test"]}
    assert train and test and not train & test
    assert len(train) + len(test) == OPTIONS["num_goals"]
    for r in records["train"] + records["test"]:
        goal = env.goal(int(r["goal_index"]))
        assert _text(r["instruction"]) == goal.instruction
        assert _text(r["asin"]) == goal.asin
        assert _text(r["product_category"]) == goal.product_category
        assert [_text(a) for a in r["goal_attributes"]] == list(goal.attributes)
        assert [_text(o) for o in r["goal_options"]] == [f"{n}: {v}" for n, v in goal.options]
        assert np.float32(r["price_upper"]) == np.float32(goal.price_upper)
        assert int(r["solution_length"]) == len(r["solution"]) > 0
    # A subset by record position.
    some = load_goal_indices(builder, "test", [1, 0])
    assert some.tolist() == [
        int(records["test"][1]["goal_index"]),
        int(records["test"][0]["goal_index"]),
    ]


def test_stored_solutions_reach_reward_one(built):
    _, builder = built
    env = envs.make("webshop", **OPTIONS)
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        for i in range(3):
            record = source[i]
            state, _ = env.reset(int(record["goal_index"]))
            for action in record["solution"]:
                state, ts = env.step(state, [_text(action)])
            assert state.done and ts.success and state.reward == pytest.approx(1.0)


def test_rebuild_is_idempotent_and_settings_get_their_own_name(built, tmp_path):
    data_dir, builder = built
    again = build_webshop_goals(data_dir, env_options=dict(OPTIONS))
    assert again.builder_config.name == builder.builder_config.name
    assert again.data_dir == builder.data_dir
    other = build_webshop_goals(tmp_path, env_options={**OPTIONS, "seed": 6})
    assert other.builder_config.name != builder.builder_config.name


def test_bad_split_name_and_bad_options(built, tmp_path):
    _, builder = built
    with pytest.raises(TaskSetError, match="split"):
        load_goal_indices(builder, "validation")
    with pytest.raises(TaskSetError, match="out of range"):
        load_goal_indices(builder, "test", [10_000])
    with pytest.raises(TaskSetError, match="no_such_option"):
        build_webshop_goals(tmp_path, env_options={"no_such_option": 1})
    with pytest.raises(TaskSetError, match="no goals"):
        build_webshop_goals(tmp_path, env_options={"num_goals": 1, "num_products": 5})


def test_goal_set_options_keep_every_catalog_option_and_drop_episode_limits(tmp_path):
    from actfocus_jax.data.webshop_goals import goal_set_options

    catalog = {"data_path": str(tmp_path), "seed": 1, "num_products": 9, "test_fraction": 0.5}
    episode = {"max_actions": 4, "format_penalty": -1.0, "max_obs_len": 300}
    # Real WebShop data: human_goals chooses the instructions, so it names a different goal set.
    for human_goals in (True, False):
        options = {**catalog, "human_goals": human_goals, **episode}
        assert goal_set_options(options) == {**catalog, "human_goals": human_goals}
    synthetic = {"seed": 2, "num_products": 9, "num_goals": 20, "split_seed": 3}
    assert goal_set_options({**synthetic, **episode}) == synthetic
    # Every option the env takes as a catalog option (either source) defines the goal set.
    from actfocus_jax.envs.webshop import REAL_CATALOG_OPTIONS, SYNTHETIC_CATALOG_OPTIONS

    every = dict.fromkeys(SYNTHETIC_CATALOG_OPTIONS + REAL_CATALOG_OPTIONS, 0)
    assert goal_set_options(every) == every
