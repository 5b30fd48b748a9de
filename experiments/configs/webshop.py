"""Config for webshop; the argument after ':' picks the model preset (default: tiny)."""

from experiments.configs.base import get_base_config


def get_config(model: str = "tiny"):
    c = get_base_config("webshop", model or "tiny")
    return c
