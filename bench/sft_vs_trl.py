"""LoRA SFT: ``tunesmith sft`` next to TRL's ``SFTTrainer``, same model, data and settings.

Both train one epoch of a LoRA adapter (rank 8, alpha 16, dropout 0.05, every linear layer) with
batch 4 and maximum length 512 (unless told otherwise, below) on the same generated chats (``harness.chats``: log-normal reply
lengths, so most rows are short and some exceed 512 tokens), learning rate 1e-4 on a cosine
schedule without warm-up, seed 42; weight decay 0 and gradient clipping at 1.0 are both tools'
defaults. Each saves its adapter at the end and nothing before (30 steps are fewer than either's
checkpoint interval). Printed: real tokens per second (see ``harness``), whole-process wall
time, peak memory, and the ratios. The rest depends on ``--settings``:

``defaults`` - each tool as a user gets it, given only the above. tunesmith: bf16 where the CPU
    computes it natively (``--precision auto``), no gradient checkpointing, no packing, each
    batch padded to its longest row. TRL 1.16's ``SFTConfig``: ``bf16=True`` (its default
    whenever fp16 is off; on a CPU TRL accepts it only with ``use_cpu=True``, which
    ``trl_run.py`` sets there), ``gradient_checkpointing=True``, ``packing=False``,
    ``padding_free=False``, each batch padded to its longest row; loss on every token (tunesmith:
    on the assistant's), logged every 10 steps (tunesmith: every step).
``best`` - each tool's fastest settings here. tunesmith: ``--no-release-memory`` (freed memory
    kept for reuse rather than handed back to the system: a higher peak, no page faults) with
    its default batches of rows of similar length, which on CPU are faster than ``--packing``
    (``--liger`` is CUDA's). TRL: ``gradient_checkpointing=False`` and ``packing=True`` (its
    default ``bfd`` strategy, which turns on padding-free batches); see ``TRL_BEST`` for why.
``packing`` - as ``best``, tunesmith with ``--packing`` (rows of 512 tokens, attention kept
    within each sample): tunesmith's packing next to TRL's.

``--max-length`` and ``--batch-size`` change the rows for both tools: ``--settings packing
--max-length 2048 --batch-size 1`` packs the same chats into 2048-token rows, a step holding as
many tokens as 4 rows of 512, where attention over whole rows costs most.

Run from the repository root with the repository installed (``make install``):

    .venv/bin/python bench/sft_vs_trl.py --settings defaults
    .venv/bin/python bench/sft_vs_trl.py --settings best --repeat 3 --json bench/results/sft_best.json
    .venv/bin/python bench/sft_vs_trl.py --quick     # one step of a tiny model: checks the script runs
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import harness
from transformers import AutoTokenizer

SETTINGS = {"batch_size": 4, "max_length": 512, "epochs": 1, **harness.TRAINING}
#: --quick: 4 rows of at most 64 tokens, one step of batch 4
QUICK_ROWS, QUICK_MAX_LENGTH = 4, 64
#: TRL's fastest settings, chosen by what each does (not yet confirmed by a full-size timing).
#: Gradient checkpointing recomputes each layer's activations in the backward pass (about a
#: fifth more compute, TRL's docs say); with 512-token rows of a 135M model the memory it saves
#: is not needed. Packing removes the padding of rows of unequal length: the default bfd
#: strategy puts whole samples (cut at 512) into 512-token rows and makes the batch
#: padding-free, position ids restarting at each sample (transformers' sdpa attention builds the
#: per-sample mask from them; on CUDA, TRL recommends flash attention for this). padding_free
#: alone is not chosen: without packing TRL does not enforce max_length, so it would train on
#: more tokens than tunesmith, and it still runs a step per 4 rows.
TRL_BEST = ["--no-gradient-checkpointing", "--packing"]
COUNTED = "each chat rendered by the model's chat template and tokenized, capped at the maximum length; no padding"


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison for the command line ``argv`` (default: this process's); the result."""
    parser = harness.argument_parser(__doc__.split("\n\n")[0], rows=120)
    parser.add_argument("--settings", choices=["defaults", "best", "packing"], default="defaults")
    parser.add_argument("--max-length", type=int, default=SETTINGS["max_length"], help="tokens a row holds [default: %(default)s]")
    parser.add_argument("--batch-size", type=int, default=SETTINGS["batch_size"], help="rows a step takes [default: %(default)s]")
    args = harness.parse(parser, argv, __file__)
    with tempfile.TemporaryDirectory(prefix="bench-sft-", dir=args.dir) as work_dir:
        work_dir = Path(work_dir)
        model = harness.prepare(args, work_dir, QUICK_ROWS)
        settings = dict(SETTINGS, max_length=QUICK_MAX_LENGTH if args.quick else args.max_length, batch_size=args.batch_size)
        rows = harness.chats(args.rows)
        dataset = harness.write_jsonl(work_dir / "chats.jsonl", rows)
        comparison = harness.Comparison(
            title=f"LoRA SFT, {args.settings} settings",
            commands={"tunesmith": tunesmith_command(model, dataset, settings, args.settings),
                      "trl": trl_command(model, dataset, settings, args.settings)},
            units={"tokens": harness.sft_tokens(AutoTokenizer.from_pretrained(model), rows, settings["max_length"])},
            how_counted=COUNTED,
            settings={**settings, "settings": args.settings, "rows": args.rows, "model": str(model)},
        )
        return harness.benchmark(comparison, args, work_dir)


def tunesmith_command(model: Path, dataset: Path, settings: dict, which: str) -> list[str]:
    """Only what the comparison fixes; the rest are tunesmith's defaults (they equal SETTINGS)."""
    command = [
        "-m", "tunesmith", "sft", "--model", str(model), "--dataset", str(dataset), "--output-dir", "{out}",
        "--max-length", str(settings["max_length"]), "--batch-size", str(settings["batch_size"]),
        "--epochs", str(settings["epochs"]), "--lora-rank", str(settings["lora_rank"]),
    ]
    return command + {"defaults": [], "best": ["--no-release-memory"], "packing": ["--packing", "--no-release-memory"]}[which]


def trl_command(model: Path, dataset: Path, settings: dict, which: str) -> list[str]:
    return harness.trl_command("sft", model, dataset, settings) + (TRL_BEST if which != "defaults" else [])


if __name__ == "__main__":
    main()
