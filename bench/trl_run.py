"""TRL's side of the comparisons: one training run with ``SFTTrainer``, ``DPOTrainer`` or ``GRPOTrainer``,
written the way TRL's documentation and its ``trl/scripts`` do it.

    python bench/trl_run.py sft  --model DIR --dataset chats.jsonl --output-dir OUT [options]
    python bench/trl_run.py dpo  --model DIR --dataset pairs.jsonl --output-dir OUT [options]
    python bench/trl_run.py grpo --model DIR --dataset prompts.jsonl --output-dir OUT [options]

The data file is read with ``datasets.load_dataset("json", ...)``; the model is given to the
trainer as a folder, so TRL loads it itself; LoRA comes from a ``peft.LoraConfig`` on every
linear layer; the run ends with ``trainer.save_model()``, as tunesmith ends by writing
``OUT/final``. Without CUDA it sets ``use_cpu=True``, which TRL's default ``bf16=True`` requires
on a CPU (it refuses to start otherwise). Every option not given here is the trainer config's default
(``SFTConfig``/``DPOConfig``/``GRPOConfig`` of TRL 1.16), ``report_to`` aside ("none").
The harness runs this as its own process, like ``tunesmith``.
"""

from __future__ import annotations

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trainer", choices=["sft", "dpo", "grpo"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-length", type=int, help="sft, dpo: per sequence (DPO: prompt + one response)")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: one epoch")
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--lr-scheduler", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--lora-rank", type=int, required=True)
    parser.add_argument("--lora-alpha", type=int, required=True)
    parser.add_argument("--lora-dropout", type=float, required=True)
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="gradient_checkpointing=False (TRL's default is True)")
    parser.add_argument("--packing", action="store_true", help="sft: SFTConfig(packing=True)")
    parser.add_argument("--beta", type=float, help="dpo, grpo")
    parser.add_argument("--num-generations", type=int, help="grpo")
    parser.add_argument("--max-completion-length", type=int, help="grpo")
    parser.add_argument("--temperature", type=float, help="grpo")
    args = parser.parse_args()
    dataset = load_dataset("json", data_files=args.dataset, split="train")
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(
        output_dir=args.output_dir, report_to="none", per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        max_steps=args.max_steps, learning_rate=args.learning_rate, lr_scheduler_type=args.lr_scheduler, seed=args.seed,
        # without CUDA, TRL's default bf16=True is refused ("Your setup doesn't support bf16/gpu") unless use_cpu is set
        use_cpu=not torch.cuda.is_available(),
    )
    if args.no_gradient_checkpointing:
        common["gradient_checkpointing"] = False
    trainer = TRAINERS[args.trainer](args, common, dataset, lora)
    trainer.train()
    trainer.save_model()


def sft(args, common, dataset, lora):
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**common, max_length=args.max_length, packing=args.packing)
    return SFTTrainer(model=args.model, args=config, train_dataset=dataset, peft_config=lora)


def dpo(args, common, dataset, lora):
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**common, max_length=args.max_length, beta=args.beta)
    return DPOTrainer(model=args.model, args=config, train_dataset=dataset, peft_config=lora)


def grpo(args, common, dataset, lora):
    from length_reward import length_reward
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(**common, beta=args.beta, num_generations=args.num_generations,
                        max_completion_length=args.max_completion_length, temperature=args.temperature)
    return GRPOTrainer(model=args.model, reward_funcs=[length_reward], args=config, train_dataset=dataset, peft_config=lora)


TRAINERS = {"sft": sft, "dpo": dpo, "grpo": grpo}


if __name__ == "__main__":
    main()
