"""Benchmarks of the jitted train step, ActFocus overhead and the rollout engine.

Run: ``python -m experiments.bench [--suite train,actfocus,rollout,unroll] [--out PATH] [--quick] [--reps N]
[--rollout-mesh DATA[,FSDP[,TENSOR]]]``.

Prints one table per suite and writes a JSON file (device kind, platform, jax / jaxlib versions, date,
CPU count and load average at start, and every measurement). Compilation is always excluded: every
program is compiled (``jit(...).lower(...).compile()``) or warmed up once before it is timed.

Timing method. All variants compared in a table are timed in the same run with *interleaved*
repetitions (A, B, A, B, ...; the order flips every repetition so that neither variant always runs
right after the other), and the median over the repetitions is reported. On a shared, loaded machine
this keeps ratios meaningful even when absolute numbers drift; each table also reports the median
of the per-repetition ratios (adjacent A/B pairs), which is the most noise-robust number here.

Suites:

``actfocus``
    Step time and compiled memory of GRPO vs ActFocus-GRPO and PPO vs ActFocus-PPO on the same
    synthetic batch, same model and shapes (``ActFocusConfig()`` vs ``ActFocusConfig(enabled=False)``),
    AdamW, ``num_minibatches=2``. Memory comes from the compiled executable's ``memory_analysis()``
    (argument / output / alias / temp bytes; deterministic, independent of CPU noise). Targets: time
    ratio <= 1.02, no extra memory.

``train``
    Train-step tokens/s and model FLOP utilisation (MFU) for several model shapes, sequence lengths
    and batch sizes (GRPO + ActFocus, one epoch, one minibatch, no KL, so a step is exactly one
    forward + backward of the policy over ``B x L`` tokens). The peak is a float32
    ``m x n x k`` matmul measured interleaved with every shape (FLOP/s ``= 2 m n k / time``), and MFU
    is computed against the peak measured alongside that shape.

    Model FLOPs per token of a train step (forward + backward = 3 x forward)::

        6 * N  +  12 * n_layers * d_attn * L

    with ``N`` = non-embedding parameters + the LM-head matmul (``vocab x d_model``, counted even
    when tied, since the head matmul runs; the embedding lookup is not a matmul), ``d_attn = n_heads
    * head_dim`` and ``L`` the sequence length: ``QK^T`` and ``PV`` are ``2 * 2 * d_attn * L`` FLOPs
    per token forward, x3 for forward + backward. The causal mask is not exploited by the attention
    kernel, so the full ``L`` is counted (as PaLM's MFU does). Element-wise work (norms, RoPE,
    softmax, the loss) is not counted. XLA's own ``compiled.cost_analysis()["flops"]`` is printed
    next to it; note that XLA's cost analysis counts a ``while`` / ``scan`` body once, not once per
    trip, so with the layers under ``lax.scan`` it under-counts by about ``n_layers``.

``rollout``
    Generated tokens/s and episodes/s of ``rollout_fused`` (whole multi-turn loop on device) vs
    ``rollout_host`` (Python turn loop around jitted pieces) on the same tiny random transformer,
    Sokoban tasks, batch and key (both paths give the same trajectories; the table says whether they
    did). Each path is warmed up once. ``--rollout-mesh 4`` (or ``2,2``, ``2,2,2``: data, fsdp,
    tensor sizes) adds ``fused-sharded``: the fused rollout with ``mesh=`` (episodes split over the
    mesh's data axes, parameters placed by ``shard_params``). On CPU, get several devices with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.

``webshop``
    ``rollout_host`` on WebShop (the synthetic catalog at the recipe's settings: 9 actions, pages of
    up to 384 tokens, 48 response tokens; a ~4,000-slot budget) with the KV cache sized to the whole
    budget (``cache_block=0``) vs grown in blocks of 256 slots as the episodes lengthen (the
    default), same model, goals and key (the table says whether the episodes were identical). The
    tiny model has random weights: its answers are invalid, so every episode runs all 9 turns,
    the longest a WebShop episode can be and so the smallest saving. Not in the default suites
    (without ``--quick`` the budget-cache variant takes minutes per call on a CPU).

``unroll``
    The GRPO train step with the layer ``lax.scan`` rolled (``ModelConfig.scan_unroll=1``, the
    default) vs fully unrolled (``scan_unroll=n_layers``; ``--config.model.scan_unroll`` in the
    trainer): step time (interleaved, paired ratio), compile time and compiled temp memory, at the
    reference shape (4 layers, 32 x 512) and at a 16-layer model of the same width (8 x 256), where
    unrolling's compile cost shows.

``layout``
    The GRPO train step (reference model, layer scan unrolled) before and after the layout changes
    of the model's matmuls, one change at a time, side by side: "before" (the projections as
    ``einsum``s over ``[B, T, ...]``, the causal attention's 5-D ``btkgd,bskd->bkgts`` einsums in
    query blocks of 128: the code up to this suite's commit, kept here as the reference); "+ 2-D
    projections" (``transformer.dense``); "+ head-major attention" (blocks of 128); "+ blocks of 64"
    (the current default, ``ModelConfig.attn_block``) and blocks of 32. Step time (interleaved,
    paired ratio against "before"), compiled temp memory, and the largest parameter difference after
    one step against "before" (the changes reorder float sums only). Shape: 32 x 512 (``--quick``:
    8 x 256). Not in the default suites.

``sft``
    SFT steps of the tiny model on the main job's demonstrations (Sokoban, state-style, batch 16,
    ``max_len`` 320), every batch padded to ``max_len`` vs to its longest demo rounded up to a
    multiple of 64 / 32 (``--config.sft.pad_multiple``): the same batches in the same order, one
    pass per repetition (interleaved), after a warm-up pass that compiles every width. Reports
    ms per step, padded columns per batch, the share of real tokens and the paired speed-up.

``warmup``
    PPO's train step during the critic warm-up (``AlgoConfig.critic_warmup_steps``: the critic
    learns, the policy is held) against a normal PPO step (both updated), same model and batch,
    interleaved. Before the warm-up skipped the policy's backward pass (``lax.cond``) a warm-up
    step computed the full update and discarded it, i.e. cost one normal step. Not in the default
    suites.

``large`` (not in the default set; meant for a GPU or TPU)
    The Qwen2.5-0.5B shape with random weights in bfloat16: train-step tokens/s and MFU against a
    bfloat16 ``8192^3`` matmul timed interleaved (B x L = 8 x 1024, 16 x 1024, 8 x 2048), the same
    step sharded over a ``data x fsdp`` mesh of all devices when there are several (MFU per
    device), and fused-rollout generated tokens/s (128 Sokoban episodes x 3 turns x <= 128
    tokens). ``--quick`` runs a 2-layer miniature so that the path can be checked on a CPU
    (``XLA_FLAGS=--xla_force_host_platform_device_count=4`` for the sharded variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from actfocus_jax import envs
from actfocus_jax.models import (
    CausalLM,
    ModelConfig,
    get_config,
    init_model,
    transformer,
    value_model_from_policy,
)
from actfocus_jax.provenance import machine_info
from actfocus_jax.rl.actfocus import ActFocusConfig
from actfocus_jax.rl.train_step import (
    AlgoConfig,
    TrainBatch,
    TrainStatics,
    init_train_state,
    make_optimizer,
    train_step,
)
from actfocus_jax.rollout import Role
from actfocus_jax.rollout.engine import (
    COMPACT_PROMPTS,
    RolloutConfig,
    make_turn_template,
    rollout_fused,
    rollout_host,
    sequence_budget,
    transformer_policy,
)

SUITES = (
    "actfocus",
    "train",
    "rollout",
    "webshop",
    "unroll",
    "layout",
    "sft",
    "warmup",
    "large",
)
#: suites run when --suite is not given ("large" is meant for a GPU / TPU).
DEFAULT_SUITES = ("actfocus", "train", "rollout", "unroll", "sft")


# ----------------------------------------------------------------------------------------- shapes
def reference_config() -> ModelConfig:
    """The reference shape: Qwen2-style, 4 layers, d_model 256, MLP 704, 8 heads / 2 kv heads of
    32, vocab 512, tied embeddings, float32."""
    return get_config(
        "tiny",
        n_layers=4,
        d_model=256,
        mlp_dim=704,
        n_heads=8,
        n_kv_heads=2,
        head_dim=32,
        vocab_size=512,
        tie_embeddings=True,
        param_dtype="float32",
        dtype="float32",
    )


def small_config() -> ModelConfig:
    """A 2-layer, d_model 64 model for the quick ActFocus comparison."""
    return get_config("tiny", n_layers=2, d_model=64, mlp_dim=176, n_heads=4, n_kv_heads=2)


def model_config(name: str) -> ModelConfig:
    return {
        "reference": reference_config,
        "tiny": lambda: get_config("tiny"),
        "small": small_config,
    }[name]()


def matmul_params(c: ModelConfig) -> int:
    """Non-embedding parameters plus the LM-head matmul (``vocab x d_model``, tied or not)."""
    return (
        c.num_params()
        - c.vocab_size * c.d_model
        + (c.vocab_size * c.d_model if c.tie_embeddings else 0)
    )


def train_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """``6 N + 12 n_layers d_attn L`` (see the module docstring)."""
    return 6.0 * matmul_params(c) + 12.0 * c.n_layers * c.n_heads * c.head_dim * seq_len


# ---------------------------------------------------------------------------------------- timing
class CompileMeter:
    """Seconds JAX spends tracing, lowering and compiling (``jax.monitoring`` duration events).

    Used to check that timed calls do not compile, and to report how much of a call that does
    (``rollout_host``) is compilation.
    """

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        self.seconds = 0.0
        self.backend_compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event in self.EVENTS:
            self.seconds += duration
            self.backend_compiles += event == self.EVENTS[-1]


_METER: CompileMeter | None = None


def compile_meter() -> CompileMeter:
    global _METER
    if _METER is None:
        _METER = CompileMeter()
    return _METER


def interleaved(
    fns: dict[str, Callable[[], Any]], reps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Times each callable ``reps`` times, interleaved (order flipped every repetition).

    Returns:
      ``(times, compile_times)``: wall seconds per call, and the part of each call that JAX spent
      tracing / compiling (0 when the call hit the jit caches).
    """
    meter = compile_meter()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    compiles: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            c0 = meter.seconds
            t0 = time.perf_counter()
            jax.block_until_ready(fns[n]())
            times[n].append(time.perf_counter() - t0)
            compiles[n].append(meter.seconds - c0)
    return times, compiles


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repetitions of ``a_i / b_i`` (adjacent measurements of one repetition)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


class Stepper:
    """Calls a compiled train step repeatedly, feeding the (donated) state back in."""

    def __init__(self, compiled, state, batch, key, statics=None):
        self.compiled, self.state, self.batch, self.key = compiled, state, batch, key
        self.statics = statics

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.batch, self.key)
        return self.state, metrics


def time_steppers(
    variants: dict[str, tuple[Stepper, Any, float]],
    reps: int,
    *,
    warmups: int = 1,
    extra: dict[str, Callable[[], Any]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, dict[str, int]]]:
    """Warms up each ``(stepper, compiled, compile_s)`` variant ``warmups`` times (buffer
    allocation, donation, re-layouts), then times them, and the ``extra`` callables, interleaved.

    Returns ``(times, compile_times, memory)`` as :func:`interleaved` plus :func:`memory_stats`
    of each variant's compiled executable.
    """
    for stepper, _, _ in variants.values():
        for _ in range(warmups):
            jax.block_until_ready(stepper())
    fns = {k: v[0] for k, v in variants.items()}
    fns.update(extra or {})
    times, comp = interleaved(fns, reps)
    return times, comp, {k: memory_stats(v[1]) for k, v in variants.items()}


# ----------------------------------------------------------------------------------------- batch
def synthetic_batch(
    batch: int, length: int, vocab: int, *, turns: int = 3, seed: int = 0
) -> TrainBatch:
    """A rollout-like batch: a prompt head, then ``turns`` x [reasoning, action, observation].

    Rows have valid lengths in ``[3L/4, L]``; per turn ~70% reasoning, ~10% action, ~20% observation
    (the last turn has none); a reward on the last token of every response.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    roles = np.full((batch, length), Role.PAD, np.int8)
    turn_ids = np.full((batch, length), -1, np.int32)
    token_rewards = np.zeros((batch, length), np.float32)
    head = max(1, length // 8)
    for b in range(batch):
        n = int(rng.integers(3 * length // 4, length + 1))
        roles[b, :head] = Role.PROMPT
        turn_ids[b, :head] = 0
        seg = max(3, (n - head) // turns)
        pos = head
        for t in range(turns):
            end = n if t == turns - 1 else min(n, pos + seg)
            span = end - pos
            if span <= 0:
                break
            n_obs = 0 if t == turns - 1 else span // 5
            n_act = max(1, span // 10)
            n_rea = max(0, span - n_obs - n_act)
            roles[b, pos : pos + n_rea] = Role.REASONING
            roles[b, pos + n_rea : pos + n_rea + n_act] = Role.ACTION
            roles[b, pos + n_rea + n_act : end] = Role.PROMPT
            turn_ids[b, pos:end] = t
            token_rewards[b, pos + n_rea + n_act - 1] = rng.normal()
            pos = end
    valid = roles != Role.PAD
    gen = (roles == Role.REASONING) | (roles == Role.ACTION)
    old_logp = np.where(gen, -rng.uniform(0.05, 4.0, (batch, length)), 0.0).astype(np.float32)
    return TrainBatch(
        tokens=tokens,
        valid=valid,
        loss_mask=gen,
        roles=roles,
        turn_ids=turn_ids,
        old_logp=old_logp,
        entropy=np.abs(old_logp) * 1.5,
        logit=-old_logp,
        token_rewards=token_rewards,
        episode_return=token_rewards.sum(1),
    )


def build_step(
    c: ModelConfig, algo_cfg: AlgoConfig, batch: TrainBatch, seed: int = 0
) -> tuple[Stepper, Any]:
    """Compiles ``train_step`` for (model, config, batch); returns a :class:`Stepper` and the
    compiled executable (for ``memory_analysis`` / ``cost_analysis``)."""
    model = CausalLM(c, rngs=nnx.Rngs(seed))
    graphdef, _ = nnx.split(model)
    critic = value_model_from_policy(model) if algo_cfg.algo == "ppo" else None
    statics = TrainStatics(
        policy_graphdef=graphdef,
        critic_graphdef=nnx.split(critic)[0] if critic is not None else None,
        optimizer=make_optimizer(1e-6),
        critic_optimizer=make_optimizer(1e-6) if critic is not None else None,
        config=algo_cfg,
    )
    state = init_train_state(model, statics, critic)
    batch = jax.tree.map(jnp.asarray, batch)
    key = jax.random.key(seed)
    compiled = train_step.lower(state, batch, key, statics=statics).compile()
    return Stepper(compiled, state, batch, key, statics), compiled


def timed_build(
    c: ModelConfig, algo_cfg: AlgoConfig, batch: TrainBatch
) -> tuple[Stepper, Any, float]:
    """:func:`build_step` and its wall seconds: a variant of :func:`time_steppers`."""
    t0 = time.perf_counter()
    stepper, compiled = build_step(c, algo_cfg, batch)
    return stepper, compiled, time.perf_counter() - t0


def memory_stats(compiled) -> dict[str, int]:
    """Byte counts of a compiled executable (``footprint = argument + output - alias + temp``)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    out = {
        k: int(getattr(ma, f"{k}_size_in_bytes"))
        for k in ("argument", "output", "alias", "temp", "generated_code")
        if hasattr(ma, f"{k}_size_in_bytes")
    }
    out["footprint"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    if hasattr(ma, "peak_memory_in_bytes"):
        out["peak_memory"] = int(ma.peak_memory_in_bytes)
    return out


def xla_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(ca, list):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


# ------------------------------------------------------------------------------------ formatting
def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"
        return str(x)

    cells = [header] + [[fmt(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for j, r in enumerate(cells):
        print("  ".join(s.rjust(w) for s, w in zip(r, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def mib(x: int) -> float:
    return x / 2**20


# ---------------------------------------------------------------------------------------- suites
def suite_actfocus(quick: bool, reps: int | None) -> dict:
    name, b, seq = ("small", 16, 128) if quick else ("reference", 16, 256)
    reps = reps or (5 if quick else 7)
    c = model_config(name)
    batch = synthetic_batch(b, seq, c.vocab_size, seed=1)
    results = []
    rows = []
    for algo in ("grpo", "ppo"):
        variants = {}
        for label, af in (("plain", ActFocusConfig(enabled=False)), ("actfocus", ActFocusConfig())):
            cfg = AlgoConfig(algo=algo, group_size=8, num_minibatches=2, actfocus=af)
            variants[label] = timed_build(c, cfg, batch)
        times, comp, mem = time_steppers(variants, reps)
        t_plain, t_af = statistics.median(times["plain"]), statistics.median(times["actfocus"])
        res = dict(
            algo=algo,
            model=name,
            batch=b,
            seq_len=seq,
            reps=reps,
            time_plain_s=t_plain,
            time_actfocus_s=t_af,
            ratio_of_medians=t_af / t_plain,
            median_paired_ratio=paired_ratio(times["actfocus"], times["plain"]),
            times_plain_s=times["plain"],
            times_actfocus_s=times["actfocus"],
            compile_s={k: v[2] for k, v in variants.items()},
            compile_s_during_timing={k: sum(v) for k, v in comp.items()},
            memory_plain=mem["plain"],
            memory_actfocus=mem["actfocus"],
            memory_diff_bytes={
                k: mem["actfocus"][k] - mem["plain"][k]
                for k in mem["plain"]
                if k in mem["actfocus"]
            },
        )
        results.append(res)
        d = res["memory_diff_bytes"]
        rows.append(
            [
                algo.upper(),
                f"{t_plain * 1e3:.1f}",
                f"{t_af * 1e3:.1f}",
                f"{res['ratio_of_medians']:.3f}",
                f"{res['median_paired_ratio']:.3f}",
                f"{mib(mem['plain'].get('footprint', 0)):.2f}",
                f"{mib(mem['actfocus'].get('footprint', 0)):.2f}",
                d.get("temp", "n/a"),
                d.get("footprint", "n/a"),
            ]
        )
    print_table(
        f"actfocus: {name} model, batch {b} x {seq} tokens, AdamW, 2 minibatches, median of {reps}",
        [
            "algo",
            "plain ms",
            "actfocus ms",
            "ratio",
            "paired ratio",
            "plain MiB",
            "actfocus MiB",
            "d temp B",
            "d footprint B",
        ],
        rows,
    )
    return {"model_config": dataclasses.asdict(c), "results": results}


def suite_warmup(quick: bool, reps: int | None) -> dict:
    name, b, seq = ("small", 16, 128) if quick else ("reference", 16, 256)
    reps = reps or (5 if quick else 7)
    c = model_config(name)
    batch = synthetic_batch(b, seq, c.vocab_size, seed=1)
    variants = {}
    for label, warm in (("update", 0), ("warm-up", 10**9)):
        cfg = AlgoConfig(algo="ppo", group_size=8, num_minibatches=2, critic_warmup_steps=warm)
        variants[label] = timed_build(c, cfg, batch)
    times, _, mem = time_steppers(variants, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = dict(
        model=name,
        batch=b,
        seq_len=seq,
        reps=reps,
        median_s=med,
        times_s=times,
        ratio_of_medians=med["warm-up"] / med["update"],
        median_paired_ratio=paired_ratio(times["warm-up"], times["update"]),
        memory=mem,
    )
    print_table(
        f"warmup: PPO step, {name} model, batch {b} x {seq}, 2 minibatches, median of {reps}",
        ["step", "ms", "ratio to update", "footprint MiB"],
        [
            [
                k,
                f"{med[k] * 1e3:.1f}",
                f"{med[k] / med['update']:.3f}",
                f"{mib(mem[k].get('footprint', 0)):.2f}",
            ]
            for k in ("update", "warm-up")
        ],
    )
    print(f"warm-up / update, median paired ratio: {res['median_paired_ratio']:.3f}")
    return {"model_config": dataclasses.asdict(c), "results": [res]}


def suite_unroll(quick: bool, reps: int | None) -> dict:
    """GRPO train step with the layer scan rolled (``scan_unroll=1``) vs fully unrolled, side by
    side: step time (interleaved, paired ratio), compile time and compiled memory, at the reference
    shape and at a deeper model of the same width (compile time grows with depth when unrolled)."""
    reps = reps or (3 if quick else 5)
    shapes = (
        [("reference", 4, 8, 128)] if quick else [("reference", 4, 32, 512), ("deep", 16, 8, 256)]
    )
    results, rows = [], []
    for name, layers, b, seq in shapes:
        base = reference_config().replace(n_layers=layers)
        batch = synthetic_batch(b, seq, base.vocab_size, seed=3)
        cfg = AlgoConfig(algo="grpo", group_size=8, num_minibatches=1)
        variants = {}
        for label, unroll in (("rolled", 1), ("unrolled", layers)):
            variants[label] = timed_build(base.replace(scan_unroll=unroll), cfg, batch)
        times, _, mem = time_steppers(variants, reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        res = dict(
            model=name,
            n_layers=layers,
            batch=b,
            seq_len=seq,
            reps=reps,
            time_s=med,
            times_s=times,
            tokens_per_s={k: b * seq / v for k, v in med.items()},
            speedup_paired=paired_ratio(times["rolled"], times["unrolled"]),
            compile_s={k: v[2] for k, v in variants.items()},
            memory=mem,
        )
        results.append(res)
        rows.append(
            [
                f"{name} ({layers} layers)",
                f"{b}x{seq}",
                f"{med['rolled'] * 1e3:.0f}",
                f"{med['unrolled'] * 1e3:.0f}",
                f"{res['speedup_paired']:.3f}",
                f"{res['compile_s']['rolled']:.1f}",
                f"{res['compile_s']['unrolled']:.1f}",
                f"{mib(mem['rolled'].get('temp', 0)):.0f}",
                f"{mib(mem['unrolled'].get('temp', 0)):.0f}",
            ]
        )
    print_table(
        f"unroll: GRPO step, layer scan rolled vs fully unrolled, median of {reps}",
        [
            "model",
            "batch",
            "rolled ms",
            "unrolled ms",
            "speed-up (paired)",
            "compile rolled s",
            "compile unrolled s",
            "temp rolled MiB",
            "temp unrolled MiB",
        ],
        rows,
    )
    return {"results": results}


def _einsum_dense(x: jax.Array, w: jax.Array, n_contract: int = 1, **dot_kwargs: Any) -> jax.Array:
    """``transformer.dense`` as it was before the ``layout`` suite: one einsum over ``[B, T, ...]``."""
    lead = "abcdefgh"[: x.ndim - n_contract]
    k, m = "ijkl"[:n_contract], "mnop"[: w.ndim - n_contract]
    return jnp.einsum(f"{lead}{k},{k}{m}->{lead}{m}", x, w, **dot_kwargs)


def _attention_5d_blocks(q, k, v, mask, block: int = 128) -> jax.Array:
    """``transformer.causal_attention`` as it was before the ``layout`` suite: query blocks of the
    5-D ``transformer.attention`` (``btkgd,bskd->bkgts``)."""
    t = q.shape[1]
    if k.shape[1] != t or t <= block:
        return transformer.attention(q, k, v, mask)
    outs = []
    for lo in range(0, t, block):
        hi = min(t, lo + block)
        outs.append(transformer.attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask[:, lo:hi, :hi]))
    return jnp.concatenate(outs, axis=1)


def _build_with(c, cfg, batch, *, old_dense: bool, old_attention: bool):
    """:func:`build_step` with the model's ``dense`` / ``causal_attention`` swapped for the
    reference implementations above while tracing (restored afterwards)."""
    saved = transformer.dense, transformer.causal_attention
    try:
        if old_dense:
            transformer.dense = _einsum_dense
        if old_attention:
            transformer.causal_attention = lambda q, k, v, mask, block: _attention_5d_blocks(
                q, k, v, mask, 128
            )
        return build_step(c, cfg, batch)
    finally:
        transformer.dense, transformer.causal_attention = saved


def suite_layout(quick: bool, reps: int | None) -> dict:
    """GRPO train step before / after each layout change of the model's matmuls (see the module
    docstring), side by side: step time (interleaved, paired ratio against "before"), compiled temp
    memory, and the parameters after one step compared with "before"."""
    reps = reps or (3 if quick else 7)
    b, seq = (8, 256) if quick else (32, 512)
    base = reference_config()
    base = base.replace(scan_unroll=base.n_layers)
    batch = synthetic_batch(b, seq, base.vocab_size, seed=3)
    cfg = AlgoConfig(algo="grpo", group_size=8, num_minibatches=1)
    specs = [  # label, attn_block, old dense, old attention
        ("before (einsum, 5-D attention, blocks 128)", 128, True, True),
        ("+ 2-D projections", 128, False, True),
        ("+ head-major attention, blocks 128", 128, False, False),
        ("+ blocks 64 (default)", 64, False, False),
        ("blocks 32", 32, False, False),
    ]
    variants, first = {}, {}
    for label, block, old_dense, old_attention in specs:
        t0 = time.perf_counter()
        stepper, compiled = _build_with(
            base.replace(attn_block=block),
            cfg,
            batch,
            old_dense=old_dense,
            old_attention=old_attention,
        )
        variants[label] = (stepper, compiled, time.perf_counter() - t0)
        first[label] = jax.device_get(stepper()[0].params)  # one step: the warm-up
    ref = specs[0][0]
    diff = {
        k: max(
            float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for x, y in zip(jax.tree.leaves(v), jax.tree.leaves(first[ref]), strict=True)
        )
        for k, v in first.items()
    }
    times, _, mem = time_steppers(variants, reps, warmups=0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows, results = [], []
    for label, block, old_dense, old_attention in specs:
        res = dict(
            variant=label,
            attn_block=block,
            einsum_projections=old_dense,
            attention_5d=old_attention,
            batch=b,
            seq_len=seq,
            reps=reps,
            time_s=med[label],
            times_s=times[label],
            tokens_per_s=b * seq / med[label],
            speedup_paired=paired_ratio(times[ref], times[label]),
            compile_s=variants[label][2],
            memory=mem[label],
            max_param_diff_vs_before=diff[label],
        )
        results.append(res)
        rows.append(
            [
                label,
                f"{med[label] * 1e3:.0f}",
                f"{res['tokens_per_s']:.0f}",
                f"{res['speedup_paired']:.3f}",
                f"{mib(mem[label].get('temp', 0)):.0f}",
                f"{diff[label]:.1e}",
            ]
        )
    print_table(
        f"layout: GRPO step, reference model unrolled, {b} x {seq}, median of {reps}",
        ["variant", "step ms", "tok/s", "speed-up (paired)", "temp MiB", "max |dparam| vs before"],
        rows,
    )
    return {"model_config": dataclasses.asdict(base), "results": results}


def suite_sft(quick: bool, reps: int | None) -> dict:
    """SFT step time with every batch padded to ``max_len`` vs to the batch's longest demo rounded
    up to ``pad_multiple`` (see the module docstring)."""
    import tempfile

    import optax

    from actfocus_jax.data.demos import SftBatches
    from actfocus_jax.train.sft import sft_step
    from actfocus_jax.train.trainer import build_sft_demos
    from experiments.configs.main import get_config as main_config

    reps = reps or (2 if quick else 3)
    c = main_config()
    steps = 6 if quick else 30
    with tempfile.TemporaryDirectory() as data_dir:
        builder = build_sft_demos(c, data_dir, num_tasks=64 if quick else None)
        batches = {}
        for label, multiple in (("max_len", 0), ("multiple of 64", 64), ("multiple of 32", 32)):
            it = SftBatches(
                builder, c.sft.batch_size, c.sft.max_len, seed=0, drop_remainder=True,
                pad_multiple=multiple,
            )  # fmt: skip
            batches[label] = [
                {k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(steps)
            ]
    model = init_model(get_config("tiny"), 0)
    graphdef, params0 = nnx.split(model)
    optimizer = optax.adamw(1e-4)

    def runner(bs):
        def run():
            params = jax.tree.map(jnp.copy, params0)
            opt_state = optimizer.init(params)
            for b in bs:
                params, opt_state, m = sft_step(
                    params, opt_state, b, graphdef=graphdef, optimizer=optimizer
                )
            return m.loss

        return run

    fns = {k: runner(v) for k, v in batches.items()}
    warm = {}
    for k, fn in fns.items():  # compiles every width
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        warm[k] = time.perf_counter() - t0
    times, _ = interleaved(fns, reps)
    base = "max_len"
    res, rows = {}, []
    for k, bs in batches.items():
        widths = [int(b["tokens"].shape[1]) for b in bs]
        real = float(np.mean([float(b["valid"].sum()) / b["valid"].size for b in bs]))
        ms = statistics.median(times[k]) / steps * 1e3
        speed = paired_ratio(times[base], times[k])
        res[k] = dict(
            ms_per_step=ms,
            times_s=times[k],
            widths=sorted(set(widths)),
            mean_width=float(np.mean(widths)),
            real_token_share=real,
            speedup_paired=speed,
            warmup_pass_s=warm[k],
        )
        rows.append(
            [
                k,
                f"{np.mean(widths):.0f}",
                ",".join(str(w) for w in sorted(set(widths))),
                f"{real:.2f}",
                f"{ms:.0f}",
                f"{speed:.3f}",
                f"{warm[k]:.1f}",
            ]
        )
    print_table(
        f"sft: {steps} SFT steps (batch {c.sft.batch_size}, max_len {c.sft.max_len}, main-job "
        f"demos), padding to max_len vs to the batch's longest demo, median of {reps} passes",
        [
            "pad to",
            "mean width",
            "widths",
            "real token share",
            "ms/step",
            "speed-up vs max_len (paired)",
            "warm-up pass s (incl. compiles)",
        ],
        rows,
    )
    return {"steps": steps, "batch_size": c.sft.batch_size, "max_len": c.sft.max_len, **res}


def large_config(quick: bool) -> ModelConfig:
    """The Qwen2.5-0.5B shape in bfloat16 (random weights), or a 2-layer miniature of it (quick)."""
    c = get_config("qwen2.5-0.5b", param_dtype="bfloat16", dtype="bfloat16")
    if quick:
        c = c.replace(n_layers=2, d_model=128, mlp_dim=256, n_heads=2, n_kv_heads=1, head_dim=64)
        c = c.replace(vocab_size=2048)
    return c


def suite_large(quick: bool, reps: int | None) -> dict:
    """The GPU suite: a Qwen2.5-0.5B-shaped model in bfloat16 (issue 8, item 5).

    Train step (GRPO + ActFocus, 1 epoch, 1 minibatch) tokens/s and MFU against a bfloat16 matmul
    timed interleaved; with several devices also the same step sharded over a ``data`` x ``fsdp``
    mesh of all of them; and fused-rollout generated tokens/s (Sokoban, temperature 1) of the same
    model. ``--quick`` runs a 2-layer miniature so that the code path can be checked on a CPU.
    """
    from actfocus_jax.parallel import init_sharded, make_mesh, shard_batch, shard_params

    reps = reps or (2 if quick else 5)
    c = large_config(quick)
    shapes = [(4, 64)] if quick else [(8, 1024), (16, 1024), (8, 2048)]
    mm_n = 512 if quick else 8192
    matmul, mm_flops = make_matmul(mm_n, jnp.bfloat16)
    cfg = AlgoConfig(algo="grpo", group_size=2, num_minibatches=1, epochs=1, kl_coef=0.0)
    n_dev = jax.device_count()
    results, rows = [], []
    for b, seq in shapes:
        batch = synthetic_batch(b, seq, c.vocab_size, seed=4)
        variants = {"1 device": timed_build(c, cfg, batch)}
        if n_dev > 1 and b % n_dev == 0:
            stepper = variants["1 device"][0]
            t0 = time.perf_counter()
            mesh = make_mesh(-1, n_dev // 2 if n_dev % 2 == 0 else 1, 1)
            # A copy: the single-device stepper donates its state when it runs.
            st = jax.tree.map(lambda x: jnp.array(x, copy=True), stepper.state)
            st = st.replace(params=shard_params(st.params, mesh))
            st = st.replace(opt_state=init_sharded(stepper.statics.optimizer.init, st.params, mesh))
            sb = shard_batch(stepper.batch, mesh)
            comp = train_step.lower(st, sb, stepper.key, statics=stepper.statics).compile()
            # Through jit, not the AOT executable: XLA may return the state with other shardings
            # than it took, and jit re-lays them out (the warm-up calls below absorb a recompile).
            jitted = functools.partial(train_step, statics=stepper.statics)
            variants[f"{n_dev} devices"] = (
                Stepper(jitted, st, sb, stepper.key, stepper.statics),
                comp,
                time.perf_counter() - t0,
            )
        times, _, mem = time_steppers(variants, reps, warmups=2, extra={"matmul": matmul})
        peak = mm_flops / statistics.median(times["matmul"])
        model_flops = b * seq * train_flops_per_token(c, seq)
        for k, (_, _, compile_s) in variants.items():
            t = statistics.median(times[k])
            devices = 1 if k == "1 device" else n_dev
            res = dict(
                variant=k,
                devices=devices,
                batch=b,
                seq_len=seq,
                step_s=t,
                tokens_per_s=b * seq / t,
                mfu=model_flops / t / (peak * devices),
                peak_matmul_flops_per_s=peak,
                compile_s=compile_s,
                times_s=times[k],
                memory=mem[k],
            )
            results.append(res)
            rows.append(
                [k, b, seq, f"{t * 1e3:.1f}", f"{b * seq / t:.0f}", f"{100 * res['mfu']:.1f}%"]
            )
    print_table(
        f"large: {c.num_params() / 1e6:.0f}M-parameter {'miniature of the ' if quick else ''}"
        f"Qwen2.5-0.5B shape, {c.dtype}, GRPO+ActFocus "
        f"step, median of {reps}; MFU vs a {mm_n}^3 {c.dtype} matmul (per device)",
        ["variant", "B", "L", "step ms", "tok/s", "MFU"],
        rows,
    )
    rollout = large_rollout(c, quick, reps)
    return {
        "model_config": dataclasses.asdict(c),
        "matmul_n": mm_n,
        "train": results,
        "rollout": rollout,
    }


def large_rollout(c: ModelConfig, quick: bool, reps: int) -> dict:
    """Fused-rollout throughput of the large model (random weights: the text is noise, the work is
    real; responses run to ``max_response_tokens`` unless an end tag is sampled)."""
    n_tasks, group, turns, max_resp = (2, 2, 2, 8) if quick else (16, 8, 3, 128)
    env = envs.make("sokoban", max_turns=turns)
    tok = env.tokenizer
    model = CausalLM(c, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    tasks = jax.tree.map(lambda *x: np.stack(x), *[env.generate_task(rng) for _ in range(n_tasks)])
    kwargs = dict(
        policy=transformer_policy(graphdef, c),
        env=env,
        template=make_turn_template(tok, env.system_prompt(), "plain"),
        cfg=RolloutConfig(max_turns=turns, max_response_tokens=max_resp, temperature=1.0),
        group_size=group,
        vocab=c.vocab_size,
    )
    ids = np.arange(n_tasks, dtype=np.int32)
    fn = lambda: rollout_fused(params, tasks, ids, jax.random.key(0), **kwargs)
    buf = jax.block_until_ready(fn())
    gen = int(np.asarray(buf.generated).sum())
    times, _ = interleaved({"fused": fn}, reps)
    t = statistics.median(times["fused"])
    print(
        f"large rollout: {n_tasks * group} episodes x {turns} turns x <= {max_resp} tokens: "
        f"{gen} generated tokens in {t * 1e3:.0f} ms = {gen / t:.0f} tokens/s"
    )
    return dict(
        episodes=n_tasks * group,
        turns=turns,
        max_response_tokens=max_resp,
        generated_tokens=gen,
        time_s=t,
        tokens_per_s=gen / t,
        times_s=times["fused"],
    )


def make_matmul(n: int, dtype: Any = jnp.float32) -> tuple[Callable[[], Any], float]:
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    return (lambda: f(a, b)), 2.0 * n**3


def suite_train(quick: bool, reps: int | None) -> dict:
    reps = reps or (3 if quick else 5)
    if quick:
        shapes = [("reference", 8, 64), ("reference", 8, 128)]
        mm_n = 1024
    else:
        shapes = [
            ("tiny", 32, 256),
            ("reference", 32, 128),
            ("reference", 32, 256),
            ("reference", 32, 512),
            ("reference", 8, 256),
            ("reference", 16, 256),
        ]
        mm_n = 2048
    matmul, mm_flops = make_matmul(mm_n)
    cfg = AlgoConfig(algo="grpo", group_size=8, num_minibatches=1, epochs=1, kl_coef=0.0)
    results, rows = [], []
    for name, b, seq in shapes:
        c = model_config(name)
        batch = synthetic_batch(b, seq, c.vocab_size, seed=2)
        t0 = time.perf_counter()
        stepper, compiled = build_step(c, cfg, batch)
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(stepper())
        times, comp = interleaved({"step": stepper, "matmul": matmul}, reps)
        t_step, t_mm = statistics.median(times["step"]), statistics.median(times["matmul"])
        peak = mm_flops / t_mm
        tokens = b * seq
        model_flops = tokens * train_flops_per_token(c, seq)
        xf = xla_flops(compiled)
        res = dict(
            model=name,
            batch=b,
            seq_len=seq,
            n_params=c.num_params(),
            matmul_params=matmul_params(c),
            tokens_per_step=tokens,
            step_s=t_step,
            tokens_per_s=tokens / t_step,
            model_flops_per_step=model_flops,
            xla_flops_per_step=xf,
            achieved_flops_per_s=model_flops / t_step,
            peak_matmul_flops_per_s=peak,
            mfu=model_flops / t_step / peak,
            compile_s=compile_s,
            compile_s_during_timing=sum(comp["step"]) + sum(comp["matmul"]),
            times_step_s=times["step"],
            times_matmul_s=times["matmul"],
            memory=memory_stats(compiled),
        )
        results.append(res)
        rows.append(
            [
                name,
                b,
                seq,
                f"{c.num_params() / 1e6:.2f}M",
                f"{t_step * 1e3:.1f}",
                f"{tokens / t_step:.0f}",
                f"{model_flops / 1e9:.2f}",
                "n/a" if xf is None else f"{xf / 1e9:.2f}",
                f"{model_flops / t_step / 1e9:.2f}",
                f"{peak / 1e9:.2f}",
                f"{100 * res['mfu']:.1f}%",
                f"{compile_s:.1f}",
            ]
        )
    print_table(
        f"train: GRPO+ActFocus step (1 epoch, 1 minibatch, no KL), median of {reps}; peak = "
        f"{mm_n}^3 f32 matmul interleaved per shape",
        [
            "model",
            "B",
            "L",
            "params",
            "step ms",
            "tok/s",
            "model GFLOP",
            "XLA GFLOP",
            "GFLOP/s",
            "peak GFLOP/s",
            "MFU",
            "compile s",
        ],
        rows,
    )
    peaks = [r["peak_matmul_flops_per_s"] for r in results]
    return {
        "matmul_n": mm_n,
        "peak_matmul_flops_per_s_median": statistics.median(peaks),
        "flops_formula": "per token: 6*(non-embedding params + vocab*d_model) + 12*n_layers*n_heads*head_dim*L",
        "results": results,
    }


def tiny_random_model(vocab_size: int) -> tuple[ModelConfig, Any, Any]:
    """The ``tiny`` preset with a vocabulary of at least ``vocab_size`` (rounded up to 64), random
    weights (seed 0): ``(config, graphdef, params)`` of the rollout suites."""
    base = get_config("tiny")
    c = base.replace(vocab_size=max(base.vocab_size, -(-vocab_size // 64) * 64))
    graphdef, params = nnx.split(CausalLM(c, rngs=nnx.Rngs(0)))
    return c, graphdef, params


def suite_rollout(quick: bool, reps: int | None, mesh_sizes: tuple[int, ...] | None = None) -> dict:
    reps = reps or (3 if quick else 5)
    n_tasks, group, max_turns, max_resp = (2, 4, 2, 16) if quick else (4, 8, 3, 32)
    env = envs.make("sokoban", max_turns=max_turns)
    tok = env.tokenizer
    c, graphdef, params = tiny_random_model(tok.vocab_size)
    rng = np.random.default_rng(0)
    tasks = jax.tree.map(lambda *x: np.stack(x), *[env.generate_task(rng) for _ in range(n_tasks)])
    task_ids = np.arange(n_tasks, dtype=np.int32)
    cfg = RolloutConfig(max_turns=max_turns, max_response_tokens=max_resp, temperature=1.0)
    kwargs = dict(
        policy=transformer_policy(graphdef, c),
        env=env,
        template=make_turn_template(tok, env.system_prompt(), "plain"),
        cfg=cfg,
        group_size=group,
        vocab=c.vocab_size,
    )
    key = jax.random.key(0)
    fns = {
        "fused": lambda: rollout_fused(params, tasks, task_ids, key, **kwargs),
        "host": lambda: rollout_host(params, tasks, task_ids, key, **kwargs),
    }
    if mesh_sizes:
        from actfocus_jax.parallel import make_mesh, shard_params

        mesh = make_mesh(*mesh_sizes)
        sharded_params = shard_params(params, mesh)
        fns["fused-sharded"] = lambda: rollout_fused(
            sharded_params, tasks, task_ids, key, mesh=mesh, **kwargs
        )
    warm = {}
    bufs = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        bufs[k] = jax.block_until_ready(f())
        warm[k] = time.perf_counter() - t0
    same = all(
        np.array_equal(np.asarray(bufs["fused"].tokens), np.asarray(b.tokens))
        for b in bufs.values()
    )
    gen_tokens = {k: int(np.asarray(v.generated).sum()) for k, v in bufs.items()}
    episodes = n_tasks * group
    times, comp = interleaved(fns, reps)
    # rollout_host builds fresh jax.jit wrappers for the env reset / step on every call, so each call
    # re-traces and re-compiles them (see the README); "excl. compile" subtracts the time JAX
    # reported for tracing + compiling inside each timed call.
    net = {k: [t - c for t, c in zip(times[k], comp[k], strict=True)] for k in fns}
    results = {}
    rows = []
    for k in fns:
        t, tn = statistics.median(times[k]), statistics.median(net[k])
        results[k] = dict(
            time_s=t,
            compile_s_in_call=statistics.median(comp[k]),
            time_excl_compile_s=tn,
            generated_tokens=gen_tokens[k],
            tokens_per_s=gen_tokens[k] / t,
            episodes_per_s=episodes / t,
            tokens_per_s_excl_compile=gen_tokens[k] / tn,
            episodes_per_s_excl_compile=episodes / tn,
            first_call_s=warm[k],
            times_s=times[k],
            compile_times_s=comp[k],
        )
        rows.append(
            [
                k,
                f"{t * 1e3:.0f}",
                f"{statistics.median(comp[k]) * 1e3:.0f}",
                f"{tn * 1e3:.0f}",
                gen_tokens[k],
                f"{gen_tokens[k] / t:.0f}",
                f"{episodes / t:.2f}",
                f"{gen_tokens[k] / tn:.0f}",
                f"{episodes / tn:.2f}",
                f"{warm[k]:.1f}",
            ]
        )
    speedup = statistics.median(times["host"]) / statistics.median(times["fused"])
    paired = paired_ratio(times["host"], times["fused"])
    speedup_net = statistics.median(net["host"]) / statistics.median(net["fused"])
    print_table(
        f"rollout: Sokoban, tiny random model ({c.num_params() / 1e6:.2f}M), {n_tasks} tasks x "
        f"{group} = {episodes} episodes, {max_turns} turns x {max_resp} tokens, median of {reps}; "
        f"same trajectories: {same}",
        [
            "path",
            "ms",
            "in-call compile ms",
            "ms excl. compile",
            "gen tokens",
            "tok/s",
            "episodes/s",
            "tok/s excl.",
            "episodes/s excl.",
            "first call s",
        ],
        rows,
    )
    print(
        f"fused speed-up over host: {speedup:.2f}x (median paired ratio {paired:.2f}x); "
        f"excluding the host path's in-call re-compilation: {speedup_net:.2f}x"
    )
    sharded = {}
    if mesh_sizes:
        sharded = dict(
            rollout_mesh=dict(mesh.shape),
            sharded_speedup=statistics.median(times["fused"])
            / statistics.median(times["fused-sharded"]),
            sharded_speedup_paired=paired_ratio(times["fused"], times["fused-sharded"]),
        )
        print(
            f"fused-sharded ({dict(mesh.shape)}) speed-up over fused: "
            f"{sharded['sharded_speedup']:.2f}x (median paired ratio "
            f"{sharded['sharded_speedup_paired']:.2f}x)"
        )
    return dict(
        **sharded,
        n_tasks=n_tasks,
        group_size=group,
        episodes=episodes,
        max_turns=max_turns,
        max_response_tokens=max_resp,
        reps=reps,
        same_trajectories=same,
        fused_speedup=speedup,
        fused_speedup_paired=paired,
        fused_speedup_excl_compile=speedup_net,
        results=results,
    )


def suite_webshop(quick: bool, reps: int | None) -> dict:
    reps = reps or (2 if quick else 3)
    n_goals, group = (2, 4) if quick else (8, 8)
    env = envs.make("webshop", num_goals=2560, test_fraction=0.2)
    tok = env.tokenizer
    c, graphdef, params = tiny_random_model(tok.vocab_size)
    goals = list(env.goals("train"))[:n_goals]
    goal_ids = np.arange(n_goals, dtype=np.int32)
    cfg = RolloutConfig(max_turns=env.max_turns, max_response_tokens=48, temperature=1.0)
    template = make_turn_template(tok, COMPACT_PROMPTS["webshop"], "plain")
    kwargs = dict(
        policy=transformer_policy(graphdef, c),
        env=env,
        template=template,
        cfg=cfg,
        group_size=group,
        vocab=c.vocab_size,
    )
    key = jax.random.key(0)
    blocks = {"budget cache": 0, "grown cache (256)": 256}
    fns = {
        k: functools.partial(rollout_host, params, goals, goal_ids, key, cache_block=v, **kwargs)
        for k, v in blocks.items()
    }
    bufs = {k: jax.block_until_ready(f()) for k, f in fns.items()}  # warm-up: compiles
    ref = bufs["budget cache"]
    same = all(np.array_equal(np.asarray(ref.tokens), np.asarray(b.tokens)) for b in bufs.values())
    times, _ = interleaved(fns, reps)
    gen = int(np.asarray(ref.generated).sum())
    episodes = n_goals * group
    budget = sequence_budget(template, env.max_obs_len, cfg)
    lengths = np.asarray(ref.length)
    rows, results = [], {}
    for k in fns:
        t = statistics.median(times[k])
        results[k] = dict(
            cache_block=blocks[k], time_s=t, tokens_per_s=gen / t, episodes_per_s=episodes / t,
            times_s=times[k],
        )  # fmt: skip
        rows.append([k, f"{t:.1f}", f"{gen / t:.0f}", f"{episodes / t:.2f}"])
    speedup = statistics.median(times["budget cache"]) / statistics.median(
        times["grown cache (256)"]
    )
    paired = paired_ratio(times["budget cache"], times["grown cache (256)"])
    print_table(
        f"webshop: rollout_host, tiny random model, {n_goals} goals x {group} = {episodes} "
        f"episodes, {env.max_turns} turns x 48 tokens, budget {budget} slots, episode lengths "
        f"mean {lengths.mean():.0f} / max {lengths.max()}; median of {reps}; same episodes: {same}",
        ["cache", "s", "gen tok/s", "episodes/s"],
        rows,
    )
    print(f"grown cache speed-up: {speedup:.2f}x (median paired ratio {paired:.2f}x)")
    return dict(
        n_goals=n_goals,
        group_size=group,
        episodes=episodes,
        budget_slots=budget,
        mean_length=float(lengths.mean()),
        max_length=int(lengths.max()),
        generated_tokens=gen,
        reps=reps,
        same_episodes=same,
        speedup=speedup,
        speedup_paired=paired,
        results=results,
    )


# ------------------------------------------------------------------------------------------ main
def environment_info() -> dict:
    """The bench JSON's machine record: :func:`actfocus_jax.provenance.machine_info` (the record
    every run summary carries), under the key names the committed bench files use, plus the date
    and the load average at start (a shared machine's timings are only comparable at low load)."""
    m = machine_info()
    return dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax_version=m["libraries"]["jax"],
        jaxlib_version=m["libraries"]["jaxlib"],
        platform=m["platform"],
        device_kind=m["device_kind"],
        device_count=m["device_count"],
        process_count=m["process_count"],
        cpu_count=m["cpu_count"],
        load_average_at_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        machine=m["arch"],
        processor=platform.processor(),
        python=m["python"],
        xla_flags=m["xla_flags"],
        cpu_model=m["cpu_model"],
        cpu_features=m["cpu_features"],
        libraries=m["libraries"],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--suite", default=",".join(DEFAULT_SUITES), help=f"comma-separated subset of {SUITES}"
    )
    p.add_argument("--out", default=None, help="JSON output path (default: none)")
    p.add_argument("--quick", action="store_true", help="small shapes, few repetitions (< 2 min)")
    p.add_argument("--reps", type=int, default=None, help="override the repetitions per variant")
    p.add_argument(
        "--rollout-mesh",
        default=None,
        help="rollout suite: also time the fused rollout sharded over a mesh of these "
        "DATA[,FSDP[,TENSOR]] sizes (e.g. 4 or 2,2)",
    )
    args = p.parse_args(argv)
    mesh_sizes = None
    if args.rollout_mesh:
        try:
            mesh_sizes = tuple(int(x) for x in args.rollout_mesh.split(","))
        except ValueError:
            mesh_sizes = ()
        if not 1 <= len(mesh_sizes) <= 3:
            p.error(f"--rollout-mesh={args.rollout_mesh!r}: give DATA[,FSDP[,TENSOR]] integers")
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    for s in suites:
        if s not in SUITES:
            p.error(f"unknown suite {s!r}; choose from {SUITES}")
    info = environment_info()
    print(
        f"jax {info['jax_version']} on {info['device_kind']} ({info['platform']}, "
        f"{info['device_count']} device(s), {info['cpu_count']} CPUs, load {info['load_average_at_start']})"
    )
    out: dict[str, Any] = {"environment": info, "quick": args.quick, "suites": {}}
    fns = {
        "actfocus": suite_actfocus,
        "train": suite_train,
        "rollout": suite_rollout,
        "webshop": suite_webshop,
        "unroll": suite_unroll,
        "layout": suite_layout,
        "sft": suite_sft,
        "warmup": suite_warmup,
        "large": suite_large,
    }
    t_all = time.perf_counter()
    for s in suites:
        t0 = time.perf_counter()
        extra = {"mesh_sizes": mesh_sizes} if s == "rollout" else {}
        out["suites"][s] = fns[s](args.quick, args.reps, **extra)
        out["suites"][s]["suite_wall_s"] = time.perf_counter() - t0
    out["total_wall_s"] = time.perf_counter() - t_all
    out["environment"]["load_average_at_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    print(f"\ntotal {out['total_wall_s']:.1f} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
