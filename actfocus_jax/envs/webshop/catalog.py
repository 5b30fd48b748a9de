"""WebShop catalog schema (products, goals) and the loader of the real WebShop data files.

The schema follows the data of WebShop (Yao et al. 2022, "WebShop: Towards Scalable Real-World Web
Interaction with Grounded Language Agents"; files of ``web_agent_site/engine``):

* a :class:`Product` carries what WebShop's ``load_products`` keeps of a scraped item: ``asin``,
  ``name`` (the title), ``category`` (one of WebShop's five: beauty, food, fashion, furniture,
  electronics), ``query`` (the search query the item was scraped with; used by the type reward),
  ``product_category`` (the breadcrumb, parts separated by ``›``), the price (a single price or a
  range), ``attributes`` (WebShop's mined attribute phrases), ``options`` (``{name: [values]}``, e.g.
  ``{"color": [...], "size": [...]}``), ``bullets`` (the "features" bullet points) and ``description``;
* a :class:`Goal` carries what WebShop's ``get_human_goals`` / ``get_synthetic_goals`` build: the
  instruction text, the target ``asin``, the target's ``name`` / ``category`` / ``query`` /
  ``product_category``, the goal ``attributes``, the goal ``options`` and ``price_upper``.

:func:`load_catalog` reads the real files (see its docstring for exactly which files and fields);
:func:`actfocus_jax.envs.webshop.synthetic.synthetic_catalog` builds a catalog in the same schema.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Mapping, Sequence

__all__ = [
    "PRICE_RANGE",
    "SPLITS",
    "Catalog",
    "CatalogError",
    "Goal",
    "Product",
    "load_catalog",
    "price_upper_for",
]

#: WebShop's grid of price caps (``PRICE_RANGE`` in ``engine/goal.py``): 10, 20, ..., 990 dollars.
PRICE_RANGE = tuple(10.0 * i for i in range(1, 100))

SPLITS = ("train", "test")

PRODUCT_FILES = ("items_shuffle_1000.json", "items_shuffle.json")
ATTRIBUTE_FILES = ("items_ins_v2_1000.json", "items_ins_v2.json")
HUMAN_GOAL_FILE = "items_human_ins.json"
_GET_DATA = (
    "Get them with WebShop's setup script (github.com/princeton-nlp/WebShop, `setup.sh -d small` "
    "for the 1000-product files or `-d all`), or the Google-Drive links in its README, and pass "
    "the directory holding them."
)


class CatalogError(ValueError):
    """A missing or malformed catalog file or directory."""


@dataclasses.dataclass(frozen=True)
class Product:
    """One product (WebShop's item after ``load_products``).

    Attributes:
      asin: str, the product id (lowercase; WebShop's asins are clicked lowercased).
      name: str, the title.
      category: str, WebShop's top-level category ("beauty", "food", "fashion", ...).
      query: str, the search query the product belongs to (lowercased, stripped).
      product_category: str, breadcrumb with parts separated by ``"›"``.
      price: float, the price used by the reward. A single price as is; for a price range, the
        lower bound (WebShop instead draws a random price inside the range once per server start).
      price_range: tuple[float, float] | None, (low, high) when the listing gives a range.
      attributes: tuple[str, ...], attribute phrases (WebShop's ``Attributes``).
      options: tuple[tuple[str, tuple[str, ...]], ...], ``(option name, values)`` pairs in page
        order (use :attr:`options_dict` for a dict).
      bullets: tuple[str, ...], feature bullet points (WebShop's ``BulletPoints``).
      description: str, the long description (WebShop's ``Description``).
    """

    asin: str
    name: str
    category: str
    query: str
    product_category: str
    price: float
    price_range: tuple[float, float] | None = None
    attributes: tuple[str, ...] = ()
    options: tuple[tuple[str, tuple[str, ...]], ...] = ()
    bullets: tuple[str, ...] = ()
    description: str = ""

    @property
    def options_dict(self) -> dict[str, tuple[str, ...]]:
        """``{option name: values}``."""
        return dict(self.options)

    @property
    def price_text(self) -> str:
        """Price as WebShop shows it: ``$12.99`` or ``$10.99 to $15.99``."""
        if self.price_range is not None:
            return f"${self.price_range[0]:.2f} to ${self.price_range[1]:.2f}"
        return f"${self.price:.2f}"


@dataclasses.dataclass(frozen=True)
class Goal:
    """One instruction (WebShop's goal dict).

    Attributes:
      instruction: str, the instruction shown to the agent (with the price clause).
      asin: str, the target product.
      name: str, the target product's title (WebShop's ``goal["name"]``; used by the type reward).
      category / query / product_category: str, the target product's (type reward).
      attributes: tuple[str, ...], goal attributes.
      options: tuple[tuple[str, str], ...], goal options as ``(option name, value)`` pairs; the name
        is ``""`` when the data gives only values (WebShop's human goals list values only).
      price_upper: float, the price cap (WebShop uses 1e6 when the instruction has no cap).
    """

    instruction: str
    asin: str
    name: str
    category: str
    query: str
    product_category: str
    attributes: tuple[str, ...]
    options: tuple[tuple[str, str], ...]
    price_upper: float

    @property
    def option_values(self) -> tuple[str, ...]:
        return tuple(v for _, v in self.options)


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Products and goals, plus a deterministic disjoint train / test split of the goals.

    Attributes:
      products: tuple[Product, ...] with unique asins.
      goals: tuple[Goal, ...]; every goal's asin is in ``products``.
      test_fraction: float, share of goals in the test split (at least one goal when there are >= 2).
      split_seed: int, seed of the goal permutation (WebShop shuffles its goals with a seed too and
        takes the first 500 as test; we take the first ``test_fraction`` share).
      source: str, where the catalog came from ("synthetic(seed=...)" or the data directory).
    """

    products: tuple[Product, ...]
    goals: tuple[Goal, ...]
    test_fraction: float = 0.1
    split_seed: int = 233
    source: str = ""

    def __post_init__(self) -> None:
        asins = [p.asin for p in self.products]
        if len(set(asins)) != len(asins):
            raise CatalogError("duplicate asins in catalog")
        known = set(asins)
        for g in self.goals:
            if g.asin not in known:
                raise CatalogError(f"goal for unknown asin {g.asin!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise CatalogError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        object.__setattr__(self, "_by_asin", {p.asin: p for p in self.products})

    def product(self, asin: str) -> Product:
        """The product with this asin (KeyError if unknown)."""
        return self._by_asin[asin]  # type: ignore[attr-defined]

    def has_product(self, asin: str) -> bool:
        return asin in self._by_asin  # type: ignore[attr-defined]

    def split(self, split: str) -> tuple[int, ...]:
        """Goal indices of ``split`` ("train" or "test"), sorted; the two splits are disjoint."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        n = len(self.goals)
        order = list(range(n))
        random.Random(self.split_seed).shuffle(order)
        n_test = round(n * self.test_fraction)
        if self.test_fraction > 0 and n >= 2:
            n_test = max(1, n_test)
        chosen = order[:n_test] if split == "test" else order[n_test:]
        return tuple(sorted(chosen))


def price_upper_for(price: float, rng: random.Random) -> float:
    """WebShop's price cap: two of the first four grid prices above ``price``, the larger one.

    Returns 1e6 (no cap) when fewer than two grid prices lie above ``price``.
    """
    above = [p for p in PRICE_RANGE if p > price][:4]
    if len(above) < 2:
        return 1e6
    return max(rng.sample(above, 2))


# --------------------------------------------------------------------------------------------------
# Loader of the real WebShop files.


def _find(path: str, names: Sequence[str], what: str) -> str:
    for name in names:
        full = os.path.join(path, name)
        if os.path.isfile(full):
            return full
    raise CatalogError(f"no {what} file in {path!r}: expected one of {list(names)}. {_GET_DATA}")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CatalogError(f"cannot read {path}: {e}") from e


def _parse_pricing(pricing) -> tuple[float, tuple[float, float] | None]:
    """WebShop's ``pricing`` string ("$12.99" or "$10.99 - $15.99"); missing -> $100 as WebShop."""
    if isinstance(pricing, int | float):
        return float(pricing), None
    if not pricing or not isinstance(pricing, str):
        return 100.0, None
    values = []
    for part in pricing.split("$")[1:]:
        digits = re.sub(r"[^\d.]", "", part)
        try:
            values.append(float(digits))
        except ValueError:
            continue
    if not values:
        return 100.0, None
    if len(values) == 1:
        return values[0], None
    low, high = values[0], values[1]
    return low, (low, high)


def _parse_options(raw) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """WebShop's ``customization_options``: ``{name: [{"value": ..., "image": ...}, ...]}``.

    As WebShop: names and values lowercased, values stripped, ``/`` in values replaced by ``" | "``.
    """
    if not raw or not isinstance(raw, Mapping):
        return ()
    out = []
    for name, contents in raw.items():
        if not contents:
            continue
        values = []
        for c in contents:
            v = c.get("value") if isinstance(c, Mapping) else c
            if v is None:
                continue
            v = str(v).strip().replace("/", " | ").lower()
            if v and v not in values:
                values.append(v)
        if values:
            out.append((str(name).lower(), tuple(values)))
    return tuple(out)


def _as_text(x) -> str:
    if x is None:
        return ""
    if isinstance(x, list | tuple):
        return " ".join(str(s) for s in x if s)
    return str(x)


def _goal_options(values: Sequence[str], product: Product) -> tuple[tuple[str, str], ...]:
    """Maps WebShop's list of goal option values to ``(name, value)`` using the product's options."""
    out = []
    for v in values:
        v = str(v).strip().lower()
        name = next((n for n, vals in product.options if v in vals), "")
        out.append((name, v))
    return tuple(out)


def load_catalog(
    path: str | os.PathLike,
    *,
    human_goals: bool = True,
    num_products: int | None = None,
    seed: int = 42,
    test_fraction: float = 0.1,
    split_seed: int = 233,
) -> Catalog:
    """Reads the real WebShop data files from directory ``path``.

    Files (the names of WebShop's ``web_agent_site/utils.py``; the first found is used):

    * products: ``items_shuffle_1000.json`` or ``items_shuffle.json`` -- a JSON list of items; fields
      read: ``asin`` (items with ``"nan"`` or > 10 characters and duplicates are skipped, as WebShop
      does), ``name`` -> ``Product.name``, ``category``, ``query`` (lowercased, stripped),
      ``product_category``, ``pricing`` ("$a" or "$a - $b"; missing -> $100 as WebShop) ->
      ``price`` / ``price_range``, ``customization_options`` -> ``options``, ``small_description``
      -> ``bullets``, ``full_description`` -> ``description``.
    * attributes: ``items_ins_v2_1000.json`` or ``items_ins_v2.json`` -- ``{asin: {"attributes":
      [...], "instruction": str, "instruction_attributes": [...], "instruction_options": [...]}}``;
      ``attributes`` -> ``Product.attributes`` (WebShop's ``Attributes``). With
      ``human_goals=False``, the ``instruction`` / ``instruction_attributes`` /
      ``instruction_options`` fields give one goal per product (WebShop's synthetic goals expand
      all option combinations; we keep the listed options only).
    * human goals (``human_goals=True``, WebShop's default): ``items_human_ins.json`` --
      ``{asin: [{"instruction": str, "instruction_attributes": [...], "instruction_options":
      [...]}, ...]}``; goals without attributes are skipped (as WebShop).

    The price cap of each goal follows WebShop (:func:`price_upper_for`, drawn with ``seed``) and is
    appended to the instruction as ``", and price lower than X.XX dollars"``.

    Args:
      path: directory holding the files.
      human_goals: use the human instructions (True) or the per-product synthetic ones (False).
      num_products: keep only the first ``num_products`` products (and their goals).
      seed: seed of the price caps.
      test_fraction / split_seed: see :class:`Catalog`.

    Returns:
      Catalog.

    Raises:
      CatalogError: a missing directory or file (naming the expected files and how to get them), or
        unreadable JSON.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CatalogError(
            f"WebShop data directory {path!r} does not exist. It must hold one of "
            f"{list(PRODUCT_FILES)}, one of {list(ATTRIBUTE_FILES)} and {HUMAN_GOAL_FILE}. {_GET_DATA}"
        )
    raw_products = _read_json(_find(path, PRODUCT_FILES, "products"))
    raw_attrs = _read_json(_find(path, ATTRIBUTE_FILES, "attributes"))
    raw_human = _read_json(_find(path, (HUMAN_GOAL_FILE,), "human goals")) if human_goals else {}
    if not isinstance(raw_products, list):
        raise CatalogError("the products file must hold a JSON list of items")
    if not isinstance(raw_attrs, Mapping) or not isinstance(raw_human, Mapping):
        raise CatalogError(
            "the attribute and human-goal files must hold JSON objects keyed by asin"
        )

    products: list[Product] = []
    seen: set[str] = set()
    for item in raw_products:
        if not isinstance(item, Mapping):
            continue
        asin = str(item.get("asin", "")).strip()
        if not asin or asin == "nan" or len(asin) > 10 or asin.lower() in seen:
            continue
        seen.add(asin.lower())
        price, price_range = _parse_pricing(item.get("pricing"))
        attr_entry = raw_attrs.get(asin) or {}
        bullets = item.get("small_description") or ()
        if isinstance(bullets, str):
            bullets = (bullets,)
        products.append(
            Product(
                asin=asin.lower(),
                name=_as_text(item.get("name")).strip(),
                category=_as_text(item.get("category")).strip().lower(),
                query=_as_text(item.get("query")).lower().strip(),
                product_category=_as_text(item.get("product_category")).strip(),
                price=price,
                price_range=price_range,
                attributes=tuple(str(a) for a in attr_entry.get("attributes", ()) or ()),
                options=_parse_options(item.get("customization_options")),
                bullets=tuple(str(b).strip() for b in bullets if b),
                description=_as_text(item.get("full_description")).strip(),
            )
        )
        if num_products is not None and len(products) >= num_products:
            break

    by_lower = {p.asin: p for p in products}
    rng = random.Random(seed)
    goals: list[Goal] = []

    def add_goal(product: Product, instruction: str, attributes, options) -> None:
        attributes = tuple(str(a) for a in attributes or ())
        if not attributes:
            return
        price_upper = price_upper_for(product.price, rng)
        text = str(instruction).strip().strip(".")
        if price_upper < 1e6:
            text += f", and price lower than {price_upper:.2f} dollars"
        goals.append(
            Goal(
                instruction=text,
                asin=product.asin,
                name=product.name,
                category=product.category,
                query=product.query,
                product_category=product.product_category,
                attributes=attributes,
                options=_goal_options(options or (), product),
                price_upper=price_upper,
            )
        )

    if human_goals:
        for asin, entries in raw_human.items():
            product = by_lower.get(str(asin).lower())
            if product is None or not isinstance(entries, list):
                continue
            for e in entries:
                if isinstance(e, Mapping) and e.get("instruction"):
                    add_goal(
                        product,
                        e["instruction"],
                        e.get("instruction_attributes"),
                        e.get("instruction_options"),
                    )
    else:
        for asin, e in raw_attrs.items():
            product = by_lower.get(str(asin).lower())
            if product is None or not isinstance(e, Mapping) or not e.get("instruction"):
                continue
            add_goal(
                product,
                e["instruction"],
                e.get("instruction_attributes"),
                e.get("instruction_options"),
            )
    if not products:
        raise CatalogError(f"no usable products in {path!r}")
    return Catalog(
        products=tuple(products),
        goals=tuple(goals),
        test_fraction=test_fraction,
        split_seed=split_seed,
        source=path,
    )
