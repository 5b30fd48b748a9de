"""WebShop instructions as a TFDS dataset built by the project's own builder (no downloads).

The counterpart of :mod:`actfocus_jax.data.tasks` for the host WebShop env: :class:`WebShopGoals` is a
``tfds.core.GeneratorBasedBuilder`` whose config (:class:`WebShopGoalsConfig`) holds the env's options
(``data_path`` -- None for the synthetic catalog --, the catalog's ``seed`` / ``num_products`` /
``num_goals``, ``test_fraction`` / ``split_seed``, and env options such as ``max_actions``). Each
example is one goal of the env's catalog:

* ``goal_index`` (int32): index into ``env.catalog.goals`` (what ``env.reset`` takes);
* ``instruction``, ``asin``, ``product_category`` (text);
* ``goal_attributes`` (sequence of text) and ``goal_options`` (sequence of text, ``"name: value"``;
  ``": value"`` when the data names no option, as WebShop's human goals);
* ``price_upper`` (float32; 1e6 when the instruction has no cap);
* ``solution`` (sequence of text, the env's ``solve(goal)`` actions, one per turn) and
  ``solution_length`` (int32; 0 when the goal is unreachable and ``require_solution`` is off).

Splits ``train`` / ``test`` are the catalog's disjoint goal splits (``env.goals(split)``). Datasets
are written as ``array_record`` and read with ``tfds.data_source``. Use :func:`build_webshop_goals`
to build (idempotent) and :func:`load_goal_indices` to read a split's goal indices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from actfocus_jax.data.tasks import TaskSetError
from actfocus_jax.envs.webshop import REAL_CATALOG_OPTIONS, SYNTHETIC_CATALOG_OPTIONS

__all__ = [
    "WebShopGoals",
    "WebShopGoalsConfig",
    "build_webshop_goals",
    "goal_example",
    "goal_set_options",
    "load_goal_indices",
    "webshop_env_options",
]

SPLITS = ("train", "test")

# Option values must be plain data: they are part of the dataset's name and of its config.
_PLAIN = (str, int, float, bool, type(None))


@dataclasses.dataclass(eq=False)
class WebShopGoalsConfig(tfds.core.BuilderConfig):
    """Which WebShop env (and so which catalog and split) the goals come from.

    Attributes:
      env_options: keyword options of ``actfocus_jax.envs.make("webshop", ...)`` as a sorted tuple of
        items: ``data_path`` (None -> synthetic catalog), catalog options (synthetic: ``seed``,
        ``num_products``, ``num_goals``, ``test_fraction``, ``split_seed``; real data:
        ``human_goals``, ``num_products``, ``seed``, ``test_fraction``, ``split_seed``) and env
        options (``max_actions``, ``results_per_page``, ``num_results``, ...) that shape ``solve``.
      require_solution: if True a goal the env's solver cannot reach raises :class:`TaskSetError`;
        if False it is kept with an empty solution (``solution_length == 0``).
    """

    env_options: tuple[tuple[str, Any], ...] = ()
    require_solution: bool = True


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(options)
    for key, value in options.items():
        if key in ("catalog", "tokenizer"):
            raise TaskSetError(
                f"env option {key!r} is not supported by WebShopGoals (only plain settings can "
                "name a dataset); pass data_path and catalog options instead"
            )
        if not isinstance(value, _PLAIN):
            raise TaskSetError(
                f"env option {key}={value!r} must be a str, int, float, bool or None, "
                f"not {type(value).__name__}"
            )
    if options.get("data_path") is not None:
        options["data_path"] = os.fspath(options["data_path"])
    return options


#: The options that define the catalog and its splits (and so the goal set): ``data_path`` and
#: every catalog option of the synthetic catalog or of real WebShop data (``human_goals``).
CATALOG_OPTIONS = (
    "data_path",
    *dict.fromkeys(SYNTHETIC_CATALOG_OPTIONS + REAL_CATALOG_OPTIONS),
)


def webshop_env_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The project's generic env options mapped onto WebShop's argument names
    (``max_actions_per_episode`` -> ``max_actions``; ``max_turns`` dropped: WebShop's turn cap is
    its action cap)."""
    out = dict(options)
    if "max_actions_per_episode" in out:
        out["max_actions"] = out.pop("max_actions_per_episode")
    out.pop("max_turns", None)
    return out


def goal_set_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of env options that defines the goal set (:data:`CATALOG_OPTIONS`): episode
    limits do not change the goals (the stored reference solutions use the env's default action
    budget), so runs with different limits share one goal set."""
    return {k: v for k, v in options.items() if k in CATALOG_OPTIONS}


def _make_env(options: Mapping[str, Any]) -> Any:
    from actfocus_jax.envs import make

    try:
        return make("webshop", **dict(options))
    except (TypeError, ValueError) as e:
        raise TaskSetError(f"cannot build the webshop env with options {dict(options)}: {e}") from e


def goal_example(env: Any, goal_index: int, *, require_solution: bool = True) -> dict[str, Any]:
    """The dataset example of ``env.catalog.goals[goal_index]`` (see the module docstring).

    Raises:
      TaskSetError: if ``require_solution`` and the env's solver cannot reach the goal.
    """
    goal = env.goal(goal_index)
    try:
        solution = [str(a) for a in env.solve(goal)]
    except RuntimeError as e:
        if require_solution:
            raise TaskSetError(
                f"goal {goal_index} ({goal.asin}) has no reference solution: {e}; raise "
                "max_actions or build with require_solution=False"
            ) from e
        solution = []
    return {
        "goal_index": np.int32(goal_index),
        "instruction": goal.instruction,
        "asin": goal.asin,
        "goal_attributes": list(goal.attributes),
        "goal_options": [f"{name}: {value}" for name, value in goal.options],
        "price_upper": np.float32(goal.price_upper),
        "product_category": goal.product_category,
        "solution": solution,
        "solution_length": np.int32(len(solution)),
    }


class WebShopGoals(tfds.core.GeneratorBasedBuilder):
    """Goals of a WebShop catalog with reference solutions; splits ``train`` and ``test``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Goals of actfocus_jax's WebShop catalog with the env's reference solutions."
    }
    BUILDER_CONFIGS: ClassVar[list[WebShopGoalsConfig]] = [
        WebShopGoalsConfig(name="synthetic", env_options=()),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        text_seq = tfds.features.Sequence(tfds.features.Text())
        features = {
            "goal_index": tfds.features.Scalar(dtype=np.int32),
            "instruction": tfds.features.Text(),
            "asin": tfds.features.Text(),
            "goal_attributes": text_seq,
            "goal_options": text_seq,
            "price_upper": tfds.features.Scalar(dtype=np.float32),
            "product_category": tfds.features.Text(),
            "solution": text_seq,
            "solution_length": tfds.features.Scalar(dtype=np.int32),
        }
        options = dict(self.builder_config.env_options)
        source = options.get("data_path") or "the synthetic catalog"
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"WebShop goals of {source} with reference solutions",
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager: Any) -> Mapping[str, Iterator]:
        cfg = self.builder_config
        env = _make_env(_check_options(dict(cfg.env_options)))
        splits = {split: tuple(int(i) for i in env.goals(split)) for split in SPLITS}
        if set(splits["train"]) & set(splits["test"]):
            raise TaskSetError("the catalog's train and test goal splits overlap")
        for split, indices in splits.items():
            if not indices:
                raise TaskSetError(
                    f"split {split!r} of the catalog has no goals ({len(env.catalog.goals)} goals, "
                    f"test_fraction={env.catalog.test_fraction}); add goals or change test_fraction"
                )
        # Solve everything before writing, so an unreachable goal fails before any file is written.
        examples = {
            split: [goal_example(env, i, require_solution=cfg.require_solution) for i in indices]
            for split, indices in splits.items()
        }
        return {split: self._generate_examples(examples[split]) for split in SPLITS}

    def _generate_examples(self, examples: list[dict[str, Any]]) -> Iterator:
        for example in examples:
            yield int(example["goal_index"]), example


def _data_fingerprint(data_path: str) -> list[tuple[str, int, int]]:
    """Names, sizes and mtimes of the files in ``data_path`` (a changed directory gets a new name)."""
    try:
        entries = sorted(os.scandir(data_path), key=lambda e: e.name)
    except OSError as e:
        raise TaskSetError(f"cannot read WebShop data directory {data_path!r}: {e}") from e
    return [(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()]


def build_webshop_goals(
    data_dir: str | os.PathLike,
    *,
    env_options: Mapping[str, Any] | None = None,
    name: str | None = None,
    require_solution: bool = True,
) -> WebShopGoals:
    """Builds (once; later calls reuse the files) and returns the WebShop goals builder.

    Args:
      data_dir: TFDS data directory; the dataset lives in ``data_dir/web_shop_goals/<name>/1.0.0``.
      env_options: options of ``actfocus_jax.envs.make("webshop", ...)`` (plain values only; see
        :class:`WebShopGoalsConfig`); None -> the default synthetic catalog.
      name: config name; defaults to ``webshop_<hash>`` of all settings (and, with ``data_path``,
        of the data files' names, sizes and mtimes), so different settings never share files.
      require_solution: see :class:`WebShopGoalsConfig`.

    Raises:
      TaskSetError: bad options, an empty split, or (``require_solution``) an unreachable goal.
    """
    options = _check_options(env_options or {})
    if name is None:
        data_path = options.get("data_path")
        files = _data_fingerprint(data_path) if data_path is not None else []
        key = repr((sorted(options.items()), require_solution, files))
        name = f"webshop_{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    config = WebShopGoalsConfig(
        name=name,
        env_options=tuple(sorted(options.items())),
        require_solution=require_solution,
    )
    builder = WebShopGoals(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


def load_goal_indices(builder: WebShopGoals, split: str, indices: Any | None = None) -> np.ndarray:
    """Goal indices (into ``env.catalog.goals``) of ``split``'s records, read via ``tfds.data_source``.

    Args:
      builder: a built :class:`WebShopGoals`.
      split: "train" or "test".
      indices: record positions to read (None -> all, in record order).

    Returns:
      int32 ``[N]`` goal indices, ready for ``env.reset(goal_index)``.

    Raises:
      TaskSetError: unknown split, or a record position out of range.
    """
    if split not in SPLITS:
        raise TaskSetError(f"unknown split {split!r}; use one of {SPLITS}")
    source = builder.as_data_source(split=split)
    n = len(source)
    positions = range(n) if indices is None else [int(i) for i in np.asarray(indices).reshape(-1)]
    bad = [i for i in positions if not -n <= i < n]
    if bad:
        raise TaskSetError(
            f"record positions {bad[:5]} out of range for split {split!r} ({n} goals)"
        )
    return np.asarray([source[i]["goal_index"] for i in positions], np.int32).reshape(-1)
