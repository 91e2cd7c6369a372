"""Stopping a training run cleanly when asked to: SIGTERM (a scheduler preempting the job, ``kill``) or Ctrl-C.

While the training loop runs, either signal only records that a stop was asked for. The loop
asks once per optimizer step, after the step, and through the strategy's ``max`` collective,
so every process of a multi-process run stops after the same step even when the signal reached
them at different moments (or reached only one). The loop then writes a checkpoint the way it
always does and stops with :class:`~tunesmith.errors.Stopped`, whose exit code is 128 plus the
signal's number (130 for Ctrl-C, 143 for SIGTERM), what a shell shows for a process the signal
ended.

A second Ctrl-C stops at once, even mid-checkpoint: the folder being written is abandoned,
and since checkpoints are written atomically (:mod:`tunesmith.atomic`) a partial one is never
taken for a complete one. So does a SIGTERM that comes more than ``PASSED_ON_SECONDS`` after
a Ctrl-C: torch's launcher, pressed Ctrl-C twice, forwards the first as SIGINT and then sends
SIGTERM. One that comes sooner is the same Ctrl-C passed on: DeepSpeed's launcher answers the
terminal's Ctrl-C, which its workers also receive, with SIGTERM to each of them. A SIGTERM
after a SIGTERM is ignored: schedulers send it to every process of a job and launchers forward
their own, so one process may well receive two.
"""

from __future__ import annotations

import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: a SIGTERM this soon after a Ctrl-C is a launcher passing the Ctrl-C on, not a second request
PASSED_ON_SECONDS = 1.0


class StopRequests:
    """A context manager that turns SIGTERM and SIGINT into a request the loop reads between steps.

    The handlers are installed on entering and the previous ones put back on leaving. Python
    runs signal handlers in the main thread only, so elsewhere (a loop started from a thread)
    nothing is installed and nothing is ever requested.
    """

    def __init__(self) -> None:
        #: the first stop signal received, 0 while none was
        self.signal_number = 0
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.getsignal(number)
                signal.signal(number, self._receive)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, previous in self._previous.items():
            # None: a handler installed from C, which Python cannot put back; the default is closest.
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _receive(self, number: int, frame) -> None:
        if not self.signal_number:
            self.signal_number, self._received_at = number, time.monotonic()
            return
        passed_on = number == signal.SIGTERM and time.monotonic() - self._received_at < PASSED_ON_SECONDS
        if signal.SIGINT in (number, self.signal_number) and not passed_on:
            self._restore()
            raise KeyboardInterrupt

    def agreed(self, strategy) -> int:
        """The stop signal any process received (the highest number), 0 when none did.

        A collective: every process calls it at the same point of every step.
        """
        import torch  # here, so that the launcher reading STOP_SIGNALS does not import it

        requested = torch.tensor([self.signal_number], dtype=torch.int32)
        return int(strategy.reduce(requested, op="max").item())


def exit_code(signal_number: int) -> int:
    """What a shell reports for a process ended by this signal."""
    return 128 + signal_number


def signal_name(signal_number: int) -> str:
    return "Ctrl-C (SIGINT)" if signal_number == signal.SIGINT else signal.Signals(signal_number).name
