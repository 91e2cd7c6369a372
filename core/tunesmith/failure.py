"""How a failed command tells the user: one message, never a traceback on the terminal.

An expected failure (:class:`~tunesmith.errors.TunesmithError`) is its message. An unexpected
exception is a one-paragraph summary, with the full traceback written to a log file
(``OUTPUT/error.log`` for training, a file under the tunesmith cache for other commands) that
the message names. In a multi-process run that tunesmith launched, each process leaves its
message in the launch's failure folder instead of printing it, and the launcher shows the
message of the process that failed first: the others usually failed because it did.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

#: set by :func:`tunesmith.launch.launch_processes` for the processes it starts
FAILURE_FOLDER_VARIABLE = "TUNESMITH_FAILURE_DIR"

_failed_at: float | None = None


def note_failure_time() -> None:
    """Remember when this process met its error, before cleaning up lets the others notice and fail too."""
    global _failed_at
    if _failed_at is None:
        _failed_at = time.time()


def write_traceback(log: Path) -> Path:
    """Write the exception being handled, with its traceback, to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(traceback.format_exc(), encoding="utf-8")
    return log


def unexpected_error_message(error: BaseException, log: Path) -> str:
    return (
        f"unexpected {type(error).__name__}: {error}. This is a bug in tunesmith or in a plugin, not in your input; "
        f"the full traceback is in {log} (please attach it to a bug report)."
    )


def process_rank() -> int | None:
    """This process's rank when it is one of several, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


def leave_for_launcher(message: str, exit_code: int) -> bool:
    """Under tunesmith's launcher, record this process's failure for it to show; False when not launched by it."""
    folder = os.environ.get(FAILURE_FOLDER_VARIABLE)
    rank = process_rank()
    if not folder or rank is None:
        return False
    record = {"rank": rank, "time": _failed_at or time.time(), "message": message, "exit_code": exit_code}
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    return True


@dataclass(frozen=True)
class ProcessFailure:
    rank: int
    message: str
    exit_code: int


def first_failure(folder: Path) -> ProcessFailure | None:
    """The earliest failure the launched processes recorded in ``folder``, if any did."""
    records = [json.loads(path.read_text(encoding="utf-8")) for path in folder.glob("rank*.json")]
    if not records:
        return None
    first = min(records, key=lambda record: record["time"])
    return ProcessFailure(first["rank"], first["message"], first["exit_code"])
