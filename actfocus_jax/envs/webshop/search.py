"""BM25 product search (WebShop searches a Lucene BM25 index through Pyserini; we use ``bm25s``).

Each product is indexed as one document: title, search query, breadcrumb, attributes, option values,
bullet points and description. Text is lowercased and split into alphanumeric words; English stopwords
are dropped. Ranking: BM25 score (Lucene variant, ``k1 = 1.5``, ``b = 0.75``), ties broken by catalog
order (deterministic); products with score 0 (no query word) are not returned.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import bm25s
import numpy as np

from actfocus_jax.envs.webshop.catalog import Product

__all__ = ["ProductSearch", "search_tokens"]

_STOPWORDS = frozenset(
    "a an the and or of for with in on to by from at as is are be it its this that i me my we you "
    "am need want looking find buy which who what price lower than dollars".split()
)


def search_tokens(text: str) -> list[str]:
    """Lowercase alphanumeric words of ``text`` minus stopwords (also the query analyzer)."""
    return [w for w in re.findall(r"[a-z0-9]+", str(text).lower()) if w not in _STOPWORDS]


def _document(p: Product) -> str:
    values = " ".join(v for _, vals in p.options for v in vals)
    return " ".join(
        [p.name, p.query, p.product_category, *p.attributes, values, *p.bullets, p.description]
    )


class ProductSearch:
    """A BM25 index over products.

    Args:
      products: Sequence[Product], indexed in this order (the tie-break order).
      k1, b: BM25 parameters.
    """

    def __init__(self, products: Sequence[Product], k1: float = 1.5, b: float = 0.75):
        self.asins = tuple(p.asin for p in products)
        corpus = [search_tokens(_document(p)) or ["<empty>"] for p in products]
        self._vocab = {w for doc in corpus for w in doc}
        self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        self._bm25.index(corpus, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """float32 BM25 scores ``[num_products]`` of ``query`` (0 for no query word)."""
        tokens = [t for t in search_tokens(query) if t in self._vocab]
        if not tokens:
            return np.zeros(len(self.asins), np.float32)
        return np.asarray(self._bm25.get_scores(tokens), np.float32)

    def search(self, query: str, k: int = 50) -> list[str]:
        """Asins of the top ``k`` products for ``query``, best first (ties: catalog order)."""
        s = self.scores(query)
        order = np.lexsort((np.arange(len(s)), -s))
        return [self.asins[i] for i in order[:k] if s[i] > 0]
