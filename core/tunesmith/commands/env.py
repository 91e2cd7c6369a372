"""``tunesmith env``: versions, every device found, and which one ``--device auto`` picks and why."""

from __future__ import annotations

import platform
from importlib import metadata

import click
from rich.console import Console
from rich.table import Table

from tunesmith.errors import TunesmithError
from tunesmith.plugins import create_plugin_manager

REPORTED_PACKAGES = ("tunesmith", "torch", "transformers", "peft", "safetensors", "pluggy", "datasets", "deepspeed")


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


@click.command("env")
def env_command():
    """Print versions, every device found, and which device --device auto picks and why."""
    console = Console()
    console.print(f"python: {platform.python_version()} ({platform.platform()})")
    for name in REPORTED_PACKAGES:
        console.print(f"{name}: {package_version(name)}")

    manager = create_plugin_manager()
    table = Table(title="devices")
    # As wide as the terminal: the short columns stay whole, the others wrap (a long name folds).
    table.add_column("name", overflow="fold")
    table.add_column("priority", no_wrap=True)
    table.add_column("available", no_wrap=True)
    table.add_column("distribution", overflow="fold")
    table.add_column("details", overflow="fold")
    candidates = manager.device_candidates()
    for candidate in candidates:
        details = candidate.reason or candidate.registered.spec.description
        table.add_row(
            candidate.name,
            str(candidate.priority),
            "yes" if candidate.available else "no",
            candidate.registered.distribution,
            details,
        )
    console.print(table)
    try:
        choice = manager.select_device("auto", candidates)
        console.print(f"auto device: {choice.candidate.name} ({choice.reason})")
    except TunesmithError as error:
        console.print(f"auto device: none ({error})")
