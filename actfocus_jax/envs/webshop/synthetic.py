"""A synthetic WebShop catalog built by the project (no downloads), in the schema of :mod:`.catalog`.

Products are drawn from a fixed vocabulary: WebShop's five categories (Yao et al. 2022), a few product
types each (with a breadcrumb, option names and a price band), category-level attribute phrases in the
style of WebShop's mined attributes ("gluten free", "machine washable", ...), invented brand names,
colors / sizes / scents / flavors / pack sizes. Goals follow WebShop's goal construction: a target
product, one to three of its attributes, one value per option, and WebShop's price cap
(:func:`.catalog.price_upper_for`), rendered as a WebShop-style instruction ("i am looking for ...,
and price lower than 40.00 dollars").

All words are simple lowercase words (listed in :mod:`actfocus_jax.text.words.webshop`, checked by the
tests) so that the embedded word-level tokenizer covers every page. Synthetic asins are ``b000`` ...
``b499`` (at most :data:`MAX_PRODUCTS` products). Attribute phrases and the values of each option are
chosen pairwise distinct under WebShop's fuzzy match (token-set ratio <= 85), so that strict success
requires the exact attributes and options.

Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import random

from actfocus_jax.envs.webshop.catalog import Catalog, Goal, Product, price_upper_for

__all__ = [
    "ATTRIBUTES",
    "BRANDS",
    "MAX_PRODUCTS",
    "OPTION_VALUES",
    "PRODUCT_TYPES",
    "synthetic_catalog",
    "synthetic_vocabulary",
]

MAX_PRODUCTS = 500

BRANDS = (
    "acme",
    "nova",
    "lumo",
    "zeta",
    "orbit",
    "pine",
    "maple",
    "coral",
    "delta",
    "summit",
    "aurora",
    "echo",
    "nimbus",
    "terra",
    "vista",
    "atlas",
)

MODELS = ("pro", "plus", "max", "lite", "classic", "premium", "mini", "deluxe")

#: Attribute phrases per category (WebShop-style mined attributes).
ATTRIBUTES = {
    "fashion": (
        "machine washable",
        "slim fit",
        "long sleeve",
        "short sleeve",
        "soft cotton",
        "quick dry",
        "relaxed fit",
        "high waist",
        "water resistant",
        "breathable",
    ),
    "beauty": (
        "long lasting",
        "paraben free",
        "cruelty free",
        "natural ingredients",
        "sensitive skin",
        "easy to use",
        "travel size",
        "fragrance free",
        "vegan",
        "moisturizing",
    ),
    "food": (
        "gluten free",
        "sugar free",
        "low carb",
        "non gmo",
        "organic",
        "high protein",
        "ready to eat",
        "keto friendly",
        "individually wrapped",
        "caffeine free",
    ),
    "furniture": (
        "easy assembly",
        "solid wood",
        "space saving",
        "storage space",
        "living room",
        "non slip",
        "heavy duty",
        "mid century",
        "easy to clean",
        "metal frame",
    ),
    "electronics": (
        "wireless",
        "fast charging",
        "noise cancelling",
        "long battery life",
        "waterproof",
        "high definition",
        "easy to install",
        "plug and play",
        "compact design",
        "type c",
    ),
}

#: Values per option kind; values of one kind are pairwise distinct under the fuzzy match.
OPTION_VALUES = {
    "color": (
        "black",
        "white",
        "red",
        "blue",
        "green",
        "gray",
        "pink",
        "navy",
        "brown",
        "beige",
        "purple",
        "yellow",
        "orange",
        "silver",
        "gold",
    ),
    "size": ("small", "medium", "large", "xl", "xxl"),
    "shoe size": ("7", "8", "9", "10", "11", "12"),
    "bed size": ("twin", "full", "queen", "king"),
    "volume": ("8 ounce", "16 ounce", "32 ounce"),
    "scent": ("lavender", "vanilla", "rose", "citrus", "coconut", "mint", "unscented"),
    "flavor": ("caramel", "original", "hazelnut", "strawberry", "peanut butter", "honey", "cocoa"),
    "pack": ("6 pack", "12 pack", "30 pack"),
    "length": ("3 feet", "6 feet", "10 feet"),
}

#: product type -> (category, breadcrumb, {option name: option kind}, (min price, max price), suffix)
PRODUCT_TYPES = {
    "shirt": (
        "fashion",
        "fashion › men › shirts",
        {"color": "color", "size": "size"},
        (9, 40),
        "for men",
    ),
    "dress": (
        "fashion",
        "fashion › women › dresses",
        {"color": "color", "size": "size"},
        (15, 70),
        "for women",
    ),
    "jeans": (
        "fashion",
        "fashion › women › jeans",
        {"color": "color", "size": "size"},
        (18, 60),
        "for women",
    ),
    "jacket": (
        "fashion",
        "fashion › men › jackets",
        {"color": "color", "size": "size"},
        (25, 95),
        "for men",
    ),
    "sneakers": (
        "fashion",
        "fashion › shoes › sneakers",
        {"color": "color", "size": "shoe size"},
        (20, 90),
        "for men",
    ),
    "socks": (
        "fashion",
        "fashion › kids › socks",
        {"color": "color", "size": "size"},
        (5, 20),
        "for kids",
    ),
    "hoodie": (
        "fashion",
        "fashion › women › hoodies",
        {"color": "color", "size": "size"},
        (15, 55),
        "for women",
    ),
    "shampoo": (
        "beauty",
        "beauty › hair care › shampoo",
        {"scent": "scent", "size": "volume"},
        (5, 30),
        "",
    ),
    "lipstick": ("beauty", "beauty › makeup › lips", {"color": "color"}, (5, 25), ""),
    "face cream": ("beauty", "beauty › skin care › face", {"size": "volume"}, (8, 60), ""),
    "nail polish": ("beauty", "beauty › makeup › nails", {"color": "color"}, (4, 15), ""),
    "body lotion": (
        "beauty",
        "beauty › skin care › body",
        {"scent": "scent", "size": "volume"},
        (6, 30),
        "",
    ),
    "hair brush": ("beauty", "beauty › hair care › tools", {"color": "color"}, (6, 25), ""),
    "coffee": (
        "food",
        "food › beverages › coffee",
        {"flavor": "flavor", "size": "pack"},
        (8, 40),
        "",
    ),
    "tea": ("food", "food › beverages › tea", {"flavor": "flavor", "size": "pack"}, (5, 25), ""),
    "snack bars": (
        "food",
        "food › snacks › bars",
        {"flavor": "flavor", "size": "pack"},
        (6, 35),
        "",
    ),
    "cookies": (
        "food",
        "food › snacks › cookies",
        {"flavor": "flavor", "size": "pack"},
        (4, 20),
        "",
    ),
    "olive oil": ("food", "food › pantry › oils", {"size": "volume"}, (7, 45), ""),
    "beef jerky": (
        "food",
        "food › snacks › jerky",
        {"flavor": "flavor", "size": "pack"},
        (8, 40),
        "",
    ),
    "office chair": ("furniture", "furniture › office › chairs", {"color": "color"}, (40, 95), ""),
    "desk": (
        "furniture",
        "furniture › office › desks",
        {"color": "color", "size": "size"},
        (45, 99),
        "",
    ),
    "bookshelf": (
        "furniture",
        "furniture › living room › shelves",
        {"color": "color"},
        (30, 90),
        "",
    ),
    "table lamp": ("furniture", "furniture › lighting › lamps", {"color": "color"}, (15, 60), ""),
    "area rug": (
        "furniture",
        "furniture › living room › rugs",
        {"color": "color", "size": "size"},
        (20, 95),
        "",
    ),
    "bed frame": (
        "furniture",
        "furniture › bedroom › beds",
        {"color": "color", "size": "bed size"},
        (60, 99),
        "",
    ),
    "nightstand": ("furniture", "furniture › bedroom › tables", {"color": "color"}, (25, 80), ""),
    "headphones": (
        "electronics",
        "electronics › audio › headphones",
        {"color": "color"},
        (15, 99),
        "",
    ),
    "phone case": ("electronics", "electronics › phones › cases", {"color": "color"}, (5, 25), ""),
    "charger": ("electronics", "electronics › phones › chargers", {"color": "color"}, (8, 35), ""),
    "speaker": ("electronics", "electronics › audio › speakers", {"color": "color"}, (20, 99), ""),
    "keyboard": (
        "electronics",
        "electronics › computers › keyboards",
        {"color": "color"},
        (15, 80),
        "",
    ),
    "mouse": ("electronics", "electronics › computers › mice", {"color": "color"}, (8, 45), ""),
    "usb cable": (
        "electronics",
        "electronics › computers › cables",
        {"color": "color", "size": "length"},
        (5, 20),
        "",
    ),
    "smart watch": (
        "electronics",
        "electronics › wearables › watches",
        {"color": "color"},
        (30, 99),
        "",
    ),
}

_CENTS = (0.99, 0.49, 0.95, 0.0, 0.5, 0.25, 0.75, 0.89, 0.79, 0.19)

_BULLETS = (
    "{a}",
    "{a} for everyday use",
    "designed to be {a}",
    "{a} and built to last",
)

_CLOSINGS = (
    "it makes a great gift.",
    "order yours today.",
    "satisfaction guaranteed.",
    "loved by our customers.",
)

_TEMPLATES = (
    "i am looking for {art} {attrs} {type}{opts}",
    "i need {art} {type} that is {attrs}{opts}",
    "find me {art} {attrs} {type}{opts}",
    "i want to buy {art} {type} which is {attrs}{opts}",
)


def _article(next_word: str) -> str:
    return "an" if next_word[:1] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _price(rng: random.Random, lo: int, hi: int) -> float:
    return round(rng.randint(lo, hi - 1) + rng.choice(_CENTS), 2)


def _make_product(rng: random.Random, index: int, ptype: str, used_titles: set[str]) -> Product:
    category, breadcrumb, option_kinds, (lo, hi), suffix = PRODUCT_TYPES[ptype]
    attributes = rng.sample(ATTRIBUTES[category], rng.randint(3, 4))
    title = ""
    for attempt in range(50):
        brand = rng.choice(BRANDS)
        words = [brand, attributes[0], ptype]
        if attempt >= 10:
            words.insert(1, rng.choice(MODELS))
        if suffix:
            words.append(suffix)
        title = " ".join(words)
        if title not in used_titles:
            break
    used_titles.add(title)
    options = []
    for name, kind in option_kinds.items():
        values = OPTION_VALUES[kind]
        k = rng.randint(min(2, len(values)), min(5, len(values)))
        chosen = sorted(rng.sample(range(len(values)), k))
        options.append((name, tuple(values[i] for i in chosen)))
    price = _price(rng, lo, hi)
    price_range = None
    if rng.random() < 0.15:
        price_range = (price, round(price + rng.randint(2, 10), 2))
    bullets = tuple(rng.choice(_BULLETS).format(a=a) for a in attributes)
    description = f"the {title.split()[0]} {ptype} is {_join(attributes)}. {rng.choice(_CLOSINGS)}"
    return Product(
        asin=f"b{index:03d}",
        name=title,
        category=category,
        query=ptype,
        product_category=breadcrumb,
        price=price,
        price_range=price_range,
        attributes=tuple(attributes),
        options=tuple(options),
        bullets=bullets,
        description=description,
    )


def _make_goal(rng: random.Random, product: Product) -> Goal:
    _, _, _, _, suffix = PRODUCT_TYPES[product.query]
    n_attr = rng.randint(1, min(3, len(product.attributes)))
    attributes = tuple(rng.sample(product.attributes, n_attr))
    options = tuple((name, rng.choice(values)) for name, values in product.options)
    price_upper = price_upper_for(product.price, rng)
    type_text = product.query + (f" {suffix}" if suffix else "")
    opts = " and ".join(f"{v} {n}" for n, v in options)
    template = rng.choice(_TEMPLATES)
    attrs_text = _join(list(attributes))
    first = attrs_text if template.index("{attrs}") < template.index("{type}") else type_text
    text = template.format(
        art=_article(first),
        attrs=attrs_text,
        type=type_text,
        opts=f" in {opts}" if opts else "",
    )
    if price_upper < 1e6:
        text += f", and price lower than {price_upper:.2f} dollars"
    return Goal(
        instruction=text,
        asin=product.asin,
        name=product.name,
        category=product.category,
        query=product.query,
        product_category=product.product_category,
        attributes=attributes,
        options=options,
        price_upper=price_upper,
    )


def synthetic_catalog(
    seed: int = 0,
    num_products: int = 200,
    num_goals: int = 500,
    *,
    test_fraction: float = 0.1,
    split_seed: int = 233,
) -> Catalog:
    """Builds a deterministic synthetic catalog in WebShop's schema.

    Args:
      seed: int, seed of every draw (same seed, same catalog).
      num_products: int in [1, MAX_PRODUCTS]; product types cycle so that every type is present
        when ``num_products >= len(PRODUCT_TYPES)``.
      num_goals: int >= 0; goals cycle over a shuffled product order so that the targets spread over
        the catalog.
      test_fraction / split_seed: the goal split (see :class:`.catalog.Catalog`).

    Returns:
      Catalog with ``source == f"synthetic(seed={seed})"``.
    """
    if not 1 <= num_products <= MAX_PRODUCTS:
        raise ValueError(f"num_products must be in [1, {MAX_PRODUCTS}], got {num_products}")
    if num_goals < 0:
        raise ValueError(f"num_goals must be >= 0, got {num_goals}")
    rng = random.Random(seed)
    types = list(PRODUCT_TYPES)
    used_titles: set[str] = set()
    products = []
    order = []
    for i in range(num_products):
        if i % len(types) == 0:
            order = types[:]
            rng.shuffle(order)
        products.append(_make_product(rng, i, order[i % len(types)], used_titles))
    goals = []
    targets: list[int] = []
    for _ in range(num_goals):
        if not targets:
            targets = list(range(num_products))
            rng.shuffle(targets)
        goals.append(_make_goal(rng, products[targets.pop()]))
    return Catalog(
        products=tuple(products),
        goals=tuple(goals),
        test_fraction=test_fraction,
        split_seed=split_seed,
        source=f"synthetic(seed={seed})",
    )


def synthetic_vocabulary() -> set[str]:
    """Every word the synthetic catalog can produce (the tests check the tokenizer covers them)."""
    words: set[str] = set(BRANDS) | set(MODELS)
    phrases: list[str] = []
    for attrs in ATTRIBUTES.values():
        phrases += attrs
    for values in OPTION_VALUES.values():
        phrases += values
    for ptype, (_, crumb, option_kinds, _, suffix) in PRODUCT_TYPES.items():
        phrases += [ptype, crumb, suffix, *option_kinds]
    phrases += [t.replace("{a}", "") for t in _BULLETS] + list(_CLOSINGS)
    phrases += [t.format(art="a an", attrs="", type="", opts="") for t in _TEMPLATES]
    phrases += ["the is in and , and price lower than dollars"]
    for p in phrases:
        words.update(p.replace(".", " ").replace(",", " ").split())
    return words
