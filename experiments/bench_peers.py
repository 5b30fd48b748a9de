"""Side-by-side GRPO policy-update step: ours vs Google's Tunix vs Hugging Face TRL (CPU).

Run: ``python -m experiments.bench_peers [--skip-install] [--reps N] [--warmup N] [--peers ours,tunix,trl]``.

What is timed (the same algorithmic work in every framework): **one policy update on a given batch**
of ``B`` rows of ``prompt_len + completion_len`` tokens (prompt ids, completion ids right-padded with
``pad_id``, completion mask, per-row advantages, old per-token log-probs of the completion) for a
Qwen2-style decoder with random weights: one forward + backward over the whole batch (1 minibatch,
no gradient accumulation, no gradient checkpointing / remat), the clipped GRPO surrogate against the
*given* old log-probs (not recomputed), no reference model and no KL term (beta = 0), global-norm
gradient clipping, one AdamW update (same learning rate, betas, epsilon, weight decay 0). No
generation. Throughput convention: **trained tokens/s = B x (prompt_len + completion_len) / step
time** (all tokens of a row, padding included, as every framework runs the model over all of them).

* ``ours``: ``actfocus_jax.rl.train_step.train_step`` (GRPO, ActFocus off; ``--ours-actfocus`` turns
  it on), in the project's interpreter (``experiments/peers/worker_ours.py``).
* ``ours-full-attention``: the same, with the decoder's causal block attention replaced by the
  plain full ``[B, K, G, T, T]`` attention it used before (an ablation measured in the same run).
* ``ours-unrolled``: ``ours`` with the layer scan fully unrolled (``ModelConfig.scan_unroll =
  n_layers``; ``--config.model.scan_unroll`` in the trainer).
* ``tunix``: ``google-tunix``'s registered GRPO policy loss + its RL actor trainer's jitted train step
  on ``tunix.models.qwen2.Qwen2`` (``experiments/peers/worker_tunix.py``), in its own virtual
  environment ``runs/peer_venvs/tunix`` (CPU jax).
* ``trl``: ``trl.GRPOTrainer.compute_loss`` + backward + the trainer's AdamW on a
  ``transformers.Qwen2ForCausalLM``, CPU PyTorch (``experiments/peers/worker_trl.py``), in
  ``runs/peer_venvs/trl``.

Peer libraries are never project dependencies: this script creates the virtual environments under
``runs/peer_venvs/`` (git-ignored) with pip, unless ``--skip-install``.

Timing method: every framework runs in its own long-lived worker process that builds its model and
optimiser, compiles / warms up (``--warmup`` untimed steps), then waits on stdin. The coordinator
then asks for one timed step at a time, interleaved across the workers (round ``r`` runs the
frameworks in an order rotated by ``r``: A,B,C / B,C,A / C,A,B ...), so only one framework computes
at any moment and slow drifts of the machine's load hit all of them alike. It records the 1-minute
load average before and after every step. The table reports the median step time, tokens/s, and
``ours / theirs`` = our tokens/s divided by theirs (> 1: ours is faster), plus the median of the
per-round ratios (the most noise-robust number on a shared machine).

Writes ``experiments/results/bench_peers_cpu.json`` (date, CPU count and model, load averages,
versions, the spec, every repetition, and the exact error of any peer that could not run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from actfocus_jax.provenance import cpu_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS_DIR = os.path.join(REPO, "experiments", "peers")
PEERS = ("ours", "ours-unrolled", "ours-full-attention", "tunix", "trl")
#: worker script and ``--variant`` of each framework name.
WORKER_SCRIPTS = {
    "ours": ("worker_ours.py", ""),
    "ours-full-attention": ("worker_ours.py", "full-attention"),
    "ours-unrolled": ("worker_ours.py", "unrolled"),
    "tunix": ("worker_tunix.py", ""),
    "trl": ("worker_trl.py", ""),
}
#: frameworks that run in the project's own interpreter (nothing to install).
OWN = ("ours", "ours-unrolled", "ours-full-attention")
DEFAULT_OUT = os.path.join("experiments", "results", "bench_peers_cpu.json")

#: pip requirement sets of the peer virtual environments (installed in this order, one pip call per
#: entry). torch is pinned to the CPU wheel first so that nothing pulls a CUDA build.
PEER_REQUIREMENTS: dict[str, list[list[str]]] = {
    "tunix": [["google-tunix==0.1.7", "jax[cpu]"]],
    "trl": [["torch==2.13.0"], ["torch==2.13.0", "trl", "transformers"]],
}
#: fallback when the pinned version cannot be installed.
PEER_FALLBACK: dict[str, list[list[str]]] = {"tunix": [["google-tunix", "jax[cpu]"]]}
#: distributions whose installed versions are recorded.
PEER_PACKAGES = {
    "ours": ["jax", "jaxlib", "flax", "optax"],
    "ours-full-attention": ["jax", "jaxlib", "flax", "optax"],
    "ours-unrolled": ["jax", "jaxlib", "flax", "optax"],
    "tunix": ["google-tunix", "jax", "jaxlib", "flax", "optax"],
    "trl": ["trl", "transformers", "torch", "accelerate"],
}


# ------------------------------------------------------------------------------ pure helpers
def default_spec(
    batch_size: int = 32,
    prompt_len: int = 128,
    completion_len: int = 384,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Shapes and hyper-parameters shared by every worker (the issue's reference shape)."""
    return dict(
        model=dict(
            n_layers=4,
            d_model=256,
            mlp_dim=704,
            n_heads=8,
            n_kv_heads=2,
            head_dim=32,
            vocab_size=512,
            rope_theta=10000,
            rms_norm_eps=1e-6,
            qkv_bias=True,
            tie_embeddings=True,
            dtype="float32",
        ),
        batch=dict(batch_size=batch_size, prompt_len=prompt_len, completion_len=completion_len),
        optim=dict(
            name="adamw",
            learning_rate=1e-6,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            max_grad_norm=1.0,
        ),
        algo=dict(
            group_size=8,
            clip_eps=0.2,
            beta=0.0,
            adv_eps=1e-6,
            loss_agg="token-mean",
            num_minibatches=1,
            old_logp="given (not recomputed)",
            reference_model=False,
        ),
        pad_id=0,
        eos_id=1,
        warmup=warmup,
        seed=seed,
    )


def grpo_advantages_np(rewards: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """GRPO advantages ``(R - mean_g) / (std_g + eps)``, unbiased group std (ours / TRL convention)."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1).astype(np.float32)


def make_inputs(spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """A deterministic batch: full prompts, completions of random length in ``[C/2, C]`` (right-padded
    with ``pad_id``), rewards per row (groups of ``group_size``), their GRPO advantages, and old
    log-probs of the completion tokens (0 at padding)."""
    bt = spec["batch"]
    b, p, c = bt["batch_size"], bt["prompt_len"], bt["completion_len"]
    v, pad, g = spec["model"]["vocab_size"], spec["pad_id"], spec["algo"]["group_size"]
    if b % g:
        raise ValueError(f"batch_size {b} is not a multiple of group_size {g}")
    rng = np.random.default_rng(spec["seed"])
    lo = 2  # ids 0 / 1 are pad / eos: never inside a sequence
    prompt = rng.integers(lo, v, (b, p)).astype(np.int32)
    comp = rng.integers(lo, v, (b, c)).astype(np.int32)
    lengths = rng.integers(c // 2, c + 1, b)
    mask = (np.arange(c)[None, :] < lengths[:, None]).astype(np.int32)
    comp = np.where(mask > 0, comp, pad).astype(np.int32)
    rewards = rng.normal(size=b).astype(np.float32)
    old_logp = (-rng.uniform(0.05, 4.0, (b, c)) * mask).astype(np.float32)
    return dict(
        prompt_ids=prompt,
        completion_ids=comp,
        completion_mask=mask,
        rewards=rewards,
        advantages=grpo_advantages_np(rewards, g, spec["algo"]["adv_eps"]),
        old_logp=old_logp,
    )


def tokens_per_s(batch_size: int, seq_len: int, seconds: float) -> float:
    """Trained tokens per second: ``batch_size * seq_len / seconds`` (all tokens of every row)."""
    return batch_size * seq_len / seconds


def throughput_ratio(ours_s: float, theirs_s: float) -> float:
    """Our throughput over theirs for the same work: ``theirs_s / ours_s`` (> 1: ours is faster)."""
    return theirs_s / ours_s


def rotated(names: list[str], r: int) -> list[str]:
    """The order of round ``r``: ``names`` rotated left by ``r``."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def paired_ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """Per-round throughput ratios ``theirs_i / ours_i`` (same round, adjacent in time)."""
    return [throughput_ratio(a, b) for a, b in zip(ours, theirs, strict=True)]


def summary_rows(results: dict[str, dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """One row per framework: median step, tokens/s and ratios against ``ours`` (if it ran)."""
    ours = results.get("ours", {}).get("times_s") or []
    rows = []
    for name, r in results.items():
        times = r.get("times_s") or []
        row: dict[str, Any] = dict(
            framework=name, version=r.get("version"), ok=bool(times), error=r.get("error")
        )
        if times:
            med = statistics.median(times)
            row.update(step_ms_median=1e3 * med, tokens_per_s=tokens / med)
            row["step_ms_min"] = 1e3 * min(times)
            if ours and name != "ours" and len(ours) == len(times):
                row["ours_over_theirs"] = throughput_ratio(statistics.median(ours), med)
                row["ours_over_theirs_paired_median"] = statistics.median(
                    paired_ratios(ours, times)
                )
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`summary_rows`."""
    header = ["framework", "version", "step ms (median)", "step ms (min)", "tokens/s"]
    header += ["ours/theirs", "paired ours/theirs"]
    cells = [header]
    for r in rows:
        if not r["ok"]:
            err = (r.get("error") or "did not run").splitlines()[0][:80]
            cells.append([r["framework"], str(r.get("version")), "failed: " + err, "", "", "", ""])
            continue
        ratio = r.get("ours_over_theirs")
        paired = r.get("ours_over_theirs_paired_median")
        cells.append(
            [
                r["framework"],
                str(r.get("version")),
                f"{r['step_ms_median']:.1f}",
                f"{r['step_ms_min']:.1f}",
                f"{r['tokens_per_s']:.0f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                "-" if paired is None else f"{paired:.2f}x",
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(s.rjust(w) for s, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# --------------------------------------------------------------------------------- installs
def venv_python(venv_dir: str, name: str) -> str:
    return os.path.join(venv_dir, name, "bin", "python")


def _pip(py: str, reqs: list[str], log) -> int:
    cmd = [py, "-m", "pip", "install", *reqs]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)


def install_peer(name: str, venv_dir: str) -> dict[str, Any]:
    """Creates ``venv_dir/name`` and pip-installs the peer there; returns what happened."""
    path = os.path.join(venv_dir, name)
    os.makedirs(venv_dir, exist_ok=True)
    log_path = os.path.join(venv_dir, f"{name}_install.log")
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        if not os.path.exists(venv_python(venv_dir, name)):
            subprocess.check_call([sys.executable, "-m", "venv", path], stdout=log, stderr=log)
        py = venv_python(venv_dir, name)
        ok = True
        used = PEER_REQUIREMENTS[name]
        for reqs in used:
            if _pip(py, reqs, log) != 0:
                ok = False
                break
        if not ok and name in PEER_FALLBACK:
            used, ok = PEER_FALLBACK[name], True
            for reqs in used:
                if _pip(py, reqs, log) != 0:
                    ok = False
                    break
    return dict(ok=ok, requirements=used, log=log_path, seconds=time.perf_counter() - t0)


def installed_versions(py: str, packages: list[str]) -> dict[str, str | None]:
    code = (
        "import json, sys\nfrom importlib import metadata\nout = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n        out[p] = metadata.version(p)\n"
        "    except metadata.PackageNotFoundError:\n        out[p] = None\n"
        "print(json.dumps(out))"
    )
    try:
        res = subprocess.run(
            [py, "-c", code, *packages], capture_output=True, text=True, timeout=120
        )
        return json.loads(res.stdout.strip().splitlines()[-1])
    except Exception as e:  # a broken venv: report, do not crash
        return {"error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------- workers
class Worker:
    """A worker subprocess speaking ``experiments/peers/worker_common.py``'s line protocol."""

    def __init__(self, name: str, python: str, spec_path: str, inputs_path: str, log_path: str):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("PYTHONPATH", None)
        script, variant = WORKER_SCRIPTS[name]
        self.proc = subprocess.Popen(
            [
                python,
                os.path.join(WORKERS_DIR, script),
                "--spec",
                spec_path,
                "--inputs",
                inputs_path,
                "--variant",
                variant,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
            env=env,
        )
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                self._q.put(json.loads(line[2:]))
            else:  # library chatter on stdout goes to the log
                self._log.write(line)
                self._log.flush()
        self._q.put(None)

    def recv(self, timeout: float) -> dict[str, Any]:
        try:
            msg = self._q.get(timeout=timeout)
        except queue.Empty:
            return dict(event="error", error=f"no answer within {timeout:.0f} s")
        if msg is None:
            return dict(event="error", error=f"worker exited (code {self.proc.wait()})")
        return msg

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def stderr_tail(self, n: int = 30) -> str:
        self._log.flush()
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
        self._log.close()


# ------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p not in PEERS:
            raise SystemExit(f"unknown peer {p!r}; choose from {PEERS}")
    os.makedirs(args.workdir, exist_ok=True)
    spec = default_spec(args.batch, args.prompt_len, args.completion_len, args.warmup, args.seed)
    spec["ours_actfocus"] = args.ours_actfocus
    spec["trl_output_dir"] = os.path.abspath(os.path.join(args.workdir, "trl_output"))
    inputs = make_inputs(spec)
    spec_path = os.path.abspath(os.path.join(args.workdir, "spec.json"))
    inputs_path = os.path.abspath(os.path.join(args.workdir, "inputs.npz"))
    with open(spec_path, "w") as f:
        json.dump(spec, f, indent=1)
    np.savez(inputs_path, **inputs)
    seq = args.prompt_len + args.completion_len
    tokens = args.batch * seq

    out: dict[str, Any] = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command="python -m experiments.bench_peers " + " ".join(sys.argv[1:]),
        machine=dict(
            cpu_count=os.cpu_count(),
            cpu_model=cpu_model(),
            platform=platform.platform(),
            python=sys.version.split()[0],
        ),
        load_average_at_start=loadavg(),
        spec=spec,
        throughput_convention="trained tokens/s = batch_size * (prompt_len + completion_len) / step",
        tokens_per_step=tokens,
        completion_tokens_per_step=int(inputs["completion_mask"].sum()),
        reps=args.reps,
        install={},
        frameworks={},
    )
    venv_dir = os.path.abspath(args.venv_dir)
    pythons = {p: sys.executable for p in OWN}
    for p in peers:
        if p in OWN:
            continue
        pythons[p] = venv_python(venv_dir, p)
        if not args.skip_install:
            print(f"installing {p} into {os.path.join(venv_dir, p)} ...", flush=True)
            out["install"][p] = install_peer(p, venv_dir)
            if not out["install"][p]["ok"]:
                print(f"  pip failed; see {out['install'][p]['log']}", flush=True)

    # Start the workers one after the other (build + compile + warm-up alone on the CPUs).
    workers: dict[str, Worker] = {}
    for p in peers:
        rec: dict[str, Any] = dict(times_s=[], load_before=[], load_after=[], order_index=[])
        out["frameworks"][p] = rec
        rec["versions"] = installed_versions(pythons[p], PEER_PACKAGES[p])
        if not os.path.exists(pythons[p]):
            rec["error"] = f"no interpreter at {pythons[p]} (install failed or --skip-install)"
            print(f"{p}: {rec['error']}", flush=True)
            continue
        print(f"starting {p} (build, compile, {args.warmup} warm-up steps) ...", flush=True)
        t0 = time.perf_counter()
        w = Worker(p, pythons[p], spec_path, inputs_path, os.path.join(args.workdir, f"{p}.log"))
        msg = w.recv(args.ready_timeout)
        rec["startup_s"] = time.perf_counter() - t0
        if msg.get("event") != "ready":
            rec["error"] = msg.get("error", str(msg))
            rec["traceback"] = msg.get("traceback") or w.stderr_tail()
            print(f"  {p} failed: {rec['error']}", flush=True)
            w.close()
            continue
        rec.update({k: v for k, v in msg.items() if k not in ("event", "name")})
        print(
            f"  ready in {rec['startup_s']:.1f} s (warm-up steps: "
            f"{', '.join(f'{s:.2f}' for s in msg.get('warmup_s', []))} s)",
            flush=True,
        )
        workers[p] = w

    # Timed rounds, interleaved.
    names = list(workers)
    for r in range(args.reps):
        for p in rotated(names, r):
            if p not in workers:
                continue
            rec = out["frameworks"][p]
            rec["load_before"].append(loadavg())
            workers[p].send("step")
            msg = workers[p].recv(args.step_timeout)
            rec["load_after"].append(loadavg())
            if msg.get("event") != "step":
                rec["error"] = msg.get("error", str(msg))
                rec["traceback"] = msg.get("traceback") or workers[p].stderr_tail()
                print(f"  {p} failed during the timed steps: {rec['error']}", flush=True)
                workers.pop(p).close()
                rec["times_s"] = []
                continue
            rec["times_s"].append(msg["seconds"])
            rec.setdefault("losses", []).append(msg["loss"])
            rec["order_index"].append(rotated(names, r).index(p))
        done = {p: f"{out['frameworks'][p]['times_s'][-1]:.2f}s" for p in workers}
        print(f"round {r + 1}/{args.reps}: {done}  load {loadavg()}", flush=True)
    for w in workers.values():
        w.close()

    for p, rec in out["frameworks"].items():
        rec.setdefault("version", (rec.get("versions") or {}).get(PEER_PACKAGES[p][0]))
    out["load_average_at_end"] = loadavg()
    out["summary"] = summary_rows(out["frameworks"], tokens)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {PEERS}")
    p.add_argument("--reps", type=int, default=7, help="timed steps per framework (interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework first")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--completion-len", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours-actfocus", action="store_true", help="time ActFocus-GRPO for ours")
    p.add_argument("--skip-install", action="store_true", help="reuse the peer venvs as they are")
    p.add_argument("--venv-dir", default=os.path.join("runs", "peer_venvs"))
    p.add_argument("--workdir", default=os.path.join("runs", "bench_peers"))
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output ('' for none)")
    p.add_argument("--ready-timeout", type=float, default=1800.0)
    p.add_argument("--step-timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = run(args)
    out["total_wall_s"] = time.perf_counter() - t0
    b, seq = args.batch, args.prompt_len + args.completion_len
    print(
        f"\n== GRPO policy update, Qwen2-style 4x256 (MLP 704, 8/2 heads of 32, vocab 512, tied), "
        f"float32, batch {b} x {seq} tokens ({args.prompt_len} prompt + {args.completion_len} "
        f"completion), AdamW, 1 minibatch, beta 0; median of {args.reps} interleaved steps; "
        f"tokens/s = B*L/step; load {out['load_average_at_start']} -> {out['load_average_at_end']}"
    )
    print(format_table(out["summary"]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
