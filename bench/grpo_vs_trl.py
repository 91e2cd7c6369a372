"""LoRA GRPO: ``tunesmith grpo`` next to TRL's ``GRPOTrainer``, same model, prompts, generation and reward.

Both run the same number of optimizer steps on the same generated prompts
(``harness.prompts``: one user question each, log-normal lengths), each step generating
``num_generations`` completions for each of ``batch / num_generations`` prompts with the
model being trained (transformers' ``generate`` in TRL; in tunesmith the default generation
backend, which for LoRA is a copy of the model with the adapters merged in), sampled at the same temperature (top-p 1, top-k off) up to
the same ``max_completion_length``, scored by the same function (``length_reward.py``), then one
update (``num_iterations`` 1, the DAPO token average, advantages scaled by the group's
deviation, beta 0 so no reference model: both tools' defaults). LoRA rank 8, alpha 16, dropout
0.05 on every linear layer; learning rate 1e-4, cosine schedule, seed 42; bf16 where the CPU
computes it natively; no gradient checkpointing (TRL's default is on; turned off so that both
do the same work), and tunesmith keeps freed memory for reuse (``--no-release-memory``; this
comparison is not short of memory). Each saves its adapter at the end.

Printed: completions per second of the whole process (steps x batch, the same for both), wall
time, peak memory, ratios. A completion ends at the end-of-turn token or at
``max_completion_length``; how many tokens each tool's completions had is in its own logs
(tunesmith's ``metrics.jsonl``, TRL's ``completions/mean_length``), not compared here.

    .venv/bin/python bench/grpo_vs_trl.py
    .venv/bin/python bench/grpo_vs_trl.py --steps 16 --repeat 3 --json bench/results/grpo.json
    .venv/bin/python bench/grpo_vs_trl.py --quick     # one step of a tiny model: checks the script runs
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import harness

SETTINGS = {"batch_size": 8, "num_generations": 4, "max_completion_length": 64, "temperature": 1.0, "beta": 0.0,
            **harness.TRAINING}
#: --quick: one step of 2 prompts x 2 completions of at most 8 tokens
QUICK = {"batch_size": 4, "num_generations": 2, "max_completion_length": 8}
QUICK_ROWS, QUICK_STEPS = 2, 1
REWARD = "length_reward:length_reward"


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison for the command line ``argv`` (default: this process's); the result."""
    parser = harness.argument_parser(__doc__.split("\n\n")[0], rows=16)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of each run [default: %(default)s]")
    args = harness.parse(parser, argv, __file__)
    with tempfile.TemporaryDirectory(prefix="bench-grpo-", dir=args.dir) as work_dir:
        work_dir = Path(work_dir)
        model = harness.prepare(args, work_dir, QUICK_ROWS)
        settings = dict(SETTINGS, **QUICK) if args.quick else SETTINGS
        steps = QUICK_STEPS if args.quick else args.steps
        dataset = harness.write_jsonl(work_dir / "prompts.jsonl", harness.prompts(args.rows))
        generation = [
            "--num-generations", str(settings["num_generations"]),
            "--max-completion-length", str(settings["max_completion_length"]),
            "--temperature", str(settings["temperature"]), "--beta", str(settings["beta"]), "--max-steps", str(steps),
        ]
        comparison = harness.Comparison(
            title="LoRA GRPO",
            commands={"tunesmith": tunesmith_command(model, dataset, settings) + generation,
                      "trl": harness.trl_command("grpo", model, dataset, settings) + generation + ["--no-gradient-checkpointing"]},
            units={"completions": steps * settings["batch_size"]},
            how_counted="completions: optimizer steps x batch size (num_generations completions of each prompt)",
            settings={**settings, "steps": steps, "rows": args.rows, "reward": REWARD, "model": str(model)},
        )
        return harness.benchmark(comparison, args, work_dir)


def tunesmith_command(model: Path, dataset: Path, settings: dict) -> list[str]:
    """The comparison's settings; the rest (LoRA alpha/dropout, learning rate, schedule, seed, loss) are tunesmith's defaults."""
    return [
        "-m", "tunesmith", "grpo", "--model", str(model), "--dataset", str(dataset), "--output-dir", "{out}",
        "--batch-size", str(settings["batch_size"]), "--lora-rank", str(settings["lora_rank"]), "--reward", REWARD,
        "--no-release-memory",
    ]


if __name__ == "__main__":
    main()
