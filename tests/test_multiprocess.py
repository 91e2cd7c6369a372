"""Multi-process training on CPU with gloo, 2 processes: the same results as one process, rows
shared out disjointly, and a job that stops cleanly whatever goes wrong.

Process start-up costs seconds, so these tests are few and each run is short.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.multiprocessing

from tests.helpers import TrainerPlugin, adapter_weights, cpu_device, read_metrics, run_cli, write_jsonl
from tunesmith.config import TrainConfig
from tunesmith.engine import train
from tunesmith.plugins import create_plugin_manager
from tunesmith_trainers.pt import PretrainTrainer

TIMEOUT_S = 240

#: fp32 on CPU: the two runs add the same per-row gradients in a different order (two half-batch
#: sums all-reduced, against one sum), which moves results by a few ulps per step; five steps of
#: AdamW at lr 1e-3 stay well inside this.
RTOL, ATOL = 1e-5, 1e-6


def corpus(path: Path, rows: int = 22) -> Path:
    """Rows of different lengths (so padding differs between the runs' micro-batches)."""
    return write_jsonl(path, [{"text": f"Line {i} of a small corpus about tunesmith" + " and more" * (i % 5)} for i in range(rows)])


def pt_args(model_dir, data, output, adapter: str, batch_size: int) -> list[str]:
    return [
        "pt", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(output), "--adapter", adapter,
        "--max-steps", "5", "--batch-size", str(batch_size), "--grad-accum", "2", "--precision", "fp32",
        "--lora-dropout", "0", "--learning-rate", "1e-3", "--save-steps", "2", "--logging-steps", "1",
        "--max-grad-norm", "0.5",  # below the gradient norms here, so every engine must clip as one process does
    ]


def launched(args: list[str], launcher: list[str], **env: str) -> subprocess.CompletedProcess:
    """``LAUNCHER ARGS`` in new processes (``launcher`` is TORCHRUN or TUNESMITH)."""
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1", **env}
    )


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tunesmith"]
#: DeepSpeed's own launcher, as its users type it (it passes --local_rank=N to every process)
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--module", "tunesmith"]
TUNESMITH = [sys.executable, "-m", "tunesmith"]


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return adapter_weights(output / "final")


def assert_same_training(first: Path, second: Path) -> None:
    losses = [line["loss"] for line in read_metrics(first)], [line["loss"] for line in read_metrics(second)]
    assert losses[0] == pytest.approx(losses[1], rel=RTOL), losses
    tokens = [line["num_tokens"] for line in read_metrics(first)], [line["num_tokens"] for line in read_metrics(second)]
    assert tokens[0] == tokens[1]
    a, b = final_weights(first), final_weights(second)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL, msg=key)


def pt_with(args: list[str], *extra: str) -> list[str]:
    """``pt ARGS`` with ``extra`` options inserted after the command name."""
    return [args[0], *extra, *args[1:]]


ENGINES = {
    "ddp": ["--strategy", "ddp"],
    "fsdp": ["--strategy", "fsdp"],
    "zero2": ["--strategy", "deepspeed", "--zero-stage", "2"],
    "zero3": ["--strategy", "deepspeed", "--zero-stage", "3"],
    "fsdp-offload": ["--strategy", "fsdp", "--fsdp-cpu-offload"],
    "zero2-offload": ["--strategy", "deepspeed", "--zero-stage", "2", "--offload-optimizer"],
}


@pytest.mark.parametrize(
    ("engine", "adapter", "launcher"),
    [
        ("ddp", "lora", TORCHRUN), ("fsdp-offload", "lora", TUNESMITH), ("fsdp", "full", TORCHRUN),
        ("zero2-offload", "full", DEEPSPEED), ("zero3", "lora", TORCHRUN), ("zero3", "full", TUNESMITH),
    ],
    ids=lambda value: {id(TORCHRUN): "torchrun", id(TUNESMITH): "nproc", id(DEEPSPEED): "deepspeed-launcher"}.get(id(value), value),
)
def test_two_processes_train_like_one_then_resume(tiny_model_dir, tmp_path, capsys, engine, adapter, launcher):
    # 22 rows in global batches of 8: the third step of each epoch has 6 rows, so one rank's
    # last micro-batch there is empty and runs at zero weight.
    data = corpus(tmp_path / "corpus.jsonl")
    single = tmp_path / "single"
    assert run_cli(*pt_args(tiny_model_dir, data, single, adapter, batch_size=4)) == 0

    multi = tmp_path / engine
    extra = [*ENGINES[engine], "--nproc-per-node", "2"] if launcher is TUNESMITH else ENGINES[engine]
    if launcher is DEEPSPEED:
        launcher = [*DEEPSPEED[:-2], "--master_port", str(free_port()), *DEEPSPEED[-2:]]
    result = launched(pt_with(pt_args(tiny_model_dir, data, multi, adapter, 2), *extra), launcher, DS_ACCELERATOR="cpu")
    assert result.returncode == 0, result.stderr
    assert "global batch 8 rows (--batch-size 2 x --grad-accum 2 x 2)" in result.stdout
    assert "built successfully" not in result.stdout  # DeepSpeed compiled no communication op
    assert_same_training(single, multi)
    checkpoint = multi / "checkpoint-2"
    assert {"rng_state-rank0.pt", "rng_state-rank1.pt", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    assert not any(p.name.startswith(".staging") for p in multi.iterdir())

    # Resume the 2-process checkpoint in one process with the same global batch (4 x 2 x 1):
    # ddp's whole-model checkpoint in a plain single-process run, fsdp's and ZeRO-2's resharded.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    one_process = {"ddp": ["--strategy", "single"]}.get(engine, ENGINES[engine])
    code, err = run_alone(pt_with(pt_args(tiny_model_dir, data, resumed, adapter, batch_size=4), *one_process), capsys)
    if engine == "zero3":
        # Not exact through DeepSpeed's universal checkpoint: refused before anything loads, saying what works.
        assert code != 0 and not (resumed / "metrics.jsonl").exists()
        assert "--strategy deepspeed with these options resumes only on the process count that wrote it; run 2 process(es)" in err
        return
    assert code == 0, err
    assert [line["step"] for line in read_metrics(resumed)] == [3, 4, 5]
    for key, value in final_weights(single).items():
        torch.testing.assert_close(final_weights(resumed)[key], value, rtol=RTOL, atol=ATOL, msg=key)


def run_alone(args: list[str], capsys) -> tuple[int, str]:
    """``tunesmith ARGS`` in one process: in this one, or a new one for DeepSpeed, which keeps process-wide state."""
    if "deepspeed" in args:
        result = launched(args, TUNESMITH)
        return result.returncode, result.stderr
    code = run_cli(*args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("engine", ["fsdp", "zero2"])
def test_a_checkpoint_from_one_process_resumes_on_two(tiny_model_dir, tmp_path, capsys, engine):
    data = corpus(tmp_path / "corpus.jsonl")
    single = tmp_path / "single"
    assert run_cli(*pt_args(tiny_model_dir, data, single, "lora", batch_size=4)) == 0
    one = tmp_path / "one"
    code, err = run_alone(pt_with(pt_args(tiny_model_dir, data, one, "lora", batch_size=4), *ENGINES[engine]), capsys)
    assert code == 0, err
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(one / "checkpoint-2", resumed / "checkpoint-2")

    # A different global batch is refused before any process starts, naming both process counts.
    two = (*ENGINES[engine], "--nproc-per-node", "2")
    refused = launched(pt_with(pt_args(tiny_model_dir, data, resumed, "lora", 4), *two), TUNESMITH)
    assert refused.returncode != 0
    assert "written by 1 process(es) and this run has 2" in refused.stderr and "--grad-accum" in refused.stderr

    result = launched(pt_with(pt_args(tiny_model_dir, data, resumed, "lora", 2), *two), TUNESMITH)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    assert [line["step"] for line in read_metrics(resumed)] == [3, 4, 5]
    assert not any(p.name.startswith(".staging") for p in resumed.iterdir())  # the universal conversion is gone
    for key, value in final_weights(single).items():
        torch.testing.assert_close(final_weights(resumed)[key], value, rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.parametrize("engine", ["fsdp", "zero2"])
def test_a_killed_job_rerun_ends_like_an_uninterrupted_run(tiny_model_dir, tmp_path, engine):
    data = corpus(tmp_path / "corpus.jsonl")

    def args(output: Path, batch_size: int) -> list[str]:
        return pt_args(tiny_model_dir, data, output, "lora", batch_size) + ["--max-steps", "24"]  # the last --max-steps wins

    single = tmp_path / "single"
    assert run_cli(*args(single, 4)) == 0

    killed = tmp_path / "killed"
    command = [*TUNESMITH, *pt_with(args(killed, 2), *ENGINES[engine], "--nproc-per-node", "2")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + TIMEOUT_S
    while not (killed / "checkpoint-4").is_dir():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never wrote its second checkpoint"
        time.sleep(0.01)
    # The launcher and both workers die at once, as when the machine fails (the elastic agent
    # starts workers in sessions of their own, so killing its process group would spare them).
    for doomed in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
        doomed.kill()
    process.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"

    rerun = launched(command[len(TUNESMITH):], TUNESMITH)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout
    assert [line["step"] for line in read_metrics(killed)] == list(range(1, 25))
    assert_same_training(single, killed)


class RecordingPT(PretrainTrainer):
    """``pt`` that writes the token ids of every row it trains on to a file, and logs each batch's
    share of the step's items as a metric (1.0 over a step only when metrics are reduced over ranks)."""

    log: Path | None = None

    def collate(self, rows):
        batch = super().collate(rows)
        batch["rows"] = [row[0].input_ids for row in rows]
        return batch

    def compute_loss(self, model, batch):
        if model.training:
            with open(self.log, "a", encoding="utf-8") as log:
                log.write(json.dumps(batch["rows"]) + "\n")
        output = super().compute_loss(model, batch)
        output.metrics["item_share"] = float(self.count_items(batch))
        return output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_as_rank(rank: int, world_size: int, port: int, options: list[dict], logs: list[str]) -> None:
    """One process of a hand-launched job, set up as a scheduler would (environment variables only)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    RecordingPT.log = Path(logs[rank])
    manager = create_plugin_manager()
    manager.register(TrainerPlugin("recording", RecordingPT), "recording")
    train("recording", TrainConfig(**options[rank]), manager=manager)


def recorded_steps(log: Path, micro_batches_per_step: int) -> list[list]:
    batches = [json.loads(line) for line in log.read_text().splitlines()]
    return [sum(batches[i : i + micro_batches_per_step], []) for i in range(0, len(batches), micro_batches_per_step)]


def test_each_rank_trains_on_its_own_share_of_every_step(tiny_model_dir, tmp_path):
    data = corpus(tmp_path / "corpus.jsonl", rows=16)  # two steps of 8 rows: no partial step, no filler
    evaluation = corpus(tmp_path / "eval.jsonl", rows=6)  # in pieces of 2 rows over 2 ranks, one piece is empty
    common = dict(model=str(tiny_model_dir), dataset=(str(data),), eval_dataset=(str(evaluation),), eval_steps=2,
                  max_steps=2, grad_accum=2, precision="fp32", save_steps=0)
    RecordingPT.log = tmp_path / "single.log"
    manager = create_plugin_manager()
    manager.register(TrainerPlugin("recording", RecordingPT), "recording")
    train("recording", TrainConfig(output_dir=str(tmp_path / "single"), batch_size=4, **common), manager=manager)

    options = [dict(output_dir=str(tmp_path / "ddp"), batch_size=2, strategy="ddp", **common)] * 2
    logs = [str(tmp_path / f"rank{rank}.log") for rank in range(2)]
    torch.multiprocessing.start_processes(train_as_rank, args=(2, free_port(), options, logs), nprocs=2, start_method="spawn")

    single_steps = recorded_steps(tmp_path / "single.log", 2)
    rank_steps = [recorded_steps(Path(log), 2) for log in logs]
    assert len(single_steps) == len(rank_steps[0]) == len(rank_steps[1]) == 2
    for step, seen_alone in enumerate(single_steps):
        first, second = rank_steps[0][step], rank_steps[1][step]
        assert len(first) == len(second) == 4
        assert not {tuple(row) for row in first} & {tuple(row) for row in second}
        assert sorted(first + second) == sorted(seen_alone)

    # Trainer metrics are reduced over ranks, in training and in (sharded) evaluation.
    alone, together = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [line["item_share"] for line in together if "loss" in line] == pytest.approx([1.0, 1.0])
    evaluated = [line for line in together if "eval_loss" in line]
    assert [line["eval_item_share"] for line in evaluated] == pytest.approx([1.0])
    assert evaluated[0]["eval_loss"] == pytest.approx(next(line for line in alone if "eval_loss" in line)["eval_loss"], rel=RTOL)


def test_ranks_that_chose_differently_stop_naming_the_rank(tiny_model_dir, tmp_path):
    data = corpus(tmp_path / "corpus.jsonl", rows=8)
    base = dict(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(tmp_path / "run"), max_steps=1, strategy="ddp", save_steps=0)
    options = [dict(base, precision="fp32"), dict(base, precision="bf16")]
    logs = [str(tmp_path / f"rank{rank}.log") for rank in range(2)]
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="rank 1 chose precision 'bf16' where rank 0 chose 'fp32'"):
        torch.multiprocessing.start_processes(train_as_rank, args=(2, free_port(), options, logs), nprocs=2, start_method="spawn")
    assert not (tmp_path / "run" / "final").exists()


def test_a_single_process_strategy_refuses_a_launched_job(tiny_model_dir, tmp_path):
    data = corpus(tmp_path / "corpus.jsonl", rows=8)
    output = tmp_path / "run"
    result = launched(["pt", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(output)], TORCHRUN)
    assert result.returncode != 0
    assert "--strategy single runs one process, but this job has 2; choose a multi-process strategy: ddp" in result.stderr
    assert not (output / "metrics.jsonl").exists()


def test_launch_mistakes_are_refused_before_any_process_starts(tiny_model_dir, tmp_path, capsys):
    data = corpus(tmp_path / "corpus.jsonl", rows=8)
    common = ("pt", "--model", tiny_model_dir, "--dataset", data, "--output-dir", tmp_path / "run")
    assert run_cli(*common, "--nproc-per-node", "2") != 0
    assert "choose a multi-process strategy: ddp" in capsys.readouterr().err
    assert run_cli(*common, "--strategy", "ddp", "--nnodes", "2") != 0
    assert "give --master-port" in capsys.readouterr().err
    assert run_cli(*common, "--strategy", "ddp", "--nproc-per-node", "two") != 0
    assert "expected a whole number of processes" in capsys.readouterr().err
    assert run_cli(*common, "--strategy", "deepspeed", "--nproc-per-node", "2", "--offload-param") != 0
    assert "--offload-param needs --zero-stage 3" in capsys.readouterr().err
    broken = tmp_path / "ds.json"
    broken.write_text('{"zero_optimization": {"stage": 2},\n}')
    assert run_cli(*common, "--strategy", "deepspeed", "--nproc-per-node", "2", "--deepspeed", broken) != 0
    assert f"--deepspeed {broken}: not valid JSON (line 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# Imported by every process tunesmith's launcher starts (it is first on PYTHONPATH): rank 1 breaks at its second micro-batch.
BREAK_RANK_ONE = """
import os

if os.environ.get("RANK") == "1":
    from tunesmith_trainers.pt import PretrainTrainer

    real = PretrainTrainer.compute_loss
    calls = []

    def compute_loss(self, model, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("rank one broke on purpose")
        return real(self, model, batch)

    PretrainTrainer.compute_loss = compute_loss
"""


def test_the_first_failing_rank_is_the_one_shown_and_every_rank_logs_its_error(tiny_model_dir, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BREAK_RANK_ONE)
    data = corpus(tmp_path / "corpus.jsonl", rows=8)
    output = tmp_path / "run"
    args = ["pt", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(output), "--strategy", "ddp",
            "--nproc-per-node", "2", "--max-steps", "4", "--batch-size", "1", "--save-steps", "0"]
    python_path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    result = launched(args, TUNESMITH, PYTHONPATH=python_path)  # the timeout fails the test if rank 0 hangs in its collective
    assert result.returncode == 1
    shown = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(shown) == 1, result.stderr
    assert shown[0].startswith("error: rank 1 failed first: unexpected RuntimeError: rank one broke on purpose."), shown[0]
    assert f"the full traceback is in {output / 'error-rank1.log'}" in shown[0]
    assert "rank one broke on purpose" in (output / "error-rank1.log").read_text()
    assert "Traceback" not in result.stderr
    assert not (output / "final").exists()


def test_a_deepspeed_file_may_not_override_what_tunesmith_options_set(tmp_path):
    from tunesmith.errors import ConfigError
    from tunesmith.launch import ProcessEnvironment
    from tunesmith.strategies.deepspeed import DeepSpeedStrategy
    from tunesmith.strategy import StepSettings

    settings = StepSettings(micro_batch_size=2, grad_accum=4, max_grad_norm=0.5)
    user_file = tmp_path / "ds.json"
    user_file.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "gradient_clipping": 1.0}))
    strategy = DeepSpeedStrategy(cpu_device(), "bf16", ProcessEnvironment(), {"deepspeed": str(user_file)})
    with pytest.raises(ConfigError, match="gradient_clipping is 1.0 there, but tunesmith sets it from --max-grad-norm"):
        strategy.engine_config(settings)

    user_file.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "train_batch_size": 99}))
    config = strategy.engine_config(settings)
    assert config["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["gradient_clipping"]) == (2, 4, 0.5)
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False} and "train_batch_size" not in config
    assert config["managed_gradient_accumulation"] is False

    built = DeepSpeedStrategy(cpu_device(), "fp32", ProcessEnvironment(), {"zero_stage": 1, "offload_optimizer": True}).engine_config(settings)
    assert built["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu"}}


def test_a_distributed_strategy_on_a_device_without_collectives_is_refused(tiny_model_dir, tmp_path):
    from tests.helpers import chat_rows
    from tunesmith import DeviceSpec, hookimpl
    from tunesmith.devices.cpu import CPUDevice
    from tunesmith.errors import ConfigError
    from tunesmith.runtime import plan_training

    class LonelyPlugin:
        @hookimpl
        def tunesmith_register_devices(self):
            # declares no collective backend: one process only
            return [DeviceSpec(name="lonely", device=CPUDevice, probe=lambda: True, priority=50)]

    manager = create_plugin_manager()
    manager.register(LonelyPlugin(), "lonely")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(2))
    config = TrainConfig(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(tmp_path / "run"), strategy="ddp", nproc_per_node="2")
    with pytest.raises(ConfigError, match="--strategy ddp needs collectives between processes, and device 'lonely' has no collective backend"):
        plan_training("sft", config, manager)


def train_recording_weight_loads(rank: int, world_size: int, port: int, options: dict, log: str) -> None:
    """A rank that notes whether it read the model's weights or built it empty."""
    import tunesmith.engine as engine

    real_load_model = engine.load_model

    def load_model(*args, empty=False, **kwargs):
        with open(log, "a", encoding="utf-8") as file:
            file.write(f"{rank} {'empty' if empty else 'weights'}\n")
        return real_load_model(*args, empty=empty, **kwargs)

    engine.load_model = load_model
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train("pt", TrainConfig(**options))


def test_under_fsdp_only_the_first_process_reads_the_weights(tiny_model_dir, tmp_path):
    data = corpus(tmp_path / "corpus.jsonl", rows=8)
    options = dict(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(tmp_path / "fsdp"), adapter="full", strategy="fsdp",
                   max_steps=2, batch_size=2, precision="fp32", save_steps=0, learning_rate=1e-3)
    log = tmp_path / "loads.log"
    torch.multiprocessing.start_processes(
        train_recording_weight_loads, args=(2, free_port(), options, str(log)), nprocs=2, start_method="spawn"
    )
    assert sorted(log.read_text().splitlines()) == ["0 weights", "1 empty"]
    single = tmp_path / "single"
    assert run_cli("pt", "--model", tiny_model_dir, "--dataset", data, "--output-dir", single, "--adapter", "full", "--max-steps", "2",
                   "--batch-size", "4", "--precision", "fp32", "--save-steps", "0", "--learning-rate", "1e-3") == 0
    assert_same_training(single, tmp_path / "fsdp")  # the empty rank received rank 0's weights and buffers


class OverflowOnRankOne(PretrainTrainer):
    """``pt`` whose loss on rank 1's second micro-batch is finite but too large for fp16 gradients."""

    calls = 0

    def compute_loss(self, model, batch):
        output = super().compute_loss(model, batch)
        if model.training:
            OverflowOnRankOne.calls += 1
            if os.environ["RANK"] == "1" and OverflowOnRankOne.calls == 2:
                output.loss = output.loss * 1e36
        return output


def train_overflowing(rank: int, world_size: int, port: int, options: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    manager = create_plugin_manager()
    manager.register(TrainerPlugin("overflowing", OverflowOnRankOne), "overflowing")
    train("overflowing", TrainConfig(**options), manager=manager)


def test_fsdp_fp16_skips_an_overflow_on_one_rank_on_every_rank(tiny_model_dir, tmp_path):
    data = corpus(tmp_path / "corpus.jsonl", rows=8)
    output = tmp_path / "fsdp"
    options = dict(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(output), strategy="fsdp", precision="fp16",
                   max_steps=4, batch_size=2, save_steps=0, max_bad_steps=1)
    torch.multiprocessing.start_processes(train_overflowing, args=(2, free_port(), options), nprocs=2, start_method="spawn")
    lines = [line for line in read_metrics(output) if "loss" in line]
    assert [line["skipped_steps"] for line in lines] == [0, 1, 1, 1]  # an overflow lowers the scale; no bad step
    assert all(math.isfinite(line["loss"]) for line in lines[2:])
    assert all(torch.isfinite(tensor).all() for tensor in final_weights(output).values())


def train_recording_partitions(rank: int, world_size: int, port: int, options: dict, log: str) -> None:
    """A rank that notes whether the model it created was already partitioned by ZeRO-3."""
    import tunesmith.engine as engine

    real_load_model = engine.load_model

    def load_model(*args, **kwargs):
        model = real_load_model(*args, **kwargs)
        with open(log, "a", encoding="utf-8") as file:
            file.write(f"{rank} {all(hasattr(p, 'ds_id') for p in model.parameters())}\n")
        return model

    engine.load_model = load_model
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train("pt", TrainConfig(**options))


def test_under_zero3_the_model_is_created_partitioned(tiny_model_dir, tmp_path):
    data = corpus(tmp_path / "corpus.jsonl", rows=8)
    options = dict(model=str(tiny_model_dir), dataset=(str(data),), output_dir=str(tmp_path / "zero3"), adapter="full",
                   strategy="deepspeed", plugin_options={"zero_stage": 3}, max_steps=1, batch_size=2, precision="fp32", save_steps=0)
    log = tmp_path / "partitions.log"
    torch.multiprocessing.start_processes(
        train_recording_partitions, args=(2, free_port(), options, str(log)), nprocs=2, start_method="spawn"
    )
    assert sorted(log.read_text().splitlines()) == ["0 True", "1 True"]
    assert (tmp_path / "zero3" / "final" / "model.safetensors").is_file()


def use_collectives(rank: int, world_size: int, port: int, log: str) -> None:
    from tunesmith.launch import ProcessEnvironment
    from tunesmith.strategies.ddp import DDPStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    strategy = DDPStrategy(cpu_device(), "fp32", ProcessEnvironment(rank, world_size, rank, world_size, launched=True))
    strategy.setup_environment()
    try:
        mine = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
        results = {
            "sum": strategy.reduce(mine).tolist(),
            "mean": strategy.reduce(mine, "mean").tolist(),
            "max": strategy.reduce(mine, "max").tolist(),
            "min": strategy.reduce(mine, "min").tolist(),
            "all_gather": strategy.all_gather(mine).tolist(),
            "broadcast": strategy.broadcast(mine, src=1).tolist(),
            "objects": strategy.all_gather_object({"rank": rank}),
            "unchanged": mine.tolist(),
        }
        strategy.barrier()
        with open(log, "a", encoding="utf-8") as file:
            file.write(json.dumps(results) + "\n")
    finally:
        strategy.teardown()


def test_collectives_combine_every_process(tmp_path):
    log = tmp_path / "collectives.log"
    torch.multiprocessing.start_processes(use_collectives, args=(2, free_port(), str(log)), nprocs=2, start_method="spawn")
    first, second = [json.loads(line) for line in log.read_text().splitlines()]
    for results in (first, second):
        assert results["sum"] == [3.0, 30.0] and results["mean"] == [1.5, 15.0]
        assert results["max"] == [2.0, 20.0] and results["min"] == [1.0, 10.0]
        assert results["all_gather"] == [[1.0, 10.0], [2.0, 20.0]]
        assert results["broadcast"] == [2.0, 20.0]
        assert results["objects"] == [{"rank": 0}, {"rank": 1}]
    assert sorted([first["unchanged"], second["unchanged"]]) == [[1.0, 10.0], [2.0, 20.0]]  # inputs are not modified in place


def generate_as_rank(rank: int, world_size: int, port: int, tokenizer_dir: str, work: list, output: str) -> None:
    """One FSDP2 process generating its own prompts with the sharded toy model of test_generation."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoTokenizer

    from tests.test_generation import GREEDY, toy_model
    from tunesmith.generation import every_process_finished, generate_batch
    from tunesmith.launch import ProcessEnvironment
    from tunesmith.strategies.fsdp import FSDPStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    strategy = FSDPStrategy(cpu_device(), "fp32", ProcessEnvironment(rank, world_size, rank, world_size, launched=True))
    strategy.setup_environment()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = toy_model(tokenizer)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    prompts, stop_strings = work[rank]
    completions = generate_batch(
        model, tokenizer, prompts, GREEDY, stop_strings=stop_strings, all_finished=every_process_finished(strategy)
    )
    result = {"token_ids": [c.token_ids for c in completions], "finish_reasons": [c.finish_reason for c in completions]}
    Path(output, f"rank{rank}.json").write_text(json.dumps({**result, "forwards": len(forwards)}))
    strategy.teardown()


def test_sharded_processes_that_finish_at_different_steps_generate_in_lockstep(tiny_model_dir, tmp_path):
    # Every FSDP2 forward gathers parameters from both processes: had the early finisher stopped
    # stepping, the other would wait for it forever. Each generates what it would alone.
    from transformers import AutoTokenizer

    from tests.test_generation import GREEDY, PROMPTS, toy_model
    from tunesmith.generation import generate_batch

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = toy_model(tokenizer)
    first = generate_batch(model, tokenizer, PROMPTS[:1], GREEDY)[0].token_ids
    work = [(PROMPTS[:1], [tokenizer.decode(first[1:3])]), (PROMPTS[1:], [])]  # rank 0 stops by its third token
    alone = [generate_batch(model, tokenizer, prompts, GREEDY, stop_strings=stops) for prompts, stops in work]
    assert alone[0][0].finish_reason == "stop" and len(alone[0][0].token_ids) <= 3
    assert all(c.finish_reason == "length" for c in alone[1])

    context = torch.multiprocessing.start_processes(
        generate_as_rank, args=(2, free_port(), str(tiny_model_dir), work, str(tmp_path)), nprocs=2, start_method="spawn", join=False
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the processes did not finish within {TIMEOUT_S} s: one is waiting for the other")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result, expected in zip(results, alone):
        assert result["token_ids"] == [c.token_ids for c in expected]
        assert result["finish_reasons"] == [c.finish_reason for c in expected]
    assert results[0]["forwards"] == results[1]["forwards"] == GREEDY.max_new_tokens
