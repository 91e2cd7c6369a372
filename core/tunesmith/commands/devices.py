"""``tunesmith devices``: the capability matrix, read from what each device plugin declares.

One column per installed device, one row per capability; ``--markdown`` prints the table the
README shows.
"""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from tunesmith.plugins import create_plugin_manager
from tunesmith.records import DeviceCandidate

CAPABILITIES = ("distribution", "priority", "precisions", "fp16 loss scaling", "collectives", "strategies", "quantization", "memory stats")


def capability_column(candidate: DeviceCandidate) -> list[str]:
    """What ``candidate`` declares, in the order of :data:`CAPABILITIES`."""
    spec = candidate.registered.spec
    capabilities = spec.capabilities
    return [
        candidate.registered.distribution,
        str(spec.priority),
        ", ".join(capabilities.precisions),
        "yes" if capabilities.grad_scaler else "no",
        capabilities.distributed_backend or "none: one process",
        ", ".join(capabilities.strategies) if capabilities.strategies is not None else "all",
        ", ".join(capabilities.quantization) or "none",
        "yes" if capabilities.memory_stats else "no",
    ]


def markdown_matrix(candidates: list[DeviceCandidate]) -> str:
    columns = [capability_column(candidate) for candidate in candidates]
    lines = ["| | " + " | ".join(f"`{candidate.name}`" for candidate in candidates) + " |", "|---|" + "---|" * len(candidates)]
    lines += [f"| {name} | " + " | ".join(column[row] for column in columns) + " |" for row, name in enumerate(CAPABILITIES)]
    return "\n".join(lines)


@click.command("devices")
@click.option("--markdown", is_flag=True, help="Print the matrix as a Markdown table, as the README shows it (without availability).")
def devices_command(markdown):
    """Show what every installed device can do, as its plugin declares it, and whether it is available here."""
    candidates = create_plugin_manager().device_candidates()
    if markdown:
        click.echo(markdown_matrix(candidates))
        return
    table = Table(title="device capabilities")
    table.add_column("", no_wrap=True)
    for candidate in candidates:
        table.add_column(candidate.name, overflow="fold")
    columns = [capability_column(candidate) for candidate in candidates]
    for row, name in enumerate(CAPABILITIES):
        table.add_row(name, *(column[row] for column in columns))
    table.add_row("available here", *("yes" if c.available else f"no: {c.reason}" for c in candidates))
    Console().print(table)
