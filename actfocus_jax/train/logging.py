"""Metrics logging for the trainer: JSONL + TensorBoard + a console progress bar, and end-of-run
summaries (a plain-text table and learning-curve plots).

Files in the work directory:

- ``metrics.jsonl``: one JSON object per logged step: ``{"step": 12, "time": <unix seconds>,
  "train/loss": ..., "actfocus/action_mass_frac": ..., "eval/success": ...}``. Several calls of
  :meth:`MetricsLogger.log` with the same step are merged into one record (written when a later step
  is logged, at :meth:`MetricsLogger.flush` or at :meth:`MetricsLogger.close`).
- ``tb/``: TensorBoard event files (``tensorboardX``).
- ``summary.txt`` / ``curves.png``: written by :meth:`MetricsLogger.write_report`.

Resuming: ``MetricsLogger(workdir, resume_step=N)`` drops the records with ``step > N`` from
``metrics.jsonl`` (they belong to the part of the interrupted run that is recomputed) and appends after
them, so the log of a resumed run equals the log of an uninterrupted one; TensorBoard hides the events
of steps > N (``purge_step``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "METRICS_FILE",
    "MetricsLogger",
    "flatten_metrics",
    "plot_curves",
    "read_metrics",
    "summary_table",
]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
RESERVED = ("step", "time")
DEFAULT_POSTFIX = (
    "train/loss",
    "train/reward",
    "eval/success",
    "actfocus/action_mass_frac",
)
_MIN_WORDS = ("loss", "kl", "error", "invalid", "penalty", "clip_frac", "time")


# ---------------------------------------------------------------------------------- flattening
def _scalar(x: Any) -> float | None:
    """``x`` as a float if it is a scalar (Python number, NumPy / JAX array of size 1), else None."""
    if isinstance(x, bool | int | float | np.bool_ | np.number):
        return float(x)
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None or int(np.prod(shape)) != 1:
        return None
    try:
        kind = np.dtype(dtype).kind
    except TypeError:  # PRNG key dtypes and other extended dtypes
        return None
    if kind not in "biuf":
        return None
    return float(np.asarray(x).reshape(()))


def _children(tree: Any) -> Iterable[tuple[str, Any]] | None:
    if isinstance(tree, Mapping):
        return ((str(k), v) for k, v in tree.items())
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return ((f.name, getattr(tree, f.name)) for f in dataclasses.fields(tree))
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple
        return zip(tree._fields, tree)
    if isinstance(tree, list | tuple):
        return ((str(i), v) for i, v in enumerate(tree))
    return None


def flatten_metrics(tree: Any, prefix: str = "") -> dict[str, float]:
    """Flat ``{"prefix/a/b": float}`` from nested dicts / (chex) dataclasses / NamedTuples / lists.

    Scalars (Python numbers, 0-d or size-1 NumPy / JAX arrays) become floats; non-scalar arrays,
    strings, None and other leaves are skipped. Device arrays are fetched with one
    ``jax.device_get`` call.
    """
    found: list[tuple[str, Any]] = []

    def walk(node: Any, name: str) -> None:
        kids = _children(node)
        if kids is not None:
            for k, v in kids:
                walk(v, f"{name}/{k}" if name else k)
        elif node is not None and not isinstance(node, str | bytes):
            found.append((name or "value", node))

    walk(tree, prefix.strip("/"))
    values = [v for _, v in found]
    jax = sys.modules.get("jax")
    if jax is not None and any(isinstance(v, jax.Array) for v in values):
        values = jax.device_get(values)
    out: dict[str, float] = {}
    for (name, _), v in zip(found, values):
        s = _scalar(v)
        if s is not None:
            out[name] = s
    return out


# ---------------------------------------------------------------------------------- JSONL I/O
def _jsonable(x: float) -> float | None:
    return x if math.isfinite(x) else None


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` (a torn last line, from a crash, is skipped)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for i, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: skipping unparsable line %d", path, i + 1)
    return records


def _truncate_jsonl(path: Path, max_step: int) -> int:
    """Keep the records with ``step <= max_step`` (atomic rewrite); return how many were dropped."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            s = line.strip()
            if not s:
                continue
            try:
                rec = json.loads(s)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if rec.get("step", -math.inf) <= max_step:
                keep.append(s)
            else:
                dropped += 1
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(k + "\n" for k in keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped


# ---------------------------------------------------------------------------------- the logger
class MetricsLogger:
    """Logs scalar metrics per step to ``metrics.jsonl``, TensorBoard and a tqdm progress bar.

    Args:
      workdir: the run's work directory (created if missing).
      use_tensorboard: write TensorBoard event files under ``workdir/tb``.
      console: show a tqdm progress bar (on stderr) with a few key numbers.
      total_steps: length of the progress bar (None: no total).
      resume_step: resuming from the checkpoint at this step: records with ``step > resume_step``
        are dropped and new ones appended. None: a fresh run; an existing ``metrics.jsonl`` is
        replaced (a warning is logged).
      postfix_keys: metric names shown in the progress bar (those present).
      enabled: write anything at all (default: only on JAX process 0 in multi-host runs).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        use_tensorboard: bool = True,
        console: bool = True,
        total_steps: int | None = None,
        resume_step: int | None = None,
        postfix_keys: Sequence[str] = DEFAULT_POSTFIX,
        enabled: bool | None = None,
    ):
        if enabled is None:
            jax = sys.modules.get("jax")
            enabled = jax is None or jax.process_index() == 0
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.postfix_keys = tuple(postfix_keys)
        self._pending: dict[str, Any] | None = None
        self._last_step = resume_step
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            if self.path.exists() and self.path.stat().st_size > 0:
                log.warning("fresh run: replacing the existing %s", self.path)
            mode = "w"
        else:
            dropped = _truncate_jsonl(self.path, int(resume_step))
            if dropped:
                log.info("resume at step %d: dropped %d newer records", resume_step, dropped)
            mode = "a"
        self._file = open(self.path, mode)
        if use_tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = SummaryWriter(str(self.workdir / TB_DIR), purge_step=purge)
        if console:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=int(resume_step or 0),
                dynamic_ncols=True,
                unit="step",
                file=sys.stderr,
            )

    # ------------------------------------------------------------------------------------ log
    def log(self, step: int, metrics: Any, *, prefix: str = "") -> dict[str, float]:
        """Log the scalars of ``metrics`` (a flat dict, or any tree :func:`flatten_metrics` takes).

        Several calls with the same step merge into one record. Steps must not decrease: metrics
        of a step older than the last one (or of a step already written, e.g. the resume step) are
        ignored with a warning. Returns the flat metrics of this call.
        """
        step = int(step)
        flat = flatten_metrics(metrics, prefix)
        if not self.enabled:
            return flat
        last = self._pending["step"] if self._pending is not None else self._last_step
        if self._pending is not None and step > self._pending["step"]:
            self._write_pending()
        elif last is not None and (step < last or (self._pending is None and step == last)):
            log.warning("ignoring metrics of step %d: step %d is already logged", step, last)
            return flat
        if self._pending is None:
            self._pending = {"step": step, "time": time.time()}
        for k in RESERVED:
            flat.pop(k, None)
        self._pending.update(flat)
        if self._tb is not None:
            for k, v in flat.items():
                self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            shown = {
                k.split("/")[-1]: f"{self._pending[k]:.4g}"
                for k in self.postfix_keys
                if k in self._pending
            }
            if shown:
                self._bar.set_postfix(shown, refresh=False)
        return flat

    def _write_pending(self) -> None:
        if self._pending is None or self._file is None:
            return
        rec = {k: (_jsonable(v) if isinstance(v, float) else v) for k, v in self._pending.items()}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        self._last_step = self._pending["step"]
        self._pending = None

    def flush(self) -> None:
        """Write the pending record and flush all outputs."""
        self._write_pending()
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=sys.stderr)

    def write_report(
        self,
        keys: Sequence[str],
        *,
        modes: Mapping[str, str] | None = None,
        plot_name: str = "curves.png",
        smooth: float = 0.0,
    ) -> str:
        """Write ``summary.txt`` (see :func:`summary_table`) and the learning curves (PNG) of ``keys``
        into the work directory; return the table."""
        self.flush()
        records = read_metrics(self.workdir)
        table = summary_table(records, keys, modes=modes)
        if self.enabled:
            (self.workdir / "summary.txt").write_text(table + "\n")
            plot_curves(records, keys, self.workdir / plot_name, smooth=smooth)
        return table

    def close(self) -> None:
        """Flush and close all outputs."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------- summaries
def _mode(key: str, modes: Mapping[str, str] | None) -> str:
    if modes and key in modes:
        if modes[key] not in ("min", "max"):
            raise ValueError(f"mode of {key!r} must be 'min' or 'max', got {modes[key]!r}")
        return modes[key]
    name = key.lower().split("/")[-1]
    return "min" if any(w in name for w in _MIN_WORDS) else "max"


def _series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [
        (r["step"], float(r[key]))
        for r in records
        if key in r and r[key] is not None and "step" in r
    ]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts)
    return np.asarray(steps, float), np.asarray(vals, float)


def summary_table(
    records: Sequence[Mapping], keys: Sequence[str], *, modes: Mapping[str, str] | None = None
) -> str:
    """A plain-text table: per key the final value (and its step), the best value (and its step),
    and the number of points. "Best" is the minimum for keys whose last part contains loss / kl /
    error / invalid / penalty / clip_frac / time and the maximum otherwise; ``modes`` overrides it
    (``{"eval/return": "max"}``)."""
    header = ("metric", "final", "@step", "best", "@step", "mode", "n")
    rows = [header]
    for key in keys:
        steps, vals = _series(records, key)
        mode = _mode(key, modes)
        finite = np.isfinite(vals)
        if not finite.any():
            rows.append((key, "-", "-", "-", "-", mode, str(len(vals))))
            continue
        i_best = int(
            np.nanargmin(np.where(finite, vals, np.nan))
            if mode == "min"
            else np.nanargmax(np.where(finite, vals, np.nan))
        )
        rows.append(
            (
                key,
                f"{vals[-1]:.6g}",
                f"{int(steps[-1])}",
                f"{vals[i_best]:.6g}",
                f"{int(steps[i_best])}",
                mode,
                str(len(vals)),
            )
        )
    widths = [max(len(r[j]) for r in rows) for j in range(len(header))]

    def fmt(row):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    return "\n".join(lines)


def _ema(values: np.ndarray, smooth: float) -> np.ndarray:
    if smooth <= 0 or len(values) == 0:
        return values
    out = np.empty_like(values)
    acc = values[0]
    for i, v in enumerate(values):
        acc = smooth * acc + (1 - smooth) * v
        out[i] = acc
    return out


def plot_curves(
    records: Sequence[Mapping],
    keys: Sequence[str],
    path: str | os.PathLike,
    *,
    smooth: float = 0.0,
    title: str | None = None,
) -> Path:
    """Learning curves of ``keys`` vs step, one subplot per key, saved as a PNG at ``path``.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). ``smooth`` in
    [0, 1) adds an exponential moving average over the raw curve. A key without data gets an empty
    subplot saying so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(keys)
    if not keys:
        raise ValueError("plot_curves needs at least one key")
    n = len(keys)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        key = keys[i]
        steps, vals = _series(records, key)
        if len(steps):
            if smooth > 0:
                ax.plot(steps, vals, alpha=0.3, color="C0", linewidth=1)
                ax.plot(steps, _ema(vals, smooth), color="C0", linewidth=1.5)
            else:
                ax.plot(
                    steps, vals, color="C0", linewidth=1.5, marker="." if len(steps) < 30 else None
                )
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
