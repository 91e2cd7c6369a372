"""Starting the processes of a multi-process run, and reading where this process sits in one.

A training command works the same whichever way its processes were started: by tunesmith
itself (``--nproc-per-node N``, through torch's elastic launcher ``torch.distributed.run``),
by ``torchrun``, by the ``deepspeed`` launcher, or by a scheduler. All of them describe the job
to each process with the environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
(``LOCAL_WORLD_SIZE``), ``MASTER_ADDR`` and ``MASTER_PORT``; :class:`ProcessEnvironment` reads
them. When a command finds none of them and more than one process is asked for, it starts the
processes itself with :func:`launch_processes`, each running the same command from the
resolved options.
"""

from __future__ import annotations

import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tunesmith.errors import ConfigError, Stopped, TrainingError
from tunesmith.failure import FAILURE_FOLDER_VARIABLE, ProcessFailure, first_failure
from tunesmith.preemption import STOP_SIGNALS, exit_code, signal_name

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: torch's elastic agent waits this long for workers it forwarded SIGTERM or SIGINT to, then kills them
SHUTDOWN_TIMEOUT_VARIABLE = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
#: how long tunesmith's launcher gives stopping workers to finish their step and save a checkpoint
WORKER_STOP_SECONDS = 600


@dataclass(frozen=True)
class ProcessEnvironment:
    """This process's place in the job (all zeros and ones when it runs alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    #: whether a launcher (or scheduler) started this process as part of a job
    launched: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ProcessEnvironment:
        environ = os.environ if environ is None else environ
        if not any(name in environ for name in LAUNCHER_VARIABLES):
            return cls()
        missing = [name for name in LAUNCHER_VARIABLES if name not in environ]
        if missing:
            raise ConfigError(
                f"the launcher set {', '.join(n for n in LAUNCHER_VARIABLES if n in environ)} but not {', '.join(missing)}; "
                "a process started by torchrun, deepspeed or a scheduler needs RANK, WORLD_SIZE and LOCAL_RANK"
            )
        rank, world_size, local_rank = (_whole_number(environ, name) for name in LAUNCHER_VARIABLES)
        local_world_size = _whole_number(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world_size
        if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank < max(local_world_size, 1):
            raise ConfigError(
                f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}, "
                f"LOCAL_WORLD_SIZE={local_world_size}"
            )
        return cls(rank, world_size, local_rank, local_world_size, launched=True)


def _whole_number(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected a whole number") from None


@dataclass(frozen=True)
class LaunchOptions:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def launch_processes(command: str, config, options: LaunchOptions) -> None:
    """Run ``tunesmith COMMAND --config RESOLVED.yaml`` in ``nproc_per_node`` processes on this machine.

    Returns when every process has finished; a process that fails stops the others (the
    elastic agent's behaviour) and this raises :class:`~tunesmith.errors.TrainingError` with
    the message of the process that failed first (:mod:`tunesmith.failure`). SIGTERM or Ctrl-C
    reaches the workers through the agent; they save a checkpoint (:mod:`tunesmith.preemption`)
    and this raises :class:`~tunesmith.errors.Stopped` with what they said.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from tunesmith.config import write_config

    if options.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Each process gets its share of the cores (the launcher would otherwise set 1 and warn).
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // options.nproc_per_node))
    with tempfile.TemporaryDirectory(prefix="tunesmith-launch-") as folder:
        resolved = Path(folder) / "config.yaml"
        write_config(config, resolved)
        if options.nnodes == 1 and options.master_port == 0:
            rendezvous = ["--standalone"]  # a free port on this machine
        else:
            rendezvous = [
                "--nnodes", str(options.nnodes), "--node-rank", str(options.node_rank),
                "--master-addr", options.master_addr, "--master-port", str(options.master_port),
            ]
        arguments = [
            "--nproc-per-node", str(options.nproc_per_node), *rendezvous, "--max-restarts", "0",
            "-m", "tunesmith", command, "--config", str(resolved),
        ]
        failures = Path(folder) / "failures"
        failures.mkdir()
        os.environ[FAILURE_FOLDER_VARIABLE] = str(failures)
        # The elastic agent turns SIGTERM and SIGINT into SignalException, forwards the signal to
        # the workers (in sessions of their own, so a terminal's Ctrl-C reaches only the agent)
        # and kills them after the shutdown timeout: long enough here for them to save a checkpoint.
        os.environ.setdefault(SHUTDOWN_TIMEOUT_VARIABLE, str(WORKER_STOP_SECONDS))
        handlers = {number: signal.getsignal(number) for number in STOP_SIGNALS}
        try:
            run(parse_args(arguments))
        except ChildFailedError as failed:
            first = first_failure(failures)
            codes = {failure.exitcode for failure in failed.failures.values()}
            if first is not None and codes == {first.exit_code} and _stopped_by_signal(first):
                raise Stopped(first.message, first.exit_code) from None  # the workers were sent the signal, not the launcher
            raise _job_failure(failed, first) from None
        except SignalException as stopped:
            raise _job_stopped(stopped.sigval, first_failure(failures), config.output_dir) from None
        finally:
            del os.environ[FAILURE_FOLDER_VARIABLE]
            for number, handler in handlers.items():  # the agent leaves its own installed
                if handler is not None:
                    signal.signal(number, handler)


def _stopped_by_signal(failure: ProcessFailure) -> bool:
    return failure.exit_code in {exit_code(number) for number in STOP_SIGNALS}


def _job_stopped(number: int, first: ProcessFailure | None, output_dir: str) -> Stopped:
    """What the workers said when they stopped on the signal the launcher forwarded to them."""
    if first is not None and _stopped_by_signal(first):
        return Stopped(first.message, first.exit_code)
    return Stopped(
        f"stopped by {signal_name(number)} before the processes could save a checkpoint; the newest complete checkpoint "
        f"in {output_dir}, if any, is intact, and the same command run again resumes from it",
        exit_code(number),
    )


def _job_failure(failed, first: ProcessFailure | None) -> TrainingError:
    """The error of the process that failed first, or what the launcher saw when none could say."""
    codes = ", ".join(f"rank {rank} (exit code {failure.exitcode})" for rank, failure in sorted(failed.failures.items()))
    if first is None:
        return TrainingError(f"{codes} failed without a message (killed by a signal?), which stopped the run")
    error = TrainingError(f"rank {first.rank} failed first: {first.message} [processes that stopped: {codes}]")
    error.exit_code = first.exit_code
    return error

