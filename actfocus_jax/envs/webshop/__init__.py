"""WebShop (Yao et al. 2022) as a host environment: catalog, BM25 search, pages, WebShop's reward.

``make(**options)`` (called by ``actfocus_jax.envs.make("webshop", **options)``) builds a
:class:`WebShopEnv` over the synthetic catalog by default, or over the real WebShop data when
``data_path=`` is given.
"""

from __future__ import annotations

from typing import Any

from actfocus_jax.envs.webshop.catalog import (
    Catalog,
    CatalogError,
    Goal,
    Product,
    load_catalog,
)
from actfocus_jax.envs.webshop.env import (
    WebShopEnv,
    WebShopState,
    WebShopTimestep,
    parse_action,
    parse_actions,
)
from actfocus_jax.envs.webshop.reward import RewardInfo, purchase_reward
from actfocus_jax.envs.webshop.search import ProductSearch
from actfocus_jax.envs.webshop.synthetic import synthetic_catalog

__all__ = [
    "ENV_CLASS",
    "REAL_CATALOG_OPTIONS",
    "SYNTHETIC_CATALOG_OPTIONS",
    "Catalog",
    "CatalogError",
    "Goal",
    "Product",
    "ProductSearch",
    "RewardInfo",
    "WebShopEnv",
    "WebShopFromOptions",
    "WebShopState",
    "WebShopTimestep",
    "load_catalog",
    "make",
    "make_env",
    "parse_action",
    "parse_actions",
    "purchase_reward",
    "synthetic_catalog",
]

#: The options that define a catalog, its goals and its splits: for the synthetic catalog
#: (:func:`synthetic_catalog`) and for real WebShop data (:func:`load_catalog`).
SYNTHETIC_CATALOG_OPTIONS = ("seed", "num_products", "num_goals", "test_fraction", "split_seed")
REAL_CATALOG_OPTIONS = ("human_goals", "num_products", "seed", "test_fraction", "split_seed")


class WebShopFromOptions(WebShopEnv):
    """A :class:`WebShopEnv` built from options alone (the registry's ``ENV_CLASS``).

    Args:
      data_path: directory of the real WebShop files (see :func:`load_catalog`); None -> the
        synthetic catalog.
      catalog: an already built Catalog (overrides ``data_path``).
      **options: catalog options (synthetic: ``seed``, ``num_products``, ``num_goals``,
        ``test_fraction``, ``split_seed``; real data: ``human_goals``, ``num_products``, ``seed``,
        ``test_fraction``, ``split_seed``) and :class:`WebShopEnv` options (``tokenizer``,
        ``max_actions``, ``max_actions_per_turn``, ``format_penalty``, ``results_per_page``,
        ``num_results``, ``max_obs_len``).
    """

    def __init__(
        self, *, data_path: str | None = None, catalog: Catalog | None = None, **options: Any
    ):
        keys = REAL_CATALOG_OPTIONS if data_path is not None else SYNTHETIC_CATALOG_OPTIONS
        cat_opts = {k: options.pop(k) for k in keys if k in options}
        if catalog is None:
            if data_path is not None:
                catalog = load_catalog(data_path, **cat_opts)
            else:
                catalog = synthetic_catalog(**cat_opts)
        super().__init__(catalog, **options)


#: ``actfocus_jax.envs.make("webshop", **options)`` builds this class.
ENV_CLASS = WebShopFromOptions


def make_env(**options: Any) -> WebShopEnv:
    """Builds a WebShopEnv from options (see :class:`WebShopFromOptions`); synthetic by default."""
    return WebShopFromOptions(**options)


make = make_env
