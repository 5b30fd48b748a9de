"""Config files and command-line overrides: every env option is a config field."""

import inspect

import pytest
from absl import flags
from ml_collections import config_flags

from actfocus_jax import envs
from actfocus_jax.train.config import env_options_from


def parse(config_file, *overrides):
    argv = ["prog", f"--config={config_file}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", config_file, flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return fv.config


@pytest.mark.parametrize("env", ["sokoban", "frozenlake", "sudoku", "webshop"])
def test_env_options_mirror_the_constructor(env):
    c = parse(f"experiments/configs/{env}.py")
    sig = inspect.signature(envs.env_class(env).__init__).parameters
    top = {"max_turns", "max_actions_per_turn", "max_actions_per_episode", "format_penalty"}
    for name, value in c.env.options.items():
        assert name in sig and name not in top
        default = sig[name].default
        assert value == (tuple(default) if isinstance(default, tuple) else default)
    # Defaults are not passed on (the env applies them; task-set identities do not change).
    assert env_options_from(c) == {"format_penalty": c.env.format_penalty}


def test_env_options_override_from_the_command_line():
    c = parse(
        "experiments/configs/sokoban.py",
        "--config.env.options.step_penalty=0",
        "--config.env.options.room_size=(5,5)",
        "--config.env.options.max_solution_len=4",
        "--config.env.max_turns=3",
    )
    opts = env_options_from(c)
    assert opts == {
        "step_penalty": 0.0,
        "room_size": (5, 5),
        "max_solution_len": 4,
        "max_turns": 3,
        "format_penalty": -0.1,
    }
    env = envs.make("sokoban", **opts)
    assert (env.step_penalty, env.room_size, env.max_solution_len) == (0.0, (5, 5), 4)
    c = parse("experiments/configs/frozenlake.py", "--config.env.options.slippery=false")
    assert env_options_from(c)["slippery"] is False


def test_unknown_env_option_is_rejected():
    with pytest.raises(AttributeError, match="no_such_option"):
        parse("experiments/configs/sokoban.py", "--config.env.options.no_such_option=1")


#: What the recipe changes beyond the environment's own settings (WebShop: a host env with longer
#: demonstrations and a budget far longer than its episodes).
RECIPE_EXCEPTIONS = {
    "webshop": {
        "rollout": {"path"},
        "sft": {"max_len"},
        "train": {"trim_block"},
        "model": {"remat"},
    }
}


@pytest.mark.parametrize("env", ["sokoban", "frozenlake", "sudoku", "webshop"])
def test_recipe_is_shared_across_envs(env):
    from actfocus_jax.train.config import validate

    c = parse(f"experiments/configs/recipe.py:{env}")
    validate(c)
    assert c.env.name == env
    soko = parse("experiments/configs/recipe.py:sokoban")
    # Everything but the environment (and the work directory) is the same recipe.
    for section in (
        "sft",
        "rollout",
        "algo",
        "actfocus",
        "optim",
        "train",
        "eval",
        "data",
        "model",
    ):
        skip = RECIPE_EXCEPTIONS.get(env, {}).get(section, set())
        mine = {k: v for k, v in c[section].to_dict().items() if k not in skip}
        theirs = {k: v for k, v in soko[section].to_dict().items() if k not in skip}
        assert mine == theirs, section
    if env == "webshop":  # the catalog holds the recipe's 512 held-out goals
        from actfocus_jax.data.webshop_goals import webshop_env_options
        from actfocus_jax.train.config import env_options_from

        shop = envs.make("webshop", **webshop_env_options(env_options_from(c)))
        assert len(shop.goals("test")) == c.eval.num_tasks == 512


def test_main_config_is_the_sokoban_recipe():
    main, recipe = parse("experiments/configs/main.py"), parse("experiments/configs/recipe.py")
    assert main.workdir == "runs/main"
    main_d, recipe_d = main.to_dict(), recipe.to_dict()
    del main_d["workdir"], recipe_d["workdir"]
    assert main_d == recipe_d
    assert env_options_from(main) == {
        "format_penalty": -1.0,
        "max_turns": 3,
        "step_penalty": 0.0,
        "box_on_reward": 0.0,
        "box_off_penalty": 0.0,
    }


def test_recipe_rejects_an_unknown_env():
    # absl wraps the config file's ValueError; its message reaches the user.
    with pytest.raises(flags.IllegalFlagValueError, match="no settings for env 'chess'"):
        parse("experiments/configs/recipe.py:chess")
    with pytest.raises(flags.IllegalFlagValueError, match="embedded default"):
        parse("experiments/configs/main.py:small")


def test_algo_fields_reach_the_update_config_and_bad_ones_are_named():
    """Every ``algo`` flag of the command line lands in the jitted update's AlgoConfig; an
    invalid combination is refused before anything runs, naming the field."""
    from actfocus_jax.train.config import ConfigError, algo_config_from, validate

    c = parse(
        "experiments/configs/main.py",
        "--config.algo.algo=ppo",
        "--config.algo.critic_warmup_steps=3",
        "--config.algo.whiten_advantages=true",
        "--config.actfocus.beta=0",
        "--config.algo.kl_coef=0",
    )
    validate(c)
    a = algo_config_from(c)
    assert (a.algo, a.critic_warmup_steps, a.whiten_advantages) == ("ppo", 3, True)
    assert (a.actfocus.beta, a.kl_coef) == (0.0, 0.0)
    bad = parse("experiments/configs/main.py", "--config.algo.critic_warmup_steps=3")
    with pytest.raises(ConfigError, match=r"critic_warmup_steps.*algo=ppo"):
        validate(bad)
    gc = ("--config.algo.algo=ppo", "--config.algo.group_center_advantages=true")
    assert algo_config_from(parse("experiments/configs/main.py", *gc)).group_center_advantages
    with pytest.raises(ConfigError, match=r"group_center_advantages.*without whiten_advantages"):
        validate(parse("experiments/configs/main.py", *gc, "--config.algo.whiten_advantages=true"))


def test_trim_block_is_checked_and_refused_with_a_width_normalised_loss():
    from actfocus_jax.train.config import ConfigError, validate

    validate(parse("experiments/configs/recipe.py:webshop"))  # trims (train.trim_block=256)
    with pytest.raises(ConfigError, match=r"train\.trim_block=-1.*>= 0"):
        validate(parse("experiments/configs/main.py", "--config.train.trim_block=-1"))
    width_norm = ("--config.train.trim_block=256", "--config.algo.loss_agg=seq-mean-token-sum-norm")
    with pytest.raises(ConfigError, match=r"trim_block.*loss_agg_norm"):
        validate(parse("experiments/configs/main.py", *width_norm))
    validate(parse("experiments/configs/main.py", *width_norm, "--config.algo.loss_agg_norm=512"))
