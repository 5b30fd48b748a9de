"""Demo: sample from the tiny embedded policy and check the recorded log-probs against ``score``.

Run as ``python -m experiments.generate``. Builds the embedded word-level tokenizer and the ``tiny``
model (random init), generates a sampled continuation of a short Sokoban-like prompt for a small
batch (KV cache, ``lax.while_loop``), prints the text and a per-token log-prob / entropy summary, and
re-scores the sequences with :func:`actfocus_jax.models.score` to show that both agree.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from actfocus_jax.models import generate, get_config, init_model, score
from actfocus_jax.text import build_embedded_tokenizer

PROMPTS = (
    "You are a Sokoban agent . Push the box onto the target .\n"
    "# # # # # #\n# _ P _ _ #\n# _ X _ _ #\n# _ O _ _ #\n# # # # # #\n"
    "your move ?\n",
    "Push the box onto the target .\n# # # # #\n# P X O #\n# # # # #\nyour move ?\n",
    "your move ?\n",
    "You are a Sokoban agent .\n# # # #\n# O X #\n# _ P #\n# # # #\n",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    jax.config.update("jax_default_matmul_precision", "highest")
    tok = build_embedded_tokenizer()
    config = get_config("tiny")
    model = init_model(config, seed=args.seed)
    print(
        f"tiny model: {config.num_params():,} params, vocab {config.vocab_size} "
        f"(tokenizer {tok.vocab_size}), {config.n_layers} layers, d_model {config.d_model}"
    )

    # Left-padded prompt batch.
    encoded = [tok.encode(p) for p in PROMPTS]
    width = max(map(len, encoded))
    ids = np.full((len(encoded), width), tok.pad_id, np.int32)
    mask = np.zeros((len(encoded), width), bool)
    for r, e in enumerate(encoded):
        ids[r, width - len(e) :], mask[r, width - len(e) :] = e, True

    out = generate(
        model,
        ids,
        jax.random.key(args.seed),
        max_new_tokens=args.max_new_tokens,
        prompt_mask=mask,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop_ids=[tok.eos_id],
        pad_id=tok.pad_id,
    )
    gen_mask = np.asarray(out.mask)
    full = np.concatenate([ids, np.asarray(out.tokens)], 1)
    logp, ent = score(model, full, np.concatenate([mask, gen_mask], 1), args.temperature)
    logp, ent = np.asarray(logp)[:, width:], np.asarray(ent)[:, width:]
    for r in range(len(PROMPTS)):
        n = int(out.lengths[r])
        text = tok.decode(np.asarray(out.tokens[r, :n]))
        print(
            f"\n--- row {r}: {len(encoded[r])} prompt tokens, {n} generated, done={bool(out.done[r])}"
        )
        print(f"prompt tail: {tok.decode(encoded[r][-6:])!r}")
        print(f"sampled    : {text!r}")
        lp = np.asarray(out.logp[r, :n])
        print(
            f"log-prob mean {lp.mean():.3f} min {lp.min():.3f}; "
            f"entropy mean {np.asarray(out.entropy[r, :n]).mean():.3f} "
            f"(uniform: {np.log(config.vocab_size):.3f})"
        )
    err_lp = float(np.abs(logp - np.asarray(out.logp))[gen_mask].max())
    err_ent = float(np.abs(ent - np.asarray(out.entropy))[gen_mask].max())
    print(f"\nscore vs generate: max |dlogp| = {err_lp:.2e}, max |dentropy| = {err_ent:.2e}")
    if err_lp > 1e-4 or err_ent > 1e-4:
        raise SystemExit("log-probs recorded at sampling time disagree with score()")
    print(f"ok ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
