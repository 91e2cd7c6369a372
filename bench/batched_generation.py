"""Batched rollout generation: tunesmith's ``generate_batch`` next to transformers' ``generate``.

A GRPO step generates ``n`` completions of every prompt in a batch. Both sides do that here
for the same prompts, in one batch each, built in memory with nothing downloaded: a
transformers ``LlamaForCausalLM`` shaped like SmolLM2-135M with random fp32 weights.

(a) peer      - what TRL's transformers path does: the prompts left-padded into one batch and
                ``model.generate(..., num_return_sequences=n)``, which repeats every prompt
                ``n`` times before the first forward pass.
(b) tunesmith - ``generate_batch(..., num_return_sequences=n)``: the same batch, but each
                prompt is prefilled once and its KV cache repeated ``n`` times; sampling draws
                from an explicit ``torch.Generator``.

Sampled runs generate ``n`` completions per prompt; greedy runs one (transformers refuses
``num_return_sequences`` above 1 without sampling) and also say whether the two produced the
same tokens. Random weights rarely emit an end token, so every completion runs to
``--new-tokens`` and both sides do the same number of steps. The two alternate in one
invocation, the order flipped every repetition; medians are printed as new tokens per second.

Run from the repository root with the repository installed (``make install``):

    .venv/bin/python bench/batched_generation.py
    .venv/bin/python bench/batched_generation.py --prompts 16 --n 8 --prompt-tokens 256 --new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.generation import GenerationOptions, generate_batch

PAD, EOS = 2, 2


def smollm2_sized_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=EOS, pad_token_id=PAD,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


class IdsTokenizer:
    """Just what generate_batch asks of a tokenizer, for prompts that are token ids already."""

    pad_token_id = PAD
    eos_token_id = EOS
    unk_token_id = None

    def convert_tokens_to_ids(self, token: str) -> None:
        return None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def prompts_of_varied_length(count: int, longest: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = [max(1, longest * (i + 1) // count) for i in range(count)]
    return [torch.randint(3, 49152, (length,), generator=generator).tolist() for length in lengths]


def peer(model, prompts: list[list[int]], n: int, new_tokens: int, sample: bool) -> list[list[int]]:
    width = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            num_return_sequences=n, pad_token_id=PAD, eos_token_id=EOS, **sampling,
        )
    return output[:, width:].tolist()


def ours(model, prompts: list[list[int]], n: int, new_tokens: int, sample: bool) -> list[list[int]]:
    options = GenerationOptions(max_new_tokens=new_tokens, temperature=1.0 if sample else 0.0)
    completions = generate_batch(model, IdsTokenizer(), prompts, options, num_return_sequences=n, generator=torch.Generator().manual_seed(0))
    return [c.token_ids for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="completions per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="the longest prompt; the others are shorter")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    model = smollm2_sized_model()
    prompts = prompts_of_varied_length(args.prompts, args.prompt_tokens)
    print(f"{args.prompts} prompts of up to {args.prompt_tokens} tokens, {args.n} completions each, {args.new_tokens} new tokens; "
          f"{torch.get_num_threads()} threads")
    for sample in (False, True):
        n = args.n if sample else 1
        generated = args.prompts * n * args.new_tokens
        times = {"peer": [], "tunesmith": []}
        outputs = {}
        for repetition in range(args.repeat):
            order = [("peer", peer), ("tunesmith", ours)]
            for name, run in order if repetition % 2 == 0 else reversed(order):
                start = time.perf_counter()
                outputs[name] = run(model, prompts, n, args.new_tokens, sample)
                times[name].append(time.perf_counter() - start)
        mode = f"sampled, {n} per prompt" if sample else "greedy"
        for name, seconds in times.items():
            median = statistics.median(seconds)
            print(f"{mode:21} {name:10} {median:7.2f} s  {generated / median:8.1f} new tokens/s")
        if not sample:
            print(f"{mode:21} same tokens: {'yes' if outputs['peer'] == outputs['tunesmith'] else 'no'}")


if __name__ == "__main__":
    main()
