"""The line protocol shared by the peer-benchmark workers (standard library + NumPy only).

A worker is started as ``python <worker>.py --spec SPEC.json --inputs INPUTS.npz``. It builds its
model and optimiser, runs ``spec["warmup"]`` untimed steps (compilation included), then prints one
JSON line ``{"event": "ready", ...}`` on stdout and serves commands read from stdin, one per line:

``step``
    runs one timed policy update and answers ``{"event": "step", "seconds": ..., "loss": ...}``.
``quit``
    answers ``{"event": "bye"}`` and exits.

Only protocol lines start with ``@@`` on stdout, so library chatter on stdout cannot be mistaken for
an answer. Errors are answered as ``{"event": "error", "error": "..."}`` before the worker exits.

This module is imported by the workers in the peer virtual environments, which do not have
``actfocus_jax`` installed: keep it free of project imports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

PREFIX = "@@"


def send(msg: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(msg) + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True, help="JSON file with the shapes and hyper-parameters")
    p.add_argument("--inputs", required=True, help="NPZ file with the batch")
    p.add_argument("--variant", default="", help="worker-specific variant (ablations)")
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with open(args.spec) as f:
        spec = json.load(f)
    spec["variant"] = args.variant
    with np.load(args.inputs) as z:
        inputs = {k: z[k] for k in z.files}
    return spec, inputs


def send_error(name: str, e: Exception) -> None:
    """Reports the exact error (and its traceback) of the current exception to the coordinator."""
    send(
        dict(
            event="error",
            name=name,
            error=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc(),
        )
    )


def serve(
    name: str,
    build: Callable[[dict[str, Any], dict[str, np.ndarray]], tuple[Callable[[], float], dict]],
) -> int:
    """Builds the step with ``build(spec, inputs) -> (step, info)`` and serves the protocol.

    ``step()`` must run one complete policy update, wait for it to finish and return the loss.
    ``info`` (versions, notes) is sent with the ``ready`` event.
    """
    try:
        spec, inputs = load(parse_args())
        t0 = time.perf_counter()
        step, info = build(spec, inputs)
        build_s = time.perf_counter() - t0
        warm = []
        for _ in range(int(spec["warmup"])):
            t1 = time.perf_counter()
            loss = step()
            warm.append(time.perf_counter() - t1)
        send(dict(event="ready", name=name, build_s=build_s, warmup_s=warm, **info))
    except Exception as e:  # report the exact error to the coordinator
        send_error(name, e)
        return 1
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            try:
                t1 = time.perf_counter()
                loss = step()
                dt = time.perf_counter() - t1
                send(dict(event="step", seconds=dt, loss=float(loss)))
            except Exception as e:
                send_error(name, e)
                return 1
        elif cmd == "quit":
            send(dict(event="bye"))
            return 0
        elif cmd:
            send(dict(event="error", name=name, error=f"unknown command {cmd!r}"))
    return 0
