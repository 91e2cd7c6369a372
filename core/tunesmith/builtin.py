"""Registrations of what ships inside the core: the cpu device, the built-in strategies, the
``transformers`` and ``merged`` generation backends, the ``transformers`` serving engine, the metrics loggers and
the ``serve``, ``eval`` and ``plot`` commands."""

import click

from tunesmith.hooks import hookimpl
from tunesmith.records import (
    CommandSpec,
    DeviceCapabilities,
    DeviceSpec,
    GenerationBackendSpec,
    LoggerSpec,
    OptionSpec,
    ServingEngineSpec,
    StrategySpec,
)


def cpu_is_available() -> bool:
    return True


@hookimpl
def tunesmith_register_devices():
    return [
        DeviceSpec(
            name="cpu",
            device="tunesmith.devices.cpu:CPUDevice",
            probe=cpu_is_available,
            priority=0,
            description="CPU, bf16 autocast where the CPU computes bf16 natively",
            capabilities=DeviceCapabilities(
                precisions=("fp32", "bf16", "fp16"), grad_scaler=True, distributed_backend="gloo", memory_stats=True
            ),
        )
    ]


@hookimpl
def tunesmith_register_strategies():
    return [
        StrategySpec(
            name="single",
            strategy="tunesmith.strategy:SingleDeviceStrategy",
            description="one process on one device",
        ),
        StrategySpec(
            name="ddp",
            strategy="tunesmith.strategies.ddp:DDPStrategy",
            description="data parallel: the whole model on every process, gradients averaged (DistributedDataParallel)",
            distributed=True,
        ),
        StrategySpec(
            name="fsdp",
            strategy="tunesmith.strategies.fsdp:FSDPStrategy",
            description="fully sharded data parallel (FSDP2): parameters, gradients and optimizer state sharded per decoder layer",
            distributed=True,
            options=(
                OptionSpec("fsdp_cpu_offload", False, "Keep sharded parameters, gradients and the optimizer step on the CPU."),
            ),
        ),
        StrategySpec(
            name="deepspeed",
            strategy="tunesmith.strategies.deepspeed:DeepSpeedStrategy",
            description="DeepSpeed ZeRO stage 0-3, optional CPU offload (needs the deepspeed package)",
            distributed=True,
            options=(
                OptionSpec("zero_stage", 2, "ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.", click.IntRange(0, 3)),
                OptionSpec("offload_optimizer", False, "Keep optimizer state and its step on the CPU (ZeRO-Offload)."),
                OptionSpec("offload_param", False, "Keep ZeRO-3 parameter partitions on the CPU."),
                OptionSpec("deepspeed", "", "A DeepSpeed JSON config file for the ZeRO settings; batch sizes, clipping and precision still come from tunesmith's options."),
            ),
        ),
    ]


@hookimpl
def tunesmith_register_generation_backends():
    return [
        GenerationBackendSpec(
            name="transformers",
            backend="tunesmith.generation_backend:TransformersBackend",
            description="generates with the training model itself, batched, with a KV cache",
        ),
        GenerationBackendSpec(
            name="merged",
            backend="tunesmith.generation_backend:MergedLoRABackend",
            description="generates with a copy of a LoRA policy, adapters merged into its weights: faster, the model's memory once more",
        ),
    ]


@hookimpl
def tunesmith_register_serving_engines():
    return [
        ServingEngineSpec(
            name="transformers",
            engine="tunesmith.serving.batcher:Batcher",
            description="the model with its adapters, requests batched continuously with a KV cache",
        )
    ]


@hookimpl
def tunesmith_register_loggers():
    return [
        LoggerSpec(name="jsonl", logger="tunesmith.loggers.jsonl:JsonlLogger", description="OUTPUT/metrics.jsonl, always on"),
        LoggerSpec(
            name="tensorboard",
            logger="tunesmith.loggers.tensorboard:TensorBoardLogger",
            description="TensorBoard event files in OUTPUT/runs (pip install tensorboard)",
            requires=("tensorboard",),
        ),
        LoggerSpec(
            name="wandb",
            logger="tunesmith.loggers.wandb:WandbLogger",
            description="a Weights & Biases run, files in OUTPUT/wandb; WANDB_MODE=offline keeps it local (pip install wandb)",
            requires=("wandb",),
        ),
        LoggerSpec(
            name="mlflow",
            logger="tunesmith.loggers.mlflow:MLflowLogger",
            description="an MLflow run in OUTPUT/mlruns, or at MLFLOW_TRACKING_URI (pip install mlflow)",
            requires=("mlflow",),
        ),
        LoggerSpec(
            name="trackio",
            logger="tunesmith.loggers.trackio:TrackioLogger",
            description="a Trackio run in its local database (trackio show), or on TRACKIO_SPACE_ID (pip install trackio)",
            requires=("trackio",),
        ),
    ]


@hookimpl
def tunesmith_register_commands():
    return [
        CommandSpec(
            name="serve",
            command="tunesmith.commands.serve:serve_command",
            description="Serve a model and its adapters over an OpenAI-compatible HTTP API, batching concurrent requests.",
        ),
        CommandSpec(
            name="eval",
            command="tunesmith.commands.eval:eval_command",
            description="Evaluate a model on a dataset: perplexity, or metrics of its replies against references or by reward functions.",
        ),
        CommandSpec(
            name="plot",
            command="tunesmith.commands.plot:plot_command",
            description="Plot loss, evaluation loss, learning rate and reward per step of training runs, overlaid.",
        ),
    ]
