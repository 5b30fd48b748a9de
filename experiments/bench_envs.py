"""Throughput of the JAX environments: ``jit(vmap(step))`` over a batch vs per-instance stepping.

Run: ``python -m experiments.bench_envs [--batch 4096] [--iters 20] [--single 200]``.

For every registered pure-JAX env that imports (FrozenLake / Sudoku are picked up when they exist;
an env that fails to import or build is reported and skipped) it measures

* ``vmap``: turns per second of ``jax.jit(jax.vmap(env.step))`` on ``batch`` instances (each turn
  holds ``max_actions_per_turn`` random valid actions), stepping from freshly reset states so that no
  instance is done;
* ``loop``: turns per second of calling the env's own ``jax.jit(env.step)`` once per instance in a
  Python loop (what a host-side turn loop without batching would do);

and prints both with their ratio in one table. Compilation is excluded (one warm-up call each).
Default runtime on a 2-core CPU: well under a minute.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from actfocus_jax.envs import JAX_ENVS, make
from actfocus_jax.envs.base import ParsedActions, stack_tasks


def random_parsed(rng: np.random.Generator, batch: int, k: int, num_actions: int) -> ParsedActions:
    """A batch of valid ``ParsedActions`` with ``k`` uniformly random actions each."""
    return ParsedActions(
        actions=jnp.asarray(rng.integers(0, num_actions, size=(batch, k)), jnp.int32),
        num=jnp.full((batch,), k, jnp.int32),
        format_ok=jnp.ones((batch,), bool),
        num_invalid=jnp.zeros((batch,), jnp.int32),
    )


def bench_env(name: str, batch: int, iters: int, single: int, n_tasks: int = 64) -> dict:
    env = make(name)
    rng = np.random.default_rng(0)
    pool = [env.generate_task(rng) for _ in range(n_tasks)]
    tasks = stack_tasks([pool[i % n_tasks] for i in range(batch)])
    keys = jax.random.split(jax.random.key(0), batch)
    k, n_act = env.max_actions_per_turn, len(env.action_names)

    state, _ = jax.jit(jax.vmap(env.reset))(keys, tasks)
    vstep = jax.jit(jax.vmap(env.step))
    parsed = [random_parsed(rng, batch, k, n_act) for _ in range(iters)]
    jax.block_until_ready(vstep(state, parsed[0]))  # compile
    t0 = time.perf_counter()
    for p in parsed:
        out = vstep(state, p)
    jax.block_until_ready(out)
    vmap_rate = batch * iters / (time.perf_counter() - t0)

    step = jax.jit(env.step)
    states = [jax.tree_util.tree_map(lambda x, i=i: x[i], state) for i in range(min(single, batch))]
    singles = [
        jax.tree_util.tree_map(lambda x, i=i: x[i % batch], parsed[0]) for i in range(single)
    ]
    jax.block_until_ready(step(states[0], singles[0]))  # compile
    t0 = time.perf_counter()
    for i, p in enumerate(singles):
        out = step(states[i % len(states)], p)
        jax.block_until_ready(out)
    loop_rate = single / (time.perf_counter() - t0)
    return {"env": name, "batch": batch, "vmap": vmap_rate, "loop": loop_rate}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--single", type=int, default=200)
    parser.add_argument("--envs", nargs="*", default=list(JAX_ENVS))
    args = parser.parse_args(argv)
    print(f"devices: {jax.devices()}")
    rows = []
    for name in args.envs:
        try:
            rows.append(bench_env(name, args.batch, args.iters, args.single))
        except (ImportError, NotImplementedError) as e:
            print(f"skip {name}: {type(e).__name__}: {e}")
        except Exception as e:  # an env in progress must not stop the others
            print(f"skip {name}: failed with {type(e).__name__}: {e}")
    header = f"{'env':<12}{'batch':>7}{'vmap turns/s':>16}{'loop turns/s':>16}{'ratio':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['env']:<12}{r['batch']:>7}{r['vmap']:>16,.0f}{r['loop']:>16,.0f}"
            f"{r['vmap'] / r['loop']:>9.1f}"
        )
    return rows


if __name__ == "__main__":
    main()
