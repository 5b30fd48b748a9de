"""TRL's GRPO policy update on CPU PyTorch as a peer-benchmark worker (runs in ``runs/peer_venvs/trl``).

Uses TRL's public API: a ``GRPOTrainer`` built around a ``transformers`` ``Qwen2ForCausalLM`` made
from a ``Qwen2Config`` of the benchmark shape (random weights, float32, SDPA attention), an offline
word-level tokenizer, a dummy reward function and a one-column prompt dataset (needed by the
constructor only: nothing is generated). One step is what the Hugging Face training loop does with a
prepared GRPO batch: ``trainer.compute_loss(model, inputs)`` (TRL's GRPO loss: per-token log-probs
of the completion via TRL's fused LM head, clipped ratio against the given old log-probs,
``loss_type="bnpo"`` = token mean over the batch, beta = 0 so no reference model), then
``accelerator.backward``, ``accelerator.clip_grad_norm_`` and the trainer's own AdamW
(``create_optimizer()``) ``step`` / ``zero_grad``. Gradient (activation) checkpointing, which
``GRPOConfig`` turns on by default, is switched off so that every framework does one forward and one backward.
"""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import worker_common


def build(spec: dict[str, Any], inputs: dict[str, np.ndarray]):
    from importlib import metadata

    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(spec["seed"])
    m, o, a, bt = spec["model"], spec["optim"], spec["algo"], spec["batch"]
    v = m["vocab_size"]
    pad_id, eos_id = int(spec["pad_id"]), int(spec["eos_id"])
    vocab = {f"t{i}": i for i in range(v)}
    tok = Tokenizer(WordLevel(vocab, unk_token=f"t{v - 1}"))
    tok.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=f"t{pad_id}", eos_token=f"t{eos_id}", unk_token=f"t{v - 1}"
    )
    config = Qwen2Config(
        vocab_size=v,
        hidden_size=m["d_model"],
        intermediate_size=m["mlp_dim"],
        num_hidden_layers=m["n_layers"],
        num_attention_heads=m["n_heads"],
        num_key_value_heads=m["n_kv_heads"],
        head_dim=m["head_dim"],
        rms_norm_eps=m["rms_norm_eps"],
        rope_theta=float(m["rope_theta"]),
        tie_word_embeddings=m["tie_embeddings"],
        max_position_embeddings=max(2048, bt["prompt_len"] + bt["completion_len"]),
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).to(torch.float32)
    b = bt["batch_size"]
    args = GRPOConfig(
        output_dir=spec["trl_output_dir"],
        per_device_train_batch_size=b,
        gradient_accumulation_steps=1,
        num_generations=a["group_size"],
        max_completion_length=bt["completion_len"],
        beta=0.0,
        loss_type="bnpo",
        epsilon=a["clip_eps"],
        num_iterations=1,
        learning_rate=o["learning_rate"],
        adam_beta1=o["b1"],
        adam_beta2=o["b2"],
        adam_epsilon=o["eps"],
        weight_decay=o["weight_decay"],
        max_grad_norm=o["max_grad_norm"],
        lr_scheduler_type="constant",
        bf16=False,
        fp16=False,
        use_cpu=True,
        activation_checkpointing=False,  # alias gradient_checkpointing: TRL's default is True
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        seed=spec["seed"],
    )
    dataset = Dataset.from_dict({"prompt": ["t2 t3 t4"] * b})
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the HF training loop
    optimizer = trainer.create_optimizer()
    model = trainer.model
    model.train()
    prompt = torch.as_tensor(inputs["prompt_ids"], dtype=torch.long)
    comp = torch.as_tensor(inputs["completion_ids"], dtype=torch.long)
    cmask = torch.as_tensor(inputs["completion_mask"], dtype=torch.long)
    batch = {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": comp,
        "completion_mask": cmask,
        "advantages": torch.as_tensor(inputs["advantages"], dtype=torch.float32),
        "old_per_token_logps": torch.as_tensor(inputs["old_logp"], dtype=torch.float32),
        "num_items_in_batch": cmask.sum(),
    }

    def step() -> float:
        loss = trainer.compute_loss(model, batch)
        trainer.accelerator.backward(loss)
        trainer.accelerator.clip_grad_norm_(model.parameters(), o["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    info = dict(
        framework="trl",
        version=metadata.version("trl"),
        libraries={k: metadata.version(k) for k in ("torch", "transformers", "accelerate")},
        torch_threads=torch.get_num_threads(),
        optimizer=type(optimizer).__name__,
        attn_implementation=model.config._attn_implementation,
        activation_checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)),
        n_params=int(sum(p.numel() for p in model.parameters())),
    )
    return step, info


if __name__ == "__main__":
    sys.exit(worker_common.serve("trl", build))
