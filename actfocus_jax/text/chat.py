"""Prompt formats: ChatML (Qwen-style chat models) and plain (the embedded model).

A conversation is a list of ``(role, content)`` pairs with role in {"system", "user", "assistant"}.
``format_prompt`` renders it as text ending where the model's next response begins; the rollout engine
appends each observation with ``format_observation`` so that the token layout of DESIGN.md section 2
(``[prompt + obs_1] [response_1] [obs_2] [response_2] ...``) holds for both formats.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CHAT_FORMATS", "format_observation", "format_prompt"]

CHAT_FORMATS = ("plain", "chatml")
_ROLES = ("system", "user", "assistant")


def _check(fmt: str, messages: Sequence[tuple[str, str]]) -> None:
    if fmt not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}; choose one of {CHAT_FORMATS}")
    for role, _ in messages:
        if role not in _ROLES:
            raise ValueError(f"unknown message role {role!r}; use one of {_ROLES}")


def format_prompt(
    messages: Sequence[tuple[str, str]], fmt: str = "chatml", add_generation_prompt: bool = True
) -> str:
    """Renders ``messages``; with ``add_generation_prompt`` the text ends where the reply starts.

    ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
    ``<|im_start|>assistant\\n`` (the format of Qwen2.5's chat template).
    Plain: ``{content}\\n`` per message (roles are implicit), nothing appended.
    """
    _check(fmt, messages)
    if fmt == "plain":
        return "".join(f"{content}\n" for _, content in messages)
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def format_observation(observation: str, fmt: str = "chatml") -> str:
    """Text inserted between two responses: closes the assistant turn, adds a user turn."""
    _check(fmt, ())
    if fmt == "plain":
        return f"\n{observation}\n"
    return f"<|im_end|>\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n"
