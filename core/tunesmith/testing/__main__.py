"""``python -m tunesmith.testing --fault FAULT --at-write N -- COMMAND ...``: a tunesmith command with a fault armed.

See :mod:`tunesmith.testing.faults` for the faults and where they strike.
"""

from __future__ import annotations

import argparse

from tunesmith.testing.faults import FAULTS, arm_fault


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tunesmith.testing", description=__doc__.split("\n")[0])
    parser.add_argument("--fault", choices=sorted(FAULTS), required=True)
    parser.add_argument("--at-write", type=int, required=True, help="the N-th folder written atomically meets the fault")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the tunesmith command and its options")
    arguments = parser.parse_args(argv)
    command = arguments.command[1:] if arguments.command[:1] == ["--"] else arguments.command
    arm_fault(arguments.fault, arguments.at_write)

    from tunesmith.cli import main as tunesmith_main

    tunesmith_main(command)


if __name__ == "__main__":
    main()
