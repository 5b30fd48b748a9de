"""WebShop's purchase reward (Yao et al. 2022, section 3.1 and appendix; ``engine/goal.py``).

On ``buy now`` of product ``p`` with chosen options ``o`` for goal ``g``::

    r = (#matched goal attributes + #matched goal options + 1[price(p) <= g.price_upper])
        / (#goal attributes + #goal options + 1)
    r *= r_type

* **Attribute match** (WebShop's ``get_attribute_reward``): a goal attribute matches when its fuzzy
  token-set ratio with one of the product's attributes is > 85, or else when it occurs (lowercased
  substring) in the product's title, bullet points or description.
* **Option match** (``get_option_reward``): a goal option value matches when its token-set ratio with
  one of the chosen option values is > 85. WebShop first maps color names through its
  ``normalize_color`` table; we do not (the synthetic catalog uses plain color names).
* **Price**: ``price(p) <= price_upper`` counts as one more match.
* **Type factor** ``r_type`` (``get_type_reward``): ``query_match`` (same search query),
  ``category_match`` (the breadcrumbs share >= 2 parts), ``title_score`` = share of the goal title's
  type words (nouns) present in the bought title (0.2 when the goal title has none). Then
  ``r_type = 1``; ``0.5`` when none of query_match / category_match / title_score > 0.2 holds;
  ``0.1`` when title_score < 0.1; ``0.0`` when title_score == 0 (later rules override earlier ones,
  as in WebShop's code).

WebShop extracts the title's nouns with spaCy's part-of-speech tagger. We have no tagger: the default
:func:`title_terms` keeps the lowercase alphanumeric words of the title minus stopwords, numbers and
a lexicon of common non-noun words (colors, sizes, adjectives -- including every adjective of the
synthetic catalog). Pass ``type_words=`` (e.g. a spaCy-based function) to use a real tagger.

The fuzzy match is our own implementation of the token-set ratio of ``thefuzz``/``rapidfuzz``
(lowercase, non-alphanumerics to spaces; ratio = 100 * 2 * LCS / total length, the normalized Indel
similarity; 100 when one token set contains the other and they intersect).

"Strict success" = reward == 1 (all attributes, options, price and full type match).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence

from actfocus_jax.envs.webshop.catalog import Goal, Product

__all__ = [
    "FUZZY_THRESHOLD",
    "RewardInfo",
    "attribute_matches",
    "fuzzy_ratio",
    "option_matches",
    "purchase_reward",
    "title_terms",
    "token_set_ratio",
    "type_reward",
]

#: WebShop counts a fuzzy match when the token-set ratio is strictly above 85.
FUZZY_THRESHOLD = 85.0

_STOPWORDS = frozenset(
    "a an the and or of for with in on to by from at as is are be it its this that these those "
    "i me my we our you your he she they them his her their not no yes so too very can will "
    "which who whom what when where how all any both each few more most other some such only "
    "own same than then there here up down out over under again further once pack piece pcs "
    "set count ounce oz inch inches feet ft lb lbs x".split()
)

_NON_NOUNS = frozenset(
    # colors
    "black white red blue green gray grey pink navy brown beige purple yellow orange silver gold "
    "light dark clear multi multicolor "
    # sizes
    "small medium large xl xxl xs mini big little long short tall wide "
    # common adjectives (including all adjectives of the synthetic catalog)
    "new best premium classic deluxe pro plus max lite original high low soft quick slim relaxed "
    "water resistant waterproof breathable washable natural sensitive easy free fast wireless "
    "noise cancelling compact solid heavy duty mid non ready organic vegan moisturizing sugar "
    "gluten caffeine paraben cruelty fragrance keto friendly individually wrapped saving "
    "lasting fit sleeve waist living durable portable adjustable lightweight comfortable "
    "modern cute great good perfect".split()
)


def _process(s: str) -> str:
    """thefuzz's default processing: lowercase, non-alphanumerics to spaces, trimmed."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(s).lower()).split())


def _lcs(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def fuzzy_ratio(a: str, b: str) -> float:
    """Normalized Indel similarity in [0, 100]: ``100 * 2 * LCS(a, b) / (len(a) + len(b))``."""
    total = len(a) + len(b)
    if total == 0:
        return 100.0
    return 100.0 * 2 * _lcs(a, b) / total


def token_set_ratio(a: str, b: str) -> float:
    """Token-set ratio (as ``thefuzz.fuzz.token_set_ratio``), in [0, 100].

    Compares the sorted token intersection ``t0`` with ``t0 + rest of a`` and ``t0 + rest of b``;
    returns the best of the three pairwise ratios; 0 when either side is empty after processing.
    """
    ta, tb = set(_process(a).split()), set(_process(b).split())
    if not ta or not tb:
        return 0.0
    inter = sorted(ta & tb)
    da, db = sorted(ta - tb), sorted(tb - ta)
    if inter and (not da or not db):
        return 100.0
    t0 = " ".join(inter)
    t1 = " ".join([*inter, *da])
    t2 = " ".join([*inter, *db])
    return (
        max(fuzzy_ratio(t0, t1), fuzzy_ratio(t0, t2), fuzzy_ratio(t1, t2))
        if t0
        else fuzzy_ratio(t1, t2)
    )


def title_terms(title: str) -> list[str]:
    """Approximate type words (nouns) of a title: content words minus a non-noun lexicon."""
    words = re.findall(r"[a-z0-9]+", str(title).lower())
    return [
        w
        for w in words
        if w not in _STOPWORDS and w not in _NON_NOUNS and not w.isdigit() and len(w) > 1
    ]


def type_reward(
    product: Product, goal: Goal, type_words: Callable[[str], Sequence[str]] = title_terms
) -> dict:
    """WebShop's type factor. Returns ``{"r_type", "query_match", "category_match", "title_score"}``."""
    query_match = (
        bool(product.query) and product.query.strip().lower() == goal.query.strip().lower()
    )
    pc = {x.strip() for x in product.product_category.split("›") if x.strip()}
    gc = {x.strip() for x in goal.product_category.split("›") if x.strip()}
    category_match = len(pc & gc) >= 2
    bought = {w.lower() for w in type_words(product.name)}
    desired = [w.lower() for w in type_words(goal.name)]
    if not desired:
        title_score = 0.2
    else:
        title_score = len(bought & set(desired)) / len(desired)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return {
        "r_type": r_type,
        "query_match": query_match,
        "category_match": category_match,
        "title_score": title_score,
    }


def attribute_matches(product: Product, goal_attributes: Iterable[str]) -> int:
    """Number of goal attributes found in the product (fuzzy in attributes, else substring in text)."""
    title = product.name.lower()
    bullets = " ".join(product.bullets).lower()
    desc = product.description.lower()
    n = 0
    for g in goal_attributes:
        if any(token_set_ratio(p, g) > FUZZY_THRESHOLD for p in product.attributes):
            n += 1
        elif g.lower() in title or g.lower() in bullets or g.lower() in desc:
            n += 1
    return n


def option_matches(chosen_values: Iterable[str], goal_values: Iterable[str]) -> int:
    """Number of goal option values fuzzily matched by one of the chosen values."""
    chosen = list(chosen_values)
    return sum(
        1 for g in goal_values if any(token_set_ratio(c, g) > FUZZY_THRESHOLD for c in chosen)
    )


@dataclasses.dataclass(frozen=True)
class RewardInfo:
    """Breakdown of a purchase reward.

    Attributes:
      reward: float in [0, 1].
      success: bool, strict success (reward == 1).
      num_attributes / num_attribute_matches / num_options / num_option_matches: int.
      price_ok: bool. r_type: float in {0, 0.1, 0.5, 1}. query_match / category_match: bool.
      title_score: float.
    """

    reward: float
    success: bool
    num_attributes: int
    num_attribute_matches: int
    num_options: int
    num_option_matches: int
    price_ok: bool
    r_type: float
    query_match: bool
    category_match: bool
    title_score: float

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


def purchase_reward(
    product: Product,
    goal: Goal,
    chosen_options: dict[str, str] | Sequence[str],
    *,
    price: float | None = None,
    type_words: Callable[[str], Sequence[str]] = title_terms,
) -> RewardInfo:
    """WebShop's reward for buying ``product`` with ``chosen_options`` (dict name -> value, or values).

    Args:
      product: the bought product.
      goal: the goal.
      chosen_options: the selected option values (unselected options simply do not match).
      price: the paid price; default ``product.price``.
      type_words: title -> type words for the type factor (default :func:`title_terms`).

    Returns:
      RewardInfo (``reward`` is the float reward).
    """
    values = (
        list(chosen_options.values()) if isinstance(chosen_options, dict) else list(chosen_options)
    )
    price = product.price if price is None else price
    n_attr = attribute_matches(product, goal.attributes)
    n_opt = option_matches(values, goal.option_values)
    price_ok = bool(price <= goal.price_upper) if goal.price_upper > 0 else False
    t = type_reward(product, goal, type_words)
    denom = len(goal.attributes) + len(goal.options) + 1
    reward = (n_attr + n_opt + int(price_ok)) / denom * t["r_type"]
    return RewardInfo(
        reward=reward,
        success=reward == 1.0,
        num_attributes=len(goal.attributes),
        num_attribute_matches=n_attr,
        num_options=len(goal.options),
        num_option_matches=n_opt,
        price_ok=price_ok,
        r_type=t["r_type"],
        query_match=t["query_match"],
        category_match=t["category_match"],
        title_score=t["title_score"],
    )
