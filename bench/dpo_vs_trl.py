"""LoRA DPO: ``tunesmith dpo`` next to TRL's ``DPOTrainer``, same model, pairs and settings.

Both train one epoch of a LoRA adapter (rank 8, alpha 16, dropout 0.05, every linear layer;
the reference is the model with the adapter switched off) with batch 4 (pairs) on the same
generated preference pairs (``harness.preference_pairs``: one user question, a chosen and a
rejected reply of log-normal lengths), the sigmoid loss with beta 0.1, learning rate 1e-4 on a
cosine schedule without warm-up, seed 42, bf16 where the CPU computes it natively, and no
gradient checkpointing (tunesmith's default; TRL's default is on, turned off here so that both
do the same work); tunesmith keeps freed memory for reuse (``--no-release-memory``; this
comparison is not short of memory). Each saves its adapter at the end.

Lengths: each sequence (prompt + one reply) at most 512 tokens. TRL's ``max_length`` is per
sequence (it cuts the end); tunesmith's ``--max-length`` counts both sequences of a pair (it
cuts the prompt's start, then the replies' ends), so tunesmith gets twice the value. The few
pairs longer than that are cut at different places by the two tools.

Printed: pairs and real tokens (prompt + chosen and prompt + rejected, each rendered by the chat
template and capped at 512) per second of the whole process, wall time, peak memory, ratios.
Both compute the reference log-probabilities in every step (neither precomputes them by
default). TRL also sets every dropout to 0 (``disable_dropout=True``, its default), LoRA's included.

    .venv/bin/python bench/dpo_vs_trl.py
    .venv/bin/python bench/dpo_vs_trl.py --rows 120 --repeat 3 --json bench/results/dpo.json
    .venv/bin/python bench/dpo_vs_trl.py --quick     # one step of a tiny model: checks the script runs
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import harness
from transformers import AutoTokenizer

SETTINGS = {"batch_size": 4, "max_length": 512, "beta": 0.1, **harness.TRAINING}
#: --quick: 4 pairs of at most 64 tokens a sequence, one step
QUICK_ROWS, QUICK_MAX_LENGTH = 4, 64
COUNTED = ("pairs: rows of the data; tokens: prompt + chosen and prompt + rejected, each rendered by the model's chat "
           "template and tokenized, capped at the maximum length per sequence; no padding")


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison for the command line ``argv`` (default: this process's); the result."""
    parser = harness.argument_parser(__doc__.split("\n\n")[0], rows=60)
    args = harness.parse(parser, argv, __file__)
    with tempfile.TemporaryDirectory(prefix="bench-dpo-", dir=args.dir) as work_dir:
        work_dir = Path(work_dir)
        model = harness.prepare(args, work_dir, QUICK_ROWS)
        settings = dict(SETTINGS, max_length=QUICK_MAX_LENGTH) if args.quick else SETTINGS
        rows = harness.preference_pairs(args.rows)
        dataset = harness.write_jsonl(work_dir / "pairs.jsonl", rows)
        tokens = harness.pair_tokens(AutoTokenizer.from_pretrained(model), rows, settings["max_length"])
        comparison = harness.Comparison(
            title="LoRA DPO",
            commands={"tunesmith": tunesmith_command(model, dataset, settings),
                      "trl": harness.trl_command("dpo", model, dataset, settings)
                      + ["--beta", str(settings["beta"]), "--no-gradient-checkpointing"]},
            units={"pairs": len(rows), "tokens": tokens},
            how_counted=COUNTED,
            settings={**settings, "rows": args.rows, "model": str(model)},
        )
        return harness.benchmark(comparison, args, work_dir)


def tunesmith_command(model: Path, dataset: Path, settings: dict) -> list[str]:
    """The comparison's settings; the rest (LoRA alpha/dropout, learning rate, schedule, seed) are tunesmith's defaults."""
    return [
        "-m", "tunesmith", "dpo", "--model", str(model), "--dataset", str(dataset), "--output-dir", "{out}",
        "--max-length", str(2 * settings["max_length"]), "--batch-size", str(settings["batch_size"]),
        "--epochs", "1", "--lora-rank", str(settings["lora_rank"]), "--beta", str(settings["beta"]), "--no-release-memory",
    ]


if __name__ == "__main__":
    main()
