"""Grids of config overrides (``experiments.sweep --grid``), without absl flags so that tests and
other tools can import them.

``"a=1,2;b=x"`` is a product grid: every combination of the fields' values; ``"g1|g2"`` is the union
of grids ``g1`` and ``g2`` in order (a one-factor-at-a-time ablation: ``"alpha=0,0.3|beta=0"``),
each combination once. Every combination is run once per seed.
"""

from __future__ import annotations

import itertools

__all__ = ["expand", "parse_grid", "runs"]


def parse_grid(spec: str) -> list[tuple[str, list[str]]]:
    """``'a=1,2;b=x'`` -> ``[("a", ["1", "2"]), ("b", ["x"])]`` (raises on malformed input)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        if "=" not in part:
            raise ValueError(f"grid entry {part!r} must look like field=v1,v2")
        field, values = part.split("=", 1)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ValueError(f"grid entry {part!r} has no values")
        out.append((field.strip(), vals))
    return out


def runs(grid: list[tuple[str, list[str]]], seeds: list[str]) -> list[dict[str, str]]:
    """Every combination of the grid values and seeds, as ``{field: value}`` dicts."""
    fields = [f for f, _ in grid]
    combos = itertools.product(*(v for _, v in grid)) if grid else [()]
    return [dict(zip(fields, combo), seed=seed) for combo in combos for seed in seeds]


def expand(spec: str, seeds: list[str]) -> list[dict[str, str]]:
    """The runs of a union of grids ``'g1|g2|...'``, in order, each combination once."""
    out: list[dict[str, str]] = []
    for part in spec.split("|") if spec.strip() else [""]:
        if spec.strip() and not part.strip():
            raise ValueError(f"grid {spec!r} has an empty alternative between '|'")
        for run in runs(parse_grid(part), seeds):
            if run not in out:
                out.append(run)
    return out
