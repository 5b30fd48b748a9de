"""The package's public names: every module's ``__all__`` is complete, resolvable and free of repeats
(its order is ruff's RUF022, run by the README's test command).

``__all__`` is what ``from module import *``, the docs and a researcher's tab completion see. A
public (not underscore-prefixed) function or class defined in a module but missing from its
``__all__`` is either an export that was forgotten or a helper that should be private; this test
makes the choice explicit. It parses each module (for what it defines) and imports it (for its
runtime ``__all__``, which may be computed, as in ``actfocus_jax.train``).
"""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import actfocus_jax

PACKAGE_DIR = pathlib.Path(actfocus_jax.__file__).parent


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def _public_definitions(module) -> set[str]:
    """Public functions and classes defined at the top level of ``module``'s source."""
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {n.name for n in tree.body if isinstance(n, kinds) and not n.name.startswith("_")}


MODULES = _module_names()


def test_the_package_has_modules():
    # Guards the parametrisation below against an empty walk (then it would check nothing).
    assert len(MODULES) > 30
    assert "actfocus_jax.analysis.results" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_every_public_definition(name):
    module = importlib.import_module(name)
    defined = _public_definitions(module)
    exported = getattr(module, "__all__", None)
    if exported is None:
        assert not defined, f"{name} defines public {sorted(defined)} but has no __all__"
        return
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
    missing = sorted(defined - set(exported))
    assert not missing, (
        f"{name} defines public {missing} but its __all__ does not list them: add them to "
        "__all__, or prefix them with '_' if they are internal"
    )
    unresolved = sorted(n for n in exported if not hasattr(module, n))
    assert not unresolved, f"{name}.__all__ lists {unresolved}, which the module does not bind"
