"""Padding in ``tunesmith sft``'s batches: the share of the positions a step runs that hold no token.

The SFT comparison's data (``harness.chats``, the model's chat template, ``--max-length``,
``--batch-size`` rows a micro-batch) goes through tunesmith's own data pipeline and step order,
as ``tunesmith sft`` builds them (``build_training_data``, ``DatasetSteps``), and each micro-batch
of one epoch is collated as the engine collates it. Counted for each batching: rows in a random
order (``--no-group-by-length``), length-grouped (the default), and packed (``--packing``).
Only the data pipeline runs; no model is loaded.

Run from the repository root with the repository installed (``make install``):

    .venv/bin/python bench/padding.py --json bench/results/padding.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import harness

from tunesmith.config import TrainConfig
from tunesmith.data.examples import CONVERSATION_FORMATS
from tunesmith.data.setup import build_training_data
from tunesmith.models import load_tokenizer
from tunesmith.steps import DatasetSteps, StepPlan
from tunesmith_trainers.sft import SFTTrainer

BATCHINGS = {
    "random order": {"packing": False, "group_by_length": False},
    "length-grouped (default)": {"packing": False, "group_by_length": True},
    "packed": {"packing": True, "group_by_length": True},
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="whose tokenizer and chat template render the chats")
    parser.add_argument("--rows", type=int, default=120, help="generated chats [default: %(default)s]")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)

    model = harness.model_folder(args.model)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-padding-") as work_dir:
        dataset = harness.write_jsonl(Path(work_dir) / "chats.jsonl", harness.chats(args.rows))
        for name, batching in BATCHINGS.items():
            config = TrainConfig(model=str(model), dataset=(str(dataset),), max_length=args.max_length, batch_size=args.batch_size, **batching)
            results[name] = padding_of_one_epoch(model, config)
    print(f"{'batching':<26} {'tokens':>7} {'positions':>9} {'padding':>8}")
    for name, counted in results.items():
        print(f"{name:<26} {counted['tokens']:>7} {counted['positions']:>9} {counted['padding_share']:>7.1%}")
    result = {"settings": {"model": str(model), "rows": args.rows, "max_length": args.max_length, "batch_size": args.batch_size},
              "batchings": results}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def padding_of_one_epoch(model: Path, config: TrainConfig) -> dict:
    """Tokens and positions (rows x longest row, per micro-batch) over one epoch of ``config``'s steps, one process."""
    tokenizer = load_tokenizer(model)
    trainer = SFTTrainer(tokenizer, config)
    trainer.row_formats = CONVERSATION_FORMATS
    data = build_training_data(trainer, config)
    plan = StepPlan(config.batch_size * config.grad_accum, config.batch_size, config.seed, group_by_length=config.group_by_length and not config.packing)
    source = DatasetSteps(data.train_rows, plan, SimpleNamespace(dp_size=1, dp_rank=0))
    tokens = positions = 0
    for _ in range(source.steps_per_epoch):
        for rows in source.next_step(None).pieces:
            if rows:
                batch = trainer.collate(rows)
                tokens += trainer.count_input_tokens(batch)
                positions += batch["input_ids"].numel()
    return {"tokens": tokens, "positions": positions, "padding_share": 1 - tokens / positions}


if __name__ == "__main__":
    main()
