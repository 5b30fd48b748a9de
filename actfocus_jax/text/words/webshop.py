"""Words of the WebShop environment (synthetic catalog, pages, actions)."""

WORDS = ("search", "click", "buy", "now", "back", "to", "next", "prev", "page", "results")
