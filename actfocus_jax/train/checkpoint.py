"""Training checkpoints with Orbax: train state, RNG, data position and config, atomically.

Layout of a work directory (``Checkpointer(workdir)``)::

    workdir/checkpoints/<step>/state/    the train-state arrays (Orbax OCDBT / tensorstore)
    workdir/checkpoints/<step>/meta/     JSON: layout of the state tree, RNG key data, data position,
                                         metrics, optional checksums
    workdir/checkpoints/<step>/config/   JSON: the run's config

**Atomicity.** Orbax writes every checkpoint into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` only once all items (state, meta, config) are on disk (``AtomicRenameTemporaryPath``; on
object stores without atomic rename it writes ``commit_success.txt`` last instead). A process killed in
the middle of a save therefore leaves a ``*.orbax-checkpoint-tmp`` directory that is never listed as a
step: :meth:`Checkpointer.latest_step` ignores it, the previous checkpoints stay usable, and the next
:class:`Checkpointer` opened on the directory deletes it (``cleanup_tmp_directories=True``).
``tests/test_checkpoint.py`` checks this by killing a process in the middle of a large save.

**Asynchronous saves.** With ``async_save=True`` (the default) :meth:`Checkpointer.save` returns once
the arrays are copied to host memory; the files are written in a background thread. The train state may
be donated to the next jitted step right after ``save`` returns. Call :meth:`wait_until_finished`
before reading the files, and :meth:`close` at the end of the run.

**PRNG keys.** Typed keys (``jax.random.key``) anywhere in the train state, and the ``rng_key``
argument, are stored as their raw ``uint32`` key data (``jax.random.key_data``) together with the name
of their implementation, and re-wrapped with ``jax.random.wrap_key_data`` on restore. Raw ``uint32``
keys (``jax.random.PRNGKey``) are stored as they are.

**Restoring.** :meth:`Checkpointer.restore` takes a ``target``: the train state of the current run, as
arrays or as ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``), possibly sharded. The restored state
has the target's tree structure, dtypes and shardings (a sharded target restores sharded, each host
reading only its shards) and is bitwise equal to what was saved. Before any array is read, the target
is checked against the saved layout, and a mismatch (another model size, another optimiser) raises
:class:`CheckpointIncompatibleError` naming the first mismatching path and both shapes.

Errors (all :class:`CheckpointError`) say what is wrong and how to fix it:

- :class:`CheckpointNotFoundError`: missing work directory / no checkpoint / unknown step;
- :class:`CheckpointCorruptedError`: files missing, truncated or unparsable, or a checksum mismatch;
  :meth:`Checkpointer.restore_latest_good` then falls back to the newest earlier checkpoint that
  restores;
- :class:`CheckpointIncompatibleError`: tree structure / shape / dtype differs from the target;
- :class:`ConfigMismatchError`: config keys that must match on resume differ.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointIncompatibleError",
    "CheckpointNotFoundError",
    "Checkpointer",
    "ConfigMismatchError",
    "Restored",
    "check_config",
    "to_jsonable",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ITEMS = ("state", "meta", "config")
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read, or used for the current run."""


class CheckpointNotFoundError(CheckpointError):
    """No work directory / no checkpoint / no checkpoint at the requested step."""


class CheckpointCorruptedError(CheckpointError):
    """A checkpoint whose files are missing, truncated or unparsable (or fail their checksums)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class CheckpointIncompatibleError(CheckpointError):
    """A readable checkpoint whose tree structure, shapes or dtypes differ from the target."""


class ConfigMismatchError(CheckpointError):
    """Config keys that must match on resume differ between the checkpoint and the current run."""


@dataclasses.dataclass
class Restored:
    """What :meth:`Checkpointer.restore` returns.

    Attributes:
      step: the restored step.
      train_state: the state, with the target's structure / dtypes / shardings (a nested dict of
        arrays, key leaves as raw key data, when no target was given).
      rng_key: the saved RNG key (typed if a typed key was saved), or None if none was saved.
      data_position: the saved data-iterator position (a JSON dict).
      config: the saved config (a JSON dict).
      metrics: the metrics saved with the checkpoint (a JSON dict, possibly empty).
      skipped: steps newer than ``step`` that :meth:`Checkpointer.restore_latest_good` skipped
        because they were corrupted.
    """

    step: int
    train_state: Any
    rng_key: Any
    data_position: dict
    config: dict
    metrics: dict
    skipped: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------- helpers
def to_jsonable(obj: Any) -> Any:
    """``obj`` as JSON-able Python: dataclasses and mappings -> dicts, sequences -> lists,
    NumPy / JAX scalars -> Python numbers, arrays -> nested lists, paths / enums / other -> ``str``."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.name
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | jax.Array):
        a = np.asarray(jax.device_get(obj))
        return a.item() if a.ndim == 0 else a.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _get_dotted(d: Any, key: str) -> Any:
    cur = d
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def check_config(saved: Mapping, current: Any, keys: Iterable[str]) -> None:
    """Raise :class:`ConfigMismatchError` if a dotted key (``"model.d_model"``) differs.

    ``current`` is converted with :func:`to_jsonable` first, so a dataclass config compares with the
    JSON that was saved. A key absent on either side counts as a mismatch.
    """
    cur = to_jsonable(current)
    for key in keys:
        a, b = _get_dotted(saved, key), _get_dotted(cur, key)
        if a is _MISSING or b is _MISSING or a != b:
            raise ConfigMismatchError(
                f"config mismatch on resume: {key!r} is {a!r} in the checkpoint but {b!r} in the "
                f"current run. Fix: resume with the checkpoint's value ({key}={a!r}), or start a "
                f"fresh run in a new work directory."
            )


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _component(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flatten(tree: Any):
    """``(entries, treedef)``, entries ``(path_str, components, leaf)`` in flatten order."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    entries = [
        (jax.tree_util.keystr(path) or "<root>", tuple(_component(k) for k in path) or ("_",), leaf)
        for path, leaf in flat
    ]
    return entries, treedef


def _nest(entries: Sequence[tuple[str, tuple[str, ...], Any]]) -> dict:
    """A nested dict of plain string keys (what Orbax stores best) from flattened entries."""
    root: dict = {}
    seen: dict[str, str] = {}
    for path_str, comps, value in entries:
        name = ".".join(comps)
        if name in seen:
            raise CheckpointError(
                f"tree paths {seen[name]} and {path_str} map to the same checkpoint name {name!r}. "
                "Fix: rename one of the keys."
            )
        seen[name] = path_str
        node = root
        for c in comps[:-1]:
            nxt = node.setdefault(c, {})
            if not isinstance(nxt, dict):
                raise CheckpointError(f"tree path {path_str} clashes with a leaf at {c!r}")
            node = nxt
        node[comps[-1]] = value
    return root


def _lookup(nested: Mapping, comps: tuple[str, ...]) -> Any:
    node = nested
    for c in comps:
        node = node[c]
    return node


def _leaf_info(leaf: Any) -> dict:
    if _is_key(leaf):
        impl = None
        if isinstance(leaf, jax.Array):
            impl = str(jax.random.key_impl(leaf))
        return {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "key_impl": impl}
    if not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    return {"shape": list(np.shape(leaf)), "dtype": str(np.dtype(leaf.dtype)), "key_impl": None}


def _checksum(x: Any) -> int | None:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    return zlib.crc32(a.view(np.uint8).reshape(-1).data) if a.size else 0


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """Restore spec of one target leaf (key leaves: the spec of their key data)."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or not isinstance(sharding, jax.sharding.Sharding):
        sharding = _default_sharding()
    if _is_key(leaf):
        sds = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        return jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=sharding)


def _fmt_shape(info: Mapping) -> str:
    return f"{tuple(info['shape'])} {info['dtype']}"


def _compare_layout(
    saved: Sequence[Mapping], target_entries: Sequence[tuple], step: int, where: str
) -> None:
    """Raise :class:`CheckpointIncompatibleError` at the first structural / shape / dtype mismatch."""
    saved_by_path = {e["path"]: e for e in saved}
    target_paths = [p for p, _, _ in target_entries]
    fix = (
        "Fix: build the target from the same model config and optimiser as the run that wrote the "
        f"checkpoint (see {where}/config), or start a fresh run in a new work directory."
    )
    for path, _, leaf in target_entries:
        if path not in saved_by_path:
            raise CheckpointIncompatibleError(
                f"checkpoint step {step} at {where} is incompatible with the target: the target has "
                f"{path} {_fmt_shape(_leaf_info(leaf))} but the checkpoint has no such entry "
                f"(it has {len(saved)} arrays, the target {len(target_entries)}). {fix}"
            )
        s, t = saved_by_path[path], _leaf_info(leaf)
        if list(s["shape"]) != t["shape"] or s["dtype"] != t["dtype"]:
            raise CheckpointIncompatibleError(
                f"checkpoint step {step} at {where} is incompatible with the target: first "
                f"mismatch at {path}: checkpoint {_fmt_shape(s)} vs target {_fmt_shape(t)}. {fix}"
            )
    target_set = set(target_paths)
    extra = [p for p in saved_by_path if p not in target_set]
    if extra:
        s = saved_by_path[extra[0]]
        raise CheckpointIncompatibleError(
            f"checkpoint step {step} at {where} is incompatible with the target: the checkpoint has "
            f"{extra[0]} {_fmt_shape(s)} ({len(extra)} entries in all) that the target lacks. {fix}"
        )


def _rng_to_json(key: Any) -> dict:
    if _is_key(key):
        impl = str(jax.random.key_impl(key))
        data = np.asarray(jax.device_get(jax.random.key_data(key)))
    else:
        impl, data = None, np.asarray(jax.device_get(key))
    return {
        "impl": impl,
        "dtype": str(data.dtype),
        "shape": list(data.shape),
        "data": data.reshape(-1).tolist(),
    }


def _rng_from_json(d: Mapping | None) -> Any:
    if d is None:
        return None
    data = np.asarray(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
    if d["impl"] is None:
        return jax.numpy.asarray(data)
    return jax.random.wrap_key_data(data, impl=d["impl"])


# ------------------------------------------------------------------------------------ Checkpointer
class Checkpointer:
    """Saves and restores training checkpoints under ``workdir/checkpoints`` (Orbax).

    Args:
      workdir: the run's work directory.
      save_every: :meth:`should_save` is true every ``save_every`` steps (``<= 0``: never).
      max_to_keep: keep the newest ``max_to_keep`` checkpoints (None: all).
      async_save: write files in a background thread (see the module docstring).
      resume: the run asks to resume: the work directory must exist and hold a checkpoint, else
        :class:`CheckpointNotFoundError` is raised right away.
      checksums: store a CRC32 of every (fully addressable) array and verify it on restore. Catches
        silent bit rot that the storage format would not notice, at the cost of a host copy.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        save_every: int = 100,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        resume: bool = False,
        checksums: bool = False,
    ):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        self.save_every = int(save_every)
        self.max_to_keep = max_to_keep
        self.checksums = checksums
        if resume and not self.workdir.is_dir():
            raise CheckpointNotFoundError(
                f"cannot resume: work directory {self.workdir} does not exist. Fix: pass the work "
                "directory of the run to resume, or drop --resume to start a fresh run."
            )
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=1,  # the decision is should_save()'s
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        if resume and self.latest_step() is None:
            raise CheckpointNotFoundError(
                f"cannot resume: no checkpoint in {self.directory}. Fix: check the work directory "
                "(a finished checkpoint is a numbered directory there), or drop --resume to start "
                "a fresh run."
            )

    # ---------------------------------------------------------------------------------- queries
    def should_save(self, step: int) -> bool:
        """Whether ``step`` is a checkpoint step (every ``save_every`` steps, not step 0)."""
        return self.save_every > 0 and int(step) > 0 and int(step) % self.save_every == 0

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, ascending (unfinished temporary dirs are ignored)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished checkpoint step, or None."""
        return self._manager.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(int(step))

    # ------------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        train_state: Any,
        *,
        rng_key: Any = None,
        data_position: Mapping | None = None,
        config: Any = None,
        metrics: Mapping | None = None,
    ) -> None:
        """Save a checkpoint at ``step`` (an existing checkpoint at ``step`` is replaced).

        Args:
          step: the training step.
          train_state: any pytree of arrays (e.g. a :class:`~actfocus_jax.rl.train_step.TrainState`).
          rng_key: the trainer's RNG key (typed or raw).
          data_position: the data iterator's position, a small JSON-able dict.
          config: the run's config (dict or dataclass; stored as JSON, see :func:`to_jsonable`).
          metrics: scalar metrics of the step, stored in the checkpoint's metadata.
        """
        step = int(step)
        if step in self._manager.all_steps():
            log.warning("replacing the existing checkpoint at step %d in %s", step, self.directory)
            self._manager.wait_until_finished()
            self._manager.delete(step)
        entries, _ = _flatten(train_state)
        layout, stored = [], []
        for path, comps, leaf in entries:
            layout.append({"path": path, **_leaf_info(leaf)})
            value = jax.random.key_data(leaf) if _is_key(leaf) else leaf
            if not isinstance(value, jax.Array | np.ndarray):
                value = np.asarray(value)
            stored.append((path, comps, value))
        if self.checksums:
            for entry, (_, _, value) in zip(layout, stored):
                entry["crc32"] = _checksum(value)
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "saved_at": time.time(),
            "layout": layout,
            "rng": None if rng_key is None else _rng_to_json(rng_key),
            "data_position": to_jsonable(dict(data_position or {})),
            "metrics": to_jsonable(dict(metrics or {})),
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_nest(stored)),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(to_jsonable(config if config is not None else {})),
        )
        self._manager.save(step, args=args, force=True)

    # ---------------------------------------------------------------------------------- restore
    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(
                f"no checkpoint in {self.directory}. Fix: check the work directory, or start a "
                "fresh run without --resume."
            )
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint at step {step} in {self.directory} (available: {steps}). Fix: "
                "pick one of the available steps, or pass step=None for the latest."
            )
        return int(step)

    def _corrupted(self, step: int, what: str, err: BaseException) -> CheckpointCorruptedError:
        msg = (
            f"checkpoint step {step} at {self.step_dir(step)} is corrupted or unreadable ({what}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Fix: resume "
            "with Checkpointer.restore_latest_good() to fall back to an earlier checkpoint, or "
            "delete that step directory."
        )
        return CheckpointCorruptedError(msg, step)

    def _read_json(self, step: int, item: str) -> Any:
        self._manager.wait_until_finished()
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
            )
            value = out[item]
        except Exception as e:
            raise self._corrupted(step, f"reading {item!r}", e) from e
        if value is None:
            raise self._corrupted(step, f"reading {item!r}", FileNotFoundError("item missing"))
        return value

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with checkpoint ``step`` (default: latest)."""
        return self._read_json(self._check_step(step), "config")

    def read_meta(self, step: int | None = None) -> dict:
        """The metadata (layout, rng, data position, metrics) of checkpoint ``step``."""
        return self._read_json(self._check_step(step), "meta")

    def restore(
        self,
        step: int | None = None,
        target: Any = None,
        *,
        config: Any = None,
        must_match: Iterable[str] = (),
    ) -> Restored:
        """Restore checkpoint ``step`` (default: the latest).

        Args:
          step: the step to restore, or None for the latest.
          target: the current run's train state (arrays or ``jax.ShapeDtypeStruct`` leaves, possibly
            sharded). The result has its structure, dtypes and shardings. None: a nested dict of
            arrays as stored (key leaves as raw key data).
          config: the current run's config, compared with the saved one on ``must_match``.
          must_match: dotted config keys (``"model.d_model"``) that must be equal.

        Raises:
          CheckpointNotFoundError, CheckpointCorruptedError, CheckpointIncompatibleError,
          ConfigMismatchError.
        """
        step = self._check_step(step)
        where = str(self.step_dir(step))
        meta = self._read_json(step, "meta")
        try:
            layout = list(meta["layout"])
            version = int(meta["format_version"])
        except (KeyError, TypeError, ValueError) as e:
            raise self._corrupted(step, "parsing 'meta'", e) from e
        if version > FORMAT_VERSION:
            raise CheckpointIncompatibleError(
                f"checkpoint step {step} at {where} has format version {version}, newer than this "
                f"code's {FORMAT_VERSION}. Fix: update actfocus_jax."
            )
        saved_config = self._read_json(step, "config")
        must_match = list(must_match)
        if must_match:
            check_config(saved_config, config if config is not None else {}, must_match)

        if target is None:
            try:
                out = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
                )
                state = out["state"]
            except Exception as e:
                raise self._corrupted(step, "reading 'state'", e) from e
        else:
            entries, treedef = _flatten(target)
            _compare_layout(layout, entries, step, where)
            abstract = _nest([(p, c, _abstract(leaf)) for p, c, leaf in entries])
            try:
                out = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
                nested = out["state"]
                values = [_lookup(nested, c) for _, c, _ in entries]
            except Exception as e:
                raise self._corrupted(step, "reading 'state'", e) from e
            saved_by_path = {e["path"]: e for e in layout}
            leaves = []
            for (path, _, leaf), value in zip(entries, values):
                info = saved_by_path[path]
                if "crc32" in info and info["crc32"] is not None:
                    crc = _checksum(value)
                    if crc is not None and crc != info["crc32"]:
                        raise self._corrupted(
                            step, f"checking {path}", ValueError("CRC32 mismatch")
                        )
                if _is_key(leaf):
                    value = jax.random.wrap_key_data(value, impl=info["key_impl"] or "threefry2x32")
                leaves.append(value)
            state = jax.tree_util.tree_unflatten(treedef, leaves)
        try:
            rng = _rng_from_json(meta.get("rng"))
        except Exception as e:
            raise self._corrupted(step, "parsing the RNG key", e) from e
        return Restored(
            step=step,
            train_state=state,
            rng_key=rng,
            data_position=dict(meta.get("data_position") or {}),
            config=saved_config,
            metrics=dict(meta.get("metrics") or {}),
        )

    def restore_latest_good(
        self, target: Any = None, *, config: Any = None, must_match: Iterable[str] = ()
    ) -> Restored:
        """Restore the newest checkpoint that is not corrupted, skipping (and logging) bad ones.

        Incompatibility and config errors are raised at once (an older checkpoint of the same run
        would not fix them). ``Restored.skipped`` lists the corrupted steps; call
        :meth:`discard_after` with the restored step to delete them before saving again.
        """
        steps = self.all_steps()
        if not steps:
            self._check_step(None)  # raises CheckpointNotFoundError
        skipped: list[int] = []
        errors: list[str] = []
        must_match = list(must_match)
        for step in reversed(steps):
            try:
                r = self.restore(step, target, config=config, must_match=must_match)
            except CheckpointCorruptedError as e:
                log.warning("skipping corrupted checkpoint: %s", e)
                skipped.append(step)
                errors.append(str(e))
                continue
            r.skipped = tuple(skipped)
            return r
        raise CheckpointCorruptedError(
            f"all {len(steps)} checkpoints in {self.directory} are corrupted (steps {steps}); the "
            f"newest error: {errors[0]}"
        )

    def discard_after(self, step: int) -> list[int]:
        """Delete the checkpoints newer than ``step`` (after resuming from an older one)."""
        self._manager.wait_until_finished()
        gone = [s for s in self.all_steps() if s > int(step)]
        for s in gone:
            self._manager.delete(s)
        return gone

    # -------------------------------------------------------------------------------- lifecycle
    def wait_until_finished(self) -> None:
        """Block until the pending asynchronous save (if any) is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
