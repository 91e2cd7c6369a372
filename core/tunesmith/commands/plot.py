"""``tunesmith plot RUN_DIR ...``: training curves of one or more runs as a PNG."""

from __future__ import annotations

from pathlib import Path

import click

from tunesmith.errors import ConfigError


@click.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("curves.png"), help="The PNG to write.")
def plot_command(run_dirs: tuple[Path, ...], output: Path):
    """Plot loss, evaluation loss, learning rate and reward per step of training runs, overlaid."""
    from tunesmith.curves import INSTALL_HINT, draw_curves, matplotlib_installed

    if not matplotlib_installed():
        raise ConfigError(f"tunesmith plot draws with matplotlib, which is not installed here; {INSTALL_HINT}")
    written = draw_curves(list(run_dirs), output)
    click.echo(f"wrote {written}")
