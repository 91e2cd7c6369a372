"""How a training run shows its progress: a live bar in a terminal, plain lines anywhere else.

Output redirected to a file (a batch job, ``nohup``, a CI log) gets one line per logged step
as it happens (step, loss, learning rate, tokens per second, time left), flushed at once,
rather than a bar that only a terminal can redraw.
"""

from __future__ import annotations

import time
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class StepProgress:
    """Progress of ``total`` optimizer steps, ``completed`` of them done before this run started."""

    def __init__(self, console: Console, name: str, total: int, completed: int, learning_rate: float, enabled: bool = True):
        self.console = console
        self.name = name
        self.total = total
        self.enabled = enabled
        self.started, self.first_step = time.perf_counter(), completed
        self.bar: Progress | None = None
        if enabled and console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
                TimeRemainingColumn(),
                console=console,
            )
            # Until the first logged step there is no loss to show: a dash, not "nan".
            self.task = self.bar.add_task(name, total=total, completed=completed, loss="-", lr=learning_rate, tps=0.0)

    def __enter__(self) -> StepProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.stop()

    def logged(self, step: int, loss: float, learning_rate: float, tokens_per_second: float) -> None:
        """A logged step: the bar's figures, or one plain line."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", lr=learning_rate, tps=tokens_per_second)
            return
        self.console.print(
            f"{self.name} step {step}/{self.total}  loss {loss:.4f}  lr {learning_rate:.2e}  {tokens_per_second:.0f} tok/s  "
            f"{self.time_left(step)} left",
            soft_wrap=True, markup=False, highlight=False,
        )
        self.console.file.flush()

    def advanced(self, step: int) -> None:
        """A step that was not logged: only the bar moves."""
        if self.enabled and self.bar is not None:
            self.bar.update(self.task, completed=step)

    def time_left(self, step: int) -> str:
        done = step - self.first_step
        if done <= 0:
            return "-:--:--"
        seconds = (time.perf_counter() - self.started) / done * (self.total - step)
        return str(timedelta(seconds=round(seconds)))
