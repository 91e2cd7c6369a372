"""``tunesmith verify``: check checkpoints and results against their manifests, by hand."""

from __future__ import annotations

import re
from pathlib import Path

import click

from tunesmith.errors import ConfigError
from tunesmith.manifest import MANIFEST_FILE, STATE_FILE, verify_folder

#: the folders of a run that carry a manifest
RUN_FOLDER_PATTERN = re.compile(r"^(checkpoint-\d+|final)$")


@click.command("verify")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify_command(folder: Path):
    """Check FOLDER (a run folder, a checkpoint or a final result) against its manifest.

    Names every missing, truncated or changed file; exits 1 when anything is damaged.
    """
    if (folder / MANIFEST_FILE).is_file() or (folder / STATE_FILE).is_file():
        folders = [folder]
    else:
        folders = sorted((p for p in folder.iterdir() if p.is_dir() and RUN_FOLDER_PATTERN.match(p.name)), key=_order)
    if not folders:
        raise ConfigError(f"{folder}: no manifest.json, checkpoint-N/ or final/ in it, so there is nothing to verify")
    damaged = 0
    for checked in folders:
        problems = verify_folder(checked)
        if problems:
            damaged += 1
            click.echo(f"{checked}: damaged")
            for problem in problems:
                click.echo(f"  - {problem}")
        else:
            click.echo(f"{checked}: ok")
    if damaged:
        click.echo(f"{damaged} of {len(folders)} folder(s) damaged", err=True)
        raise click.exceptions.Exit(1)


def _order(path: Path) -> tuple[int, int]:
    return (1, 0) if path.name == "final" else (0, int(path.name.split("-")[1]))
