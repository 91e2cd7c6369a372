"""Packed rows: tunesmith's ``packed_sdpa`` attention next to transformers' ``sdpa``, same batches.

Given packed rows (position ids restarting at each sample, no attention mask), transformers'
``sdpa`` builds a block-diagonal (B, 1, L, L) mask and attends over the whole of each row;
``packed_sdpa`` (``tunesmith.packed_attention``) attends within each sample, with no mask. Both
run here in one process on one model: SmolLM2-135M in bf16 with a rank-8 LoRA adapter on every
linear layer, under bf16 autocast, as ``tunesmith sft`` trains it on a CPU. The data is
``harness.chats`` packed into rows of ``--max-length`` tokens (a chat longer than a row is left
out), ``--tokens-per-step`` tokens a batch. Each batch's forward and backward pass runs once with each attention, the order flipped
every batch. Printed: tokens per second of each, their ratio, and the largest difference
between the two losses of a batch (they are the same function of the weights).

Run from the repository root with the repository installed (``make install``):

    .venv/bin/python bench/packed_attention.py --json bench/results/packed_attention_2048.json
    .venv/bin/python bench/packed_attention.py --max-length 512 --json bench/results/packed_attention_512.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import harness
import torch

from tunesmith.data.collate import collate_causal
from tunesmith.data.packing import pack
from tunesmith.data.tokenize import tokenize_chat
from tunesmith.losses import causal_lm_loss
from tunesmith.models import apply_adapter, load_model, load_tokenizer
from tunesmith.packed_attention import PACKED_SDPA

IMPLEMENTATIONS = (PACKED_SDPA, "sdpa")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model alias or folder [default: %(default)s]")
    parser.add_argument("--rows", type=int, default=120, help="generated chats [default: %(default)s]")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens a packed row holds [default: %(default)s]")
    parser.add_argument("--tokens-per-step", type=int, default=2048, help="tokens a batch holds [default: %(default)s]")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)

    folder = harness.model_folder(args.model)
    tokenizer = load_tokenizer(folder)
    model = apply_adapter(load_model(folder, dtype=torch.bfloat16), "lora", lora_rank=8).train()
    samples = [tokenize_chat(tokenizer, row["messages"]) for row in harness.chats(args.rows)]
    samples = [sample for sample in samples if len(sample) <= args.max_length]
    rows = pack(samples, max_length=args.max_length)
    size = max(1, args.tokens_per_step // args.max_length)
    batches = [collate_causal(rows[start : start + size], tokenizer.pad_token_id) for start in range(0, len(rows), size)]

    seconds = dict.fromkeys(IMPLEMENTATIONS, 0.0)
    largest_difference = 0.0
    step(model, batches[0], PACKED_SDPA)  # warm-up, not timed
    for index, batch in enumerate(batches):
        losses = {}
        for name in IMPLEMENTATIONS if index % 2 == 0 else reversed(IMPLEMENTATIONS):
            started = time.perf_counter()
            losses[name] = step(model, batch, name)
            seconds[name] += time.perf_counter() - started
        largest_difference = max(largest_difference, abs(losses[PACKED_SDPA] - losses["sdpa"]) / max(abs(losses["sdpa"]), 1e-9))

    tokens = sum(batch["num_input_tokens"] for batch in batches)
    result = {
        "max_length": args.max_length, "rows_per_batch": size, "batches": len(batches), "tokens": tokens,
        "samples_per_row": round(len(samples) / len(rows), 2),
        "tokens_per_s": {name: round(tokens / seconds[name], 1) for name in IMPLEMENTATIONS},
        "speedup": round(seconds["sdpa"] / seconds[PACKED_SDPA], 2),
        "largest_relative_loss_difference": largest_difference,
        "machine": harness.machine(),
    }
    print(f"rows of {args.max_length} tokens, {size} a batch, {len(batches)} batches, {tokens} tokens, "
          f"{result['samples_per_row']} samples a row")
    for name in IMPLEMENTATIONS:
        print(f"  {name:12} {result['tokens_per_s'][name]:8.1f} tokens/s   ({seconds[name]:.1f} s)")
    print(f"  packed_sdpa/sdpa throughput: {result['speedup']:.2f}x; largest relative loss difference {largest_difference:.1e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def step(model, batch: dict, implementation: str) -> float:
    """One forward and backward pass of ``batch`` with ``implementation``; its summed loss."""
    model.get_base_model().set_attn_implementation(implementation)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    return loss.item()


if __name__ == "__main__":
    main()
