"""The training loop shared by every trainer.

Read top to bottom: choose hardware, build model and data, restore the newest checkpoint,
then repeat (micro-batches -> loss -> backward -> clip -> step) with logging, evaluation and
atomic checkpoints. Trainers supply the objective; devices and strategies the hardware and
parallelism; the loop itself never changes for them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunesmith.atomic import remove_staging_leftovers
from tunesmith.checkpoint import LoopState, find_resume_checkpoint, read_loop_state, rotate_checkpoints
from tunesmith.config import TrainConfig, write_config
from tunesmith.data.order import BatchOrder
from tunesmith.data.setup import build_training_data
from tunesmith.data.tokenize import ensure_chat_template
from tunesmith.device import Device
from tunesmith.errors import ConfigError, TrainingError
from tunesmith.metrics import MetricsLog
from tunesmith.models import apply_adapter, load_model, load_tokenizer, resolve_model
from tunesmith.optimization import build_scheduler, parameter_groups, warmup_steps
from tunesmith.plugins import PluginManager, build_device, create_plugin_manager
from tunesmith.strategy import Strategy
from tunesmith.trainer import Trainer


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    steps: int
    device: str
    precision: str


def train(trainer_name: str, config: TrainConfig, manager: PluginManager | None = None, console: Console | None = None) -> RunResult:
    manager = manager or create_plugin_manager()
    console = console or Console()
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir}: exists and is not a folder")

    # Hardware: the device plugin and the parallel strategy.
    choice = manager.select_device(config.device)
    device: Device = build_device(choice.candidate.registered)
    strategy: Strategy = manager.get("strategy", config.strategy).load()(device)
    strategy.setup_environment()
    precision = device.resolve_precision(config.precision)
    build_optimizer = manager.get("optimizer", config.optimizer).load()
    trainer_class = manager.get("trainer", trainer_name).load()

    def say(message: str) -> None:
        if strategy.is_global_zero:  # plain log lines: no wrapping, no markup in user paths
            console.print(message, soft_wrap=True, markup=False, highlight=False)

    say(f"device: {device.describe()}, {choice.reason}; precision: {precision}; strategy: {config.strategy}")
    device.seed(config.seed)

    # Model, tokenizer and data.
    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path, config.trust_remote_code)
    ensure_chat_template(tokenizer)
    trainer: Trainer = trainer_class(tokenizer, config)
    trainer.name = trainer_name
    data = build_training_data(trainer, config)
    say(data.describe())
    model = load_model(model_path, config.trust_remote_code)
    model = apply_adapter(model, config.adapter, config.lora_rank, config.lora_alpha, config.lora_dropout, config.target_modules)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = strategy.setup_model(model)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"model: {config.model} ({config.adapter}); trainable parameters {trainable:,} of {total:,}")

    optimizer = strategy.setup_optimizer(build_optimizer(parameter_groups(model, config.weight_decay), config.learning_rate))
    order = BatchOrder(len(data.train_rows), config.batch_size, config.seed)
    total_steps = config.max_steps or math.ceil(config.epochs * order.micro_batches_per_epoch / config.grad_accum)
    scheduler = build_scheduler(
        config.lr_scheduler, optimizer, total_steps, warmup_steps(total_steps, config.warmup_steps, config.warmup_ratio)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # Resume from the newest complete checkpoint, if any.
    metrics = MetricsLog(output_dir / "metrics.jsonl")
    state = LoopState()
    if strategy.is_global_zero:
        remove_staging_leftovers(output_dir)
    identity = run_identity(trainer_name, config)
    resume_from = find_resume_checkpoint(output_dir, config.resume)
    if resume_from is not None:
        check_resumable(resume_from, identity, total_steps)
        # The checkpoint brings back optimizer state and schedule position; the rates and weight
        # decay are this run's options (a resumed run may change them).
        chosen = [{key: group[key] for key in ("initial_lr", "weight_decay")} for group in optimizer.param_groups]
        loaded = strategy.load_checkpoint(resume_from, model, optimizer, scheduler)
        for group, values in zip(optimizer.param_groups, chosen):
            group.update(values)
        scheduler.base_lrs = [values["initial_lr"] for values in chosen]
        state = loaded.loop_state
        device.set_rng_state(loaded.rng_state)
        if loaded.scaler_state is not None:
            scaler.load_state_dict(loaded.scaler_state)
        # Continue on this run's schedule (a larger --max-steps stretches it) from the saved step.
        for group, base_rate, rate_at in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_rate * rate_at(scheduler.last_epoch)
        say(f"resuming from {resume_from} (step {state.step} of {total_steps})")
    state.run_identity = identity
    if strategy.is_global_zero:
        metrics.truncate_after(state.step)
        write_config(config, output_dir / "config.yaml")

    def save(step_state: LoopState) -> None:
        strategy.save_checkpoint(
            output_dir / f"checkpoint-{step_state.step}",
            model,
            optimizer,
            scheduler,
            device.get_rng_state(),
            step_state,
            scaler.state_dict() if scaler.is_enabled() else None,
            tokenizer,
        )
        if strategy.is_global_zero:
            rotate_checkpoints(output_dir, config.save_total_limit)

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not strategy.is_global_zero,
    )
    interval_tokens, interval_start = 0, time.perf_counter()
    with progress:
        task = progress.add_task(trainer_name, total=total_steps, completed=state.step, loss=float("nan"), lr=scheduler.get_last_lr()[0], tps=0.0)
        while state.step < total_steps:
            # One optimizer step over --grad-accum micro-batches, normalised by every item in the step.
            micro_batches = []
            for _ in range(config.grad_accum):
                if not config.max_steps and state.epoch >= config.epochs:
                    break  # training by epochs: the last step ends where the data does
                rows = [data.train_rows[i] for i in order.indices(state.epoch, state.micro_batch)]
                micro_batches.append(trainer.collate(rows))
                state.epoch, state.micro_batch = order.advance(state.epoch, state.micro_batch)
            loss, logged = accumulate_gradients(model, trainer, micro_batches, strategy, device, precision, scaler)

            scaler.unscale_(optimizer)
            grad_norm = float(strategy.clip_grad_norm(model.parameters(), config.max_grad_norm))
            state.step += 1
            if math.isfinite(loss) and math.isfinite(grad_norm):
                strategy.optimizer_step(optimizer, scaler)
                state.bad_steps_in_a_row = 0
            else:
                state.skipped_steps += 1
                # An fp16 overflow with a finite loss only means the loss scale was too high;
                # the scaler lowers it below. Anything else is a real non-finite step.
                if not (scaler.is_enabled() and math.isfinite(loss)):
                    state.bad_steps_in_a_row += 1
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step_learning_rate = optimizer.param_groups[0]["lr"]
            scheduler.step()

            step_tokens = int(strategy.reduce_sum(torch.tensor(sum(b["num_input_tokens"] for b in micro_batches))))
            state.num_tokens += step_tokens
            interval_tokens += step_tokens
            if state.bad_steps_in_a_row >= config.max_bad_steps:
                raise TrainingError(
                    f"stopped at step {state.step}: {state.bad_steps_in_a_row} steps in a row had a non-finite loss or "
                    f"gradient (--max-bad-steps {config.max_bad_steps}); the last checkpoint in {output_dir} is intact. "
                    "Lower --learning-rate, set --max-grad-norm, or check the data."
                )

            if state.step % config.logging_steps == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - interval_start
                tokens_per_second = interval_tokens / elapsed if elapsed > 0 else 0.0
                record = {
                    "step": state.step,
                    "epoch": record_epoch(state, order),
                    "loss": loss,
                    "learning_rate": step_learning_rate,
                    "grad_norm": grad_norm,
                    "num_tokens": state.num_tokens,
                    "tokens_per_second": tokens_per_second,
                    "skipped_steps": state.skipped_steps,
                    "memory_peak_bytes": device.memory_stats().get("peak"),
                    "device": device.name,
                    **logged,
                }
                if strategy.is_global_zero:
                    metrics.write(record)
                progress.update(task, completed=state.step, loss=loss, lr=record["learning_rate"], tps=tokens_per_second)
                interval_tokens, interval_start = 0, time.perf_counter()
            else:
                progress.update(task, completed=state.step)

            if data.eval_rows and (state.step % config.eval_steps == 0 or state.step == total_steps):
                eval_loss = evaluate(model, trainer, data.eval_rows, config.batch_size, device, precision, strategy)
                if strategy.is_global_zero:
                    metrics.write({"step": state.step, "epoch": record_epoch(state, order), "eval_loss": eval_loss, "device": device.name})
                say(f"step {state.step}: eval_loss {eval_loss:.4f}")
            if config.save_steps and state.step % config.save_steps == 0:
                save(state)

    final_dir = output_dir / "final"
    strategy.save_final(final_dir, model, tokenizer)
    say(f"done: {state.step} steps; result in {final_dir}")
    strategy.teardown()
    return RunResult(output_dir, final_dir, state.step, device.name, precision)


#: options a checkpoint can only be resumed with unchanged: they shape the weights and optimizer
#: state, or decide which rows each step sees.
RESUME_INVARIANTS = (
    "model", "adapter", "lora_rank", "lora_alpha", "target_modules", "optimizer",
    "dataset", "val_split", "batch_size", "grad_accum", "packing", "max_length", "seed",
)


def run_identity(trainer_name: str, config: TrainConfig) -> dict[str, Any]:
    options = config.to_dict()
    return {"trainer": trainer_name, **{key: options[key] for key in RESUME_INVARIANTS}}


def check_resumable(checkpoint: Path, identity: dict[str, Any], total_steps: int) -> None:
    """Refuse to resume a checkpoint written by a different run, or one past this run's end."""
    saved = read_loop_state(checkpoint)
    changed = [
        f"{key}: {saved.run_identity[key]!r} in the checkpoint, {identity[key]!r} now"
        for key in identity
        if key in saved.run_identity and saved.run_identity[key] != identity[key]
    ]
    if changed:
        raise ConfigError(
            f"{checkpoint} was written by a run with other options ({'; '.join(changed)}); "
            "use the same options, or another --output-dir to start afresh"
        )
    if saved.step > total_steps:
        raise ConfigError(
            f"{checkpoint} is at step {saved.step}, past this run's {total_steps} steps; "
            "raise --max-steps or --epochs, or use another --output-dir to start afresh"
        )


def record_epoch(state: LoopState, order: BatchOrder) -> float:
    return state.epoch + state.micro_batch / order.micro_batches_per_epoch


def accumulate_gradients(model, trainer: Trainer, micro_batches, strategy: Strategy, device: Device, precision: str, scaler):
    """Forward and backward every micro-batch of one optimizer step; return the step's mean loss and metrics.

    Each micro-batch's summed loss is divided by the item count of the whole step (over all
    processes), so accumulation gives the gradient of one large batch.
    """
    items = strategy.reduce_sum(torch.tensor(sum(trainer.count_items(b) for b in micro_batches), dtype=torch.float64))
    items = max(float(items), 1.0)
    loss_total = torch.zeros((), dtype=torch.float64)
    logged: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        batch = move_to(batch, strategy.root_device)
        with strategy.no_sync(model, index < len(micro_batches) - 1), device.autocast(precision):
            output = trainer.compute_loss(model, batch)
        strategy.backward(scaler.scale(output.loss / items))
        loss_total += output.loss.detach().double().cpu()
        for key, value in output.metrics.items():
            logged[key] = logged.get(key, 0.0) + float(value) / items
    return float(strategy.reduce_sum(loss_total)) / items, logged


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@torch.no_grad()
def evaluate(model, trainer: Trainer, rows, batch_size: int, device: Device, precision: str, strategy: Strategy) -> float:
    """Mean loss per item over the evaluation rows."""
    model.eval()
    loss_sum, items = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = trainer.collate(rows[start : start + batch_size])
        items += trainer.count_items(batch)
        with device.autocast(precision):
            loss_sum += float(trainer.compute_loss(model, move_to(batch, strategy.root_device)).loss)
    model.train()
    loss_sum = float(strategy.reduce_sum(torch.tensor(loss_sum, dtype=torch.float64)))
    items = int(strategy.reduce_sum(torch.tensor(items)))
    return loss_sum / max(items, 1)
