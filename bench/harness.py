"""What the tunesmith-next-to-TRL comparisons share: their data, how a run is measured, the table.

``sft_vs_trl.py``, ``dpo_vs_trl.py`` and ``grpo_vs_trl.py`` each describe two commands, one per
tool, that train the same model on the same generated data with the same settings. This module
runs them as separate processes, alternating (tunesmith, TRL, tunesmith, TRL, ... for
``--repeat`` rounds), and measures each whole process, from its start to its exit (imports,
loading, data preparation, training, saving):

- wall time: ``time.perf_counter`` before the process starts and after it has exited;
- peak resident memory: the process's ``ru_maxrss`` as ``os.wait4`` returns it (the largest
  resident set it, or a child it waited for, ever had);
- peak device memory: ``torch.cuda.max_memory_allocated`` at the process's exit, written to a
  side file by ``device_memory.py``, which wraps both tools' commands; "n/a" without CUDA;
- throughput: a count of work the harness computes itself from the data, the same number for
  both tools (real tokens, pairs, completions), divided by the wall time. Real tokens are each
  row rendered with the model's chat template and tokenized by its tokenizer, capped at the
  maximum length: no padding, and the same count whether or not a tool packs.

Each tool's figures are the medians over its runs; the ratios are tunesmith's over TRL's (a
throughput ratio above 1 or a memory ratio below 1 favours tunesmith).

Each run writes into its own temporary folder (removed after it), with a fresh datasets cache,
so no run reuses what an earlier one prepared. The tools' own output goes to a log file there,
whose end is shown if the process fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEVICE_MEMORY_WRAPPER = BENCH_DIR / "device_memory.py"
TOOLS = ("tunesmith", "trl")
#: the words the generated texts are made of
WORDS = (
    "the model learns a short answer from each example and then writes a longer reply when the question asks for "
    "detail about cooking travel music history science gardens rivers mountains cities trains letters numbers "
    "colours animals weather markets books games tools houses bridges ships stars planets clocks maps recipes "
    "because however although therefore which while after before during under over between around through"
).split()


# -- data ----------------------------------------------------------------------------------------------------------


def lognormal_count(rng: random.Random, median: float, sigma: float, least: int = 1) -> int:
    """A length drawn from a log-normal distribution: many short, a long tail."""
    return max(least, round(rng.lognormvariate(math.log(median), sigma)))


def text(rng: random.Random, words: int) -> str:
    """``words`` words in sentences of 5 to 17 words."""
    sentences, left = [], words
    while left > 0:
        length = min(left, rng.randint(5, 17))
        chosen = [rng.choice(WORDS) for _ in range(length)]
        sentences.append(" ".join(chosen).capitalize() + ".")
        left -= length
    return " ".join(sentences)


def question(rng: random.Random) -> str:
    return text(rng, lognormal_count(rng, 20, 0.7, least=3)).rstrip(".") + "?"


def reply(rng: random.Random, median_words: float) -> str:
    """A reply whose length is log-normal around ``median_words`` words (sigma 0.9). With SmolLM2's
    tokenizer, 120 chats of replies around 120 words have a median of about 250 tokens; 18 are
    under 128 tokens and 20 over 512 (the longest about 1,200)."""
    return text(rng, lognormal_count(rng, median_words, 0.9))


def chats(count: int, seed: int = 0) -> list[dict]:
    """Conversations in OpenAI ``messages`` form: one exchange, or two for a quarter of them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        messages = []
        for _ in range(2 if rng.random() < 0.25 else 1):
            messages += [{"role": "user", "content": question(rng)}, {"role": "assistant", "content": reply(rng, 120)}]
        rows.append({"messages": messages})
    return rows


def preference_pairs(count: int, seed: int = 0) -> list[dict]:
    """``prompt``/``chosen``/``rejected`` rows, each a list of messages (the form both tools read)."""
    rng = random.Random(seed)
    return [
        {
            "prompt": [{"role": "user", "content": question(rng)}],
            "chosen": [{"role": "assistant", "content": reply(rng, 80)}],
            "rejected": [{"role": "assistant", "content": reply(rng, 80)}],
        }
        for _ in range(count)
    ]


def prompts(count: int, seed: int = 0) -> list[dict]:
    """``prompt`` rows (a list with one user message) for the trainers that generate their completions."""
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": question(rng)}]} for _ in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# -- counting ------------------------------------------------------------------------------------------------------


def chat_tokens(tokenizer, messages: list[dict], max_length: int) -> int:
    """Real tokens of one conversation: rendered by the chat template, tokenized, capped at ``max_length``."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    return min(len(ids), max_length)


def sft_tokens(tokenizer, rows: list[dict], max_length: int) -> int:
    return sum(chat_tokens(tokenizer, row["messages"], max_length) for row in rows)


def pair_tokens(tokenizer, rows: list[dict], max_length: int) -> int:
    """Real tokens of the pairs: prompt + chosen and prompt + rejected, each capped at ``max_length``."""
    return sum(chat_tokens(tokenizer, row["prompt"] + row[side], max_length) for row in rows for side in ("chosen", "rejected"))


# -- models --------------------------------------------------------------------------------------------------------


def model_folder(model: str) -> Path:
    """The local folder of ``model`` as tunesmith resolves it (an alias is converted into its cache
    once), so that both tools load the same files."""
    from tunesmith.models import resolve_model

    return resolve_model(model)


def build_tiny_model(folder: Path) -> Path:
    """A tiny random Llama (2 layers, width 64) with SmolLM2's tokenizer and chat template, for ``--quick``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_folder("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- running -------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    round: int
    wall_s: float
    peak_rss_mib: float
    peak_device_mib: float | None


@dataclass
class Comparison:
    """Two commands doing the same work, and the work they do: ``units`` maps a unit (tokens,
    pairs, completions) to how many of them one run processes. A command may hold ``{out}``,
    replaced by the run's own output folder."""

    title: str
    commands: dict[str, list[str]]
    units: dict[str, int]
    how_counted: str
    settings: dict[str, object] = field(default_factory=dict)


def measure(tool: str, command: list[str], round_: int, work_dir: Path) -> Run:
    """Run ``command`` once in a fresh folder under ``work_dir``; its wall time and peak memory."""
    with tempfile.TemporaryDirectory(prefix=f"{tool}-", dir=work_dir) as folder:
        folder = Path(folder)
        device_file = folder / "device_memory.json"
        argv = [sys.executable, str(DEVICE_MEMORY_WRAPPER), str(device_file)]
        argv += [part.replace("{out}", str(folder / "out")) for part in command]
        env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "datasets-cache"), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")]))}
        log = folder / "output.log"
        with log.open("wb") as sink:
            start = time.perf_counter()
            process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=folder)
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            tail = log.read_text(errors="replace")[-4000:]
            sys.exit(f"{tool} exited with status {process.returncode}:\n  {shlex.join(argv)}\n--- end of its output ---\n{tail}")
        device = json.loads(device_file.read_text())["peak_mib"] if device_file.is_file() else None
        return Run(tool, round_, wall, usage.ru_maxrss / 1024, device)


def alternate(comparison: Comparison, repeat: int, work_dir: Path) -> list[Run]:
    """tunesmith, TRL, tunesmith, TRL, ...: ``repeat`` rounds, each tool once per round."""
    runs = []
    for round_ in range(repeat):
        for tool in TOOLS:
            run = measure(tool, comparison.commands[tool], round_, work_dir)
            print(f"  round {round_ + 1}/{repeat} {tool:<9} {run.wall_s:8.1f} s  {run.peak_rss_mib:8.0f} MiB", flush=True)
            runs.append(run)
    return runs


# -- the tools' commands -------------------------------------------------------------------------------------------

#: what every comparison sets equal in both tools: tunesmith's defaults, given to TRL explicitly
#: (weight decay 0, gradient clipping at 1.0 and no warm-up are both tools' defaults)
TRAINING = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05, "learning_rate": 1e-4, "lr_scheduler": "cosine", "seed": 42}


def trl_command(trainer: str, model: Path, dataset: Path, settings: dict) -> list[str]:
    """``trl_run.py TRAINER`` with the model, data, batch, length (if any) and :data:`TRAINING` of ``settings``."""
    length = ["--max-length", str(settings["max_length"])] if "max_length" in settings else []
    return [
        str(BENCH_DIR / "trl_run.py"), trainer, "--model", str(model), "--dataset", str(dataset), "--output-dir", "{out}",
        *length, "--batch-size", str(settings["batch_size"]),
        "--learning-rate", str(settings["learning_rate"]), "--lr-scheduler", settings["lr_scheduler"],
        "--seed", str(settings["seed"]), "--lora-rank", str(settings["lora_rank"]),
        "--lora-alpha", str(settings["lora_alpha"]), "--lora-dropout", str(settings["lora_dropout"]),
    ]


# -- reporting -----------------------------------------------------------------------------------------------------


def summary(comparison: Comparison, runs: list[Run], invocation: str) -> dict:
    """Medians per tool and the ratios, as the JSON output holds them."""
    tools = {}
    for tool in TOOLS:
        own = [run for run in runs if run.tool == tool]
        wall = statistics.median(run.wall_s for run in own)
        devices = [run.peak_device_mib for run in own if run.peak_device_mib is not None]
        tools[tool] = {
            "command": shlex.join(["python", *comparison.commands[tool]]),
            "median_wall_s": wall,
            "per_s": {unit: count / wall for unit, count in comparison.units.items()},
            "median_peak_rss_mib": statistics.median(run.peak_rss_mib for run in own),
            "median_peak_device_mib": statistics.median(devices) if devices else None,
        }
    ours, theirs = tools["tunesmith"], tools["trl"]
    ratios = {f"{unit}_per_s": ours["per_s"][unit] / theirs["per_s"][unit] for unit in comparison.units}
    ratios["peak_rss"] = ours["median_peak_rss_mib"] / theirs["median_peak_rss_mib"]
    devices = ours["median_peak_device_mib"], theirs["median_peak_device_mib"]
    ratios["peak_device"] = devices[0] / devices[1] if None not in devices and devices[1] > 0 else None
    return {
        "comparison": comparison.title, "command": invocation,
        "machine": machine(), "units": comparison.units, "how_counted": comparison.how_counted,
        "settings": comparison.settings, "tools": tools, "ratios": ratios, "runs": [asdict(run) for run in runs],
    }


def print_table(result: dict) -> None:
    units = list(result["units"])
    header = ["", "wall s"] + [f"{unit}/s" for unit in units] + ["peak RSS MiB", "peak device MiB"]
    rows = []
    for tool, figures in result["tools"].items():
        device = figures["median_peak_device_mib"]
        rows.append([tool, f"{figures['median_wall_s']:.1f}"] + [f"{figures['per_s'][unit]:.2f}" for unit in units]
                    + [f"{figures['median_peak_rss_mib']:.0f}", "n/a" if device is None else f"{device:.0f}"])
    ratios = result["ratios"]
    walls = [figures["median_wall_s"] for figures in result["tools"].values()]
    rows.append(["tunesmith/TRL", f"{walls[0] / walls[1]:.2f}x"]
                + [f"{ratios[f'{unit}_per_s']:.2f}x" for unit in units]
                + [f"{ratios['peak_rss']:.2f}x", "n/a" if ratios["peak_device"] is None else f"{ratios['peak_device']:.2f}x"])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    print(f"\n{result['comparison']}: medians of {len(result['runs']) // len(TOOLS)} run(s) each, whole process")
    for row in [header] + rows:
        print("  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))))
    print("work per run: " + ", ".join(f"{count} {unit}" for unit, count in result["units"].items()))
    box = result["machine"]
    print(f"machine: {box['cpu']}, {box['cores']} cores, {box['memory_gib']} GiB, accelerator {box['accelerator'] or 'none'}; "
          f"torch {box['torch']}, transformers {box['transformers']}, trl {box['trl']}; load average after {box['load_average']}")
    print(f"counted: {result['how_counted']}")
    for tool, figures in result["tools"].items():
        print(f"{tool}: {figures['command']}")


def machine() -> dict:
    """What the figures were measured on; ``load_average`` (1, 5 and 15 minutes, taken after the
    runs) shows whether something else was using the processors meanwhile."""
    import torch
    import transformers
    import trl

    names = [line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines() if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    memory_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), 0)
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(memory_kib / 1024**2, 1),
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl.__version__,
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# -- the scripts' shared command line ------------------------------------------------------------------------------


def argument_parser(description: str, rows: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None,
                        help="model alias or folder, loaded by both tools [default: smollm2-135m; with --quick a tiny random Llama]")
    parser.add_argument("--rows", type=int, default=rows, help="rows of generated data [default: %(default)s]")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool, alternating [default: %(default)s]")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the runs write (removed afterwards) [default: a temporary folder]")
    parser.add_argument("--json", type=Path, default=None, help="also write the result, with every run, to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="one step of a tiny random model (unless --model) on a few rows, one run each: "
                             "checks the script works, measures nothing")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, script: str) -> argparse.Namespace:
    """``argv`` (default: this process's arguments) parsed, with ``invocation``: the command
    that runs ``script`` with them from the repository root."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.invocation = shlex.join(["python", f"bench/{Path(script).name}", *argv])
    return args


def prepare(args: argparse.Namespace, work_dir: Path, quick_rows: int) -> Path:
    """Apply ``--quick``'s sizes to ``args``; the model folder both tools load."""
    if args.quick:
        args.rows, args.repeat = quick_rows, 1
        if args.model is None:
            return build_tiny_model(work_dir / "tiny-llama")
    return model_folder(args.model or "smollm2-135m")


def benchmark(comparison: Comparison, args: argparse.Namespace, work_dir: Path) -> dict:
    """Run the comparison, print its table, write ``--json``; the result."""
    print(f"{comparison.title}: {args.repeat} round(s), tunesmith and TRL alternating", flush=True)
    result = summary(comparison, alternate(comparison, args.repeat, work_dir), args.invocation)
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result
