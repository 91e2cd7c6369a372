"""Run a Python command and, when it ends, write its peak CUDA memory to a file.

    python bench/device_memory.py OUT.json -m tunesmith sft ...
    python bench/device_memory.py OUT.json bench/trl_sft.py ...

runs the module (``-m``) or script as ``python`` would, in this process; at its exit (normal,
``sys.exit`` or an exception) it writes ``{"peak_mib": torch.cuda.max_memory_allocated() / 2**20}``
to ``OUT.json`` if the command used CUDA, and nothing otherwise. The harness wraps both tools'
commands in it, so both are measured the same way.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def main() -> None:
    out, *command = sys.argv[1:]
    try:
        if command[0] == "-m":
            sys.argv = [command[1], *command[2:]]
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = command
            sys.path.insert(0, str(Path(command[0]).resolve().parent))
            runpy.run_path(command[0], run_name="__main__")
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            Path(out).write_text(json.dumps({"peak_mib": torch.cuda.max_memory_allocated() / 2**20}))


if __name__ == "__main__":
    main()
