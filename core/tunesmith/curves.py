"""Training curves as a PNG: loss, evaluation loss, learning rate and reward per step, read
from each run's ``metrics.jsonl``, several runs overlaid (``tunesmith plot``, ``OUTPUT/curves.png``).

Drawn with matplotlib's object API on an Agg canvas: no window, and nothing changes in pyplot's
global state of a program that imports tunesmith.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import click

from tunesmith.errors import ConfigError

#: the panels, in order: (metrics key, title); a panel no run has a value for is left out
PANELS = (
    ("loss", "training loss"),
    ("eval_loss", "evaluation loss"),
    ("learning_rate", "learning rate"),
    ("reward", "reward"),
)
INSTALL_HINT = "pip install matplotlib"

# Whether this process has already said that matplotlib is missing.
_said_missing = False


def matplotlib_installed() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def read_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Each panel's ``(steps, values)`` from ``run_dir/metrics.jsonl``; a key a run never logged is absent."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl here; give the --output-dir of a training run")
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue  # the half-written last line of a killed run
        for key, _ in PANELS:
            value = _number(record.get(key))
            if value is not None:
                steps, values = curves.setdefault(key, ([], []))
                steps.append(step)
                values.append(value)
    return curves


def _number(value) -> float | None:
    """A plottable float: metrics.jsonl writes NaN and infinity as strings, which are gaps here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's legend label: its folder's name, or its path where two names are alike."""
    names = [Path(run_dir).resolve().name for run_dir in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(run_dir) for run_dir in run_dirs]


def draw_curves(run_dirs: list[Path], output: Path) -> Path:
    """Write one PNG with a panel per metric and a line per run, and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = [(label, read_curves(Path(run_dir))) for label, run_dir in zip(run_labels(run_dirs), run_dirs)]
    panels = [(key, title) for key, title in PANELS if any(key in curves for _, curves in runs)]
    if not panels:
        raise ConfigError(f"nothing to plot: no metrics line in {', '.join(map(str, run_dirs))} has {', '.join(key for key, _ in PANELS)}")
    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    height = 3.6 * rows
    # Fixed margins (in inches, as fractions): a layout engine would measure every tick label
    # and double the drawing time, paid at the end of every training run.
    figure = Figure(figsize=(6 * columns, height))
    figure.subplots_adjust(left=0.08, right=0.97, bottom=0.55 / height, top=1 - 0.35 / height, wspace=0.22, hspace=0.45)
    FigureCanvasAgg(figure)
    for index, (key, title) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for colour, (label, curves) in enumerate(runs):
            if key in curves:
                steps, values = curves[key]
                # One colour per run in every panel, so the legend of each panel reads the same.
                axes.plot(steps, values, color=f"C{colour % 10}", label=label, marker="o" if len(steps) == 1 else None)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if key == "learning_rate":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if len(runs) > 1:
            axes.legend(fontsize="small")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    temporary.replace(output)
    return output


def write_run_curves(output_dir: Path) -> None:
    """``OUTPUT/curves.png`` at the end of a run, unless ``TUNESMITH_CURVES=0``; without
    matplotlib, say once how to get it."""
    global _said_missing
    if os.environ.get("TUNESMITH_CURVES", "1") == "0":
        return
    if not matplotlib_installed():
        if not _said_missing:
            _said_missing = True
            click.echo(f"note: {INSTALL_HINT} to get the training curves drawn in OUTPUT/curves.png after each run", err=True)
        return
    if not (output_dir / "metrics.jsonl").is_file():
        return  # stopped before its first metrics line
    try:
        draw_curves([output_dir], output_dir / "curves.png")
    except ConfigError:
        return  # no line with anything to draw yet
