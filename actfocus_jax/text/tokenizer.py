"""Tokenizers: the embedded word-level tokenizer and Hugging Face ``tokenizer.json`` directories.

Both kinds are ``tokenizers.Tokenizer`` objects wrapped in :class:`TextTokenizer`, which adds the
special ids the rest of the code needs (pad / eos / bos) and the token sequences of the response tags
(``<think>``, ``</think>``, ``<answer>``, ``</answer>``, the action separator ``||``). With a BPE tokenizer
a tag may be several tokens; :meth:`TextTokenizer.tag_ids` returns the full sequence.

The embedded tokenizer (:func:`build_embedded_tokenizer`) is word-level: its vocabulary is the union of
the word lists in :mod:`actfocus_jax.text.words` plus special tokens, tags and the newline. Words are
separated by whitespace and punctuation; unknown words map to ``<unk>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from actfocus_jax.text.words import common, grid, webshop

__all__ = [
    "DEFAULT_TAGS",
    "SPECIAL_TOKENS",
    "TextTokenizer",
    "TokenizerError",
    "build_embedded_tokenizer",
    "embedded_vocabulary",
    "load_tokenizer",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IM_START, IM_END)

#: Response tags (DESIGN.md section 2) and the action separator; configurable per tokenizer.
DEFAULT_TAGS = {
    "think_open": "<think>",
    "think_close": "</think>",
    "answer_open": "<answer>",
    "answer_close": "</answer>",
    "action_sep": "||",
}
NEWLINE = "\n"
_ROLE_WORDS = ("system", "user", "assistant")


class TokenizerError(ValueError):
    """Raised for a missing, malformed or incompatible tokenizer."""


def embedded_vocabulary(extra_words: Iterable[str] = ()) -> list[str]:
    """Vocabulary of the embedded tokenizer, ids in list order.

    Special tokens come first (``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2, ``<eos>`` = 3), then the
    tags, the newline, and the words of every word list (deduplicated, first occurrence wins).
    """
    vocab: list[str] = []
    seen: set[str] = set()
    for word in (
        *SPECIAL_TOKENS,
        *DEFAULT_TAGS.values(),
        NEWLINE,
        *_ROLE_WORDS,
        *common.WORDS,
        *grid.WORDS,
        *webshop.WORDS,
        *extra_words,
    ):
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    return vocab


def build_embedded_tokenizer(extra_words: Iterable[str] = ()) -> TextTokenizer:
    """Builds the embedded word-level tokenizer (deterministic: same words, same ids)."""
    vocab = embedded_vocabulary(extra_words)
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in (*DEFAULT_TAGS.values(), NEWLINE)]
    )
    return TextTokenizer(tok, pad_token=PAD, eos_token=EOS, bos_token=BOS)


@dataclasses.dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special tokens and tags the project relies on.

    Attributes:
      tokenizer: the underlying Hugging Face ``tokenizers`` object.
      pad_token / eos_token / bos_token: special token strings (``bos_token`` may be None).
      tags: the response tags and action separator (keys as in :data:`DEFAULT_TAGS`).
      chat_template: ``"plain"`` for the embedded model, ``"chatml"`` for Qwen-style chat models.
    """

    tokenizer: tokenizers.Tokenizer
    pad_token: str
    eos_token: str
    bos_token: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TAGS))
    chat_template: str = "plain"

    def __post_init__(self) -> None:
        for name in ("pad_token", "eos_token", "bos_token"):
            token = getattr(self, name)
            if token is not None and self.tokenizer.token_to_id(token) is None:
                raise TokenizerError(
                    f"{name}={token!r} is not in the tokenizer's vocabulary; set it in "
                    "tokenizer_config.json to a token that exists."
                )

    @property
    def vocab_size(self) -> int:
        """Number of ids (including added tokens); the model's vocab must be at least this."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.token_to_id(self.pad_token)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.token_to_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def tag_ids(self, name: str) -> tuple[int, ...]:
        """Token-id sequence of a tag (``"answer_open"`` ...); several ids with a BPE tokenizer."""
        if name not in self.tags:
            raise TokenizerError(f"unknown tag {name!r}; known tags: {sorted(self.tags)}")
        ids = tuple(self.encode(self.tags[name]))
        if not ids:
            raise TokenizerError(f"tag {name}={self.tags[name]!r} encodes to no tokens")
        return ids

    def save(self, path: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into directory ``path``."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": self.pad_token,
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "unk_token": UNK if self.tokenizer.token_to_id(UNK) is not None else None,
            "actfocus_tags": self.tags,
            "actfocus_chat_template": self.chat_template,
        }
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def _token_str(value: object) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise TokenizerError(f"cannot read special token {value!r} from tokenizer_config.json")


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """Loads a tokenizer directory (``tokenizer.json`` + optional ``tokenizer_config.json``).

    Works for the embedded tokenizer and for Hugging Face tokenizers (e.g. Qwen2's BPE). Missing pad
    or eos tokens fall back to common choices (Qwen's ``<|endoftext|>`` / ``<|im_end|>``).
    """
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise TokenizerError(
            f"no tokenizer.json in {os.fspath(path)!r}; save one with TextTokenizer.save or copy "
            "the Hugging Face model's tokenizer.json there."
        )
    try:
        tok = tokenizers.Tokenizer.from_file(tok_file)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise TokenizerError(f"{tok_file} is not a valid tokenizers JSON file: {e}") from e
    config: dict = {}
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            config = json.load(f)

    def first_present(*candidates: str | None) -> str | None:
        for c in candidates:
            if c is not None and tok.token_to_id(c) is not None:
                return c
        return None

    eos = first_present(_token_str(config.get("eos_token")), EOS, IM_END, "<|endoftext|>", "</s>")
    pad = first_present(_token_str(config.get("pad_token")), PAD, "<|endoftext|>", eos)
    bos = first_present(_token_str(config.get("bos_token")))
    if eos is None or pad is None:
        raise TokenizerError(
            f"tokenizer in {os.fspath(path)!r} has no usable eos/pad token; set eos_token and "
            "pad_token in tokenizer_config.json"
        )
    chat = config.get("actfocus_chat_template")
    if chat is None:
        chat = (
            "chatml"
            if tok.token_to_id(IM_START) is not None and "chat_template" in config
            else "plain"
        )
    return TextTokenizer(
        tok,
        pad_token=pad,
        eos_token=eos,
        bos_token=bos,
        tags=dict(config.get("actfocus_tags", DEFAULT_TAGS)),
        chat_template=chat,
    )
