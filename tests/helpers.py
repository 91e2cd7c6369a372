"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.hooks import hookimpl
from tunesmith.records import TrainerSpec


class TrainerPlugin:
    """An in-test plugin object registering one trainer class under ``name``."""

    def __init__(self, name: str, trainer_class):
        self.spec = TrainerSpec(name=name, trainer=trainer_class)

    @hookimpl
    def tunesmith_register_trainers(self):
        return [self.spec]


def run_cli(*args: str) -> int:
    """Run ``tunesmith ARGS`` in this process; return the exit code."""
    try:
        main([str(a) for a in args])
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def chat_rows(count: int) -> list[dict]:
    """Distinct short conversations a tiny model can memorise."""
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey", "gold"]
    return [
        {"messages": [{"role": "user", "content": f"Name colour {i}."}, {"role": "assistant", "content": f"Colour {i} is {colours[i % len(colours)]}."}]}
        for i in range(count)
    ]


QUESTIONS_AND_ANSWERS = [
    ("What is the capital of France?", "Paris."),
    ("Which planet is red?", "Mars."),
    ("What do bees make?", "Honey."),
    ("What colour is the sky?", "Blue."),
    ("How many legs does a spider have?", "Eight."),
    ("What is frozen water called?", "Ice."),
    ("Which animal barks?", "A dog."),
    ("What do cows drink?", "Water."),
]


def qa_rows() -> list[dict]:
    """Eight questions whose answers differ from their first token: easy to memorise, easy to check."""
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS_AND_ANSWERS
    ]


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def adapter_weights(folder: Path) -> dict:
    path = folder / "adapter_model.safetensors"
    return load_file(path if path.is_file() else folder / "model.safetensors")


def cpu_device():
    """The cpu device as every command gets it: built from its registration, with its declared capabilities."""
    from tunesmith.plugins import build_device, create_plugin_manager

    return build_device(create_plugin_manager().get("device", "cpu"))
