"""The README's main job: the embedded default end to end on a 2-core CPU in about 15 minutes.

Sokoban (6x6, 1 box), the tiny model warm-started by SFT on epsilon-noisy solver demonstrations,
then ActFocus-GRPO with a KL anchor to the warm start: the shared recipe of ``recipe.py`` (where
every setting is explained) on Sokoban. See README.md for the numbers it produced.
"""

from experiments.configs.recipe import get_config as recipe


def get_config(model: str = "tiny"):
    if (model or "tiny") != "tiny":
        raise ValueError(
            f"main.py is the embedded default (the tiny model), got model {model!r}; use "
            "experiments/configs/sokoban.py:<model> for other presets"
        )
    c = recipe("sokoban")
    c.workdir = "runs/main"
    return c
