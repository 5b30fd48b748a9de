"""Environments (DESIGN.md section 6): a registry of lazily imported env modules and :func:`make`.

``make(name, tokenizer=None, **options)`` imports the env's module on first use (so importing
``actfocus_jax.envs`` stays cheap) and constructs its class with ``**options``:

=============  ==================================  ==================
name           module                              class
=============  ==================================  ==================
``sokoban``    ``actfocus_jax.envs.sokoban``       ``SokobanEnv``
``frozenlake`` ``actfocus_jax.envs.frozenlake``    ``FrozenLakeEnv``
``sudoku``     ``actfocus_jax.envs.sudoku``        ``SudokuEnv``
``webshop``    ``actfocus_jax.envs.webshop``       ``WebShopEnv``
=============  ==================================  ==================

A module may instead define ``ENV_CLASS`` (preferred over the class name above). The JAX envs share
the API of :mod:`actfocus_jax.envs.base`; ``webshop`` is a host (Python) env with its own API.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

__all__ = ["JAX_ENVS", "env_class", "list_envs", "make", "option_defaults", "register"]

_REGISTRY: dict[str, tuple[str, str]] = {
    "sokoban": ("actfocus_jax.envs.sokoban", "SokobanEnv"),
    "frozenlake": ("actfocus_jax.envs.frozenlake", "FrozenLakeEnv"),
    "sudoku": ("actfocus_jax.envs.sudoku", "SudokuEnv"),
    "webshop": ("actfocus_jax.envs.webshop", "WebShopEnv"),
}

#: Names of the pure-JAX envs (jit/vmap-able ``reset``/``step``).
JAX_ENVS = ("sokoban", "frozenlake", "sudoku")


def register(name: str, module: str, class_name: str) -> None:
    """Adds (or replaces) an env: ``make(name)`` will import ``module`` and build ``class_name``."""
    _REGISTRY[name] = (module, class_name)


def list_envs() -> tuple[str, ...]:
    """Registered env names."""
    return tuple(_REGISTRY)


def env_class(name: str) -> type:
    """The class registered under ``name`` (imports its module)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown environment {name!r}; known environments: {sorted(_REGISTRY)}")
    module_name, class_name = _REGISTRY[name]
    module = importlib.import_module(module_name)
    cls = getattr(module, "ENV_CLASS", None) or getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"module {module_name} defines neither ENV_CLASS nor {class_name}")
    return cls


def make(name: str, tokenizer: Any = None, **options: Any) -> Any:
    """Builds the environment ``name`` with ``**options``.

    Args:
      name: one of :func:`list_envs` ("sokoban", "frozenlake", "sudoku", "webshop").
      tokenizer: a :class:`actfocus_jax.text.TextTokenizer`; None lets the env use the embedded one
        (it is then not passed at all, so envs without a tokenizer argument work too).
      **options: env-specific configuration (see each env's docstring).

    Raises:
      ValueError: for an unknown name (the message lists the known names).
    """
    cls = env_class(name)
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
    return cls(**options)


#: Constructor arguments that are not env options (objects, or set elsewhere in the config).
_NOT_OPTIONS = ("self", "tokenizer", "catalog")
_SCALARS = (bool, int, float, str, tuple)


def option_defaults(name: str) -> dict[str, tuple[Any, type]]:
    """``{option: (default, type)}`` of the env's keyword options, from its constructor signature.

    Only options with a scalar or tuple default, or a ``None`` default annotated ``int | None`` /
    ``float | None`` / ``str | None`` (then ``default`` is None and ``type`` the annotated type), are
    listed: these are the ones a config can hold and a command line can override
    (``--config.env.options.step_penalty=0``).
    """
    out: dict[str, tuple[Any, type]] = {}
    for p in inspect.signature(env_class(name).__init__).parameters.values():
        if p.name in _NOT_OPTIONS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is p.empty:
            continue
        if p.default is None:
            ann = str(p.annotation).replace(" ", "")
            for t in (int, float, str):
                if ann == f"{t.__name__}|None":
                    out[p.name] = (None, t)
            continue
        if isinstance(p.default, _SCALARS):
            out[p.name] = (p.default, type(p.default))
    return out
