"""``tunesmith plugins``: what every installed plugin registers."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from tunesmith.plugins import KINDS, create_plugin_manager


@click.command("plugins")
def plugins_command():
    """List installed plugins: kind, name, distribution, version, and whether a device or logger is usable here."""
    manager = create_plugin_manager()
    table = Table(title="tunesmith plugins")
    # As wide as the terminal: the short columns stay whole, the others wrap (a long name folds);
    # "generation backend" is the one kind that wraps.
    table.add_column("kind")
    table.add_column("name", overflow="fold")
    table.add_column("distribution", overflow="fold")
    table.add_column("version", no_wrap=True)
    table.add_column("available", no_wrap=True)
    table.add_column("description", overflow="fold")
    availability = {c.name: c.available for c in manager.device_candidates()}
    for kind in KINDS:
        for name, registered in sorted(manager.collect(kind).items()):
            if kind == "device":
                available = "yes" if availability[name] else "no"
            elif kind == "logger":  # a tracker whose package is missing is listed, and says so
                available = "no" if registered.spec.missing_modules() else "yes"
            else:
                available = ""
            table.add_row(kind, name, registered.distribution, registered.version, available, registered.spec.description)
    console = Console()
    console.print(table)
    for plugin_name, distribution, error in manager.failures:
        console.print(f"[yellow]failed to load[/] {plugin_name} (distribution {distribution}): {error}")
