"""Tokenizers and prompt formats."""

from actfocus_jax.text.tokenizer import (
    DEFAULT_TAGS,
    TextTokenizer,
    TokenizerError,
    build_embedded_tokenizer,
    load_tokenizer,
)

__all__ = [
    "DEFAULT_TAGS",
    "TextTokenizer",
    "TokenizerError",
    "build_embedded_tokenizer",
    "load_tokenizer",
]
