"""The training loop shared by every trainer.

Read top to bottom: plan the run (device, precision, strategy, checkpoint to resume), build
model and data, let the strategy set up model and optimizer, restore the newest checkpoint,
then repeat (the step source's next step: this rank's micro-batches -> loss -> backward ->
strategy step) with logging, evaluation and atomic checkpoints. Trainers supply the objective;
devices and strategies the hardware, precision and parallelism; the loop itself never changes
for them. Every process of a multi-process run runs this same loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tunesmith.atomic import remove_staging_leftovers
from tunesmith.checkpoint import LoopState, TrainingState, advice_on_storage_errors, list_checkpoints, rotate_checkpoints
from tunesmith.config import TrainConfig, write_config
from tunesmith.data.examples import CONVERSATION_FORMATS
from tunesmith.data.setup import build_training_data
from tunesmith.data.sharding import shard_step
from tunesmith.data.tokenize import ensure_chat_template
from tunesmith.device import widest_float
from tunesmith.devices.malloc import return_large_blocks_to_the_system
from tunesmith.errors import ConfigError, Stopped, StorageError, TrainingError
from tunesmith.failure import note_failure_time
from tunesmith.loggers import open_loggers
from tunesmith.models import apply_adapter, load_model, load_tokenizer, resolve_model
from tunesmith.optimization import build_scheduler, parameter_groups, warmup_steps
from tunesmith.plugins import PluginManager, create_plugin_manager
from tunesmith.preemption import StopRequests, exit_code, signal_name
from tunesmith.progress import StepProgress
from tunesmith.reference import ReferenceModel
from tunesmith.resume import check_within_schedule, schedule_change
from tunesmith.runtime import TrainingPlan, plan_training, strategy_options
from tunesmith.steps import DatasetSteps, StepPlan, StepSource
from tunesmith.storage import checkpoint_shortage
from tunesmith.strategy import StepSettings, Strategy
from tunesmith.trainer import Trainer, TrainerContext


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    steps: int
    device: str
    precision: str


def train(
    trainer_name: str,
    config: TrainConfig,
    manager: PluginManager | None = None,
    console: Console | None = None,
    plan: TrainingPlan | None = None,
) -> RunResult:
    manager = manager or create_plugin_manager()
    console = console or Console()
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output-dir {output_dir}: exists and is not a folder")
    plan = plan or plan_training(trainer_name, config, manager)
    options = strategy_options(plan.strategy, config)
    strategy: Strategy = plan.strategy.load()(plan.device, plan.precision, plan.environment, options)
    strategy.name = plan.strategy.spec.name
    strategy.setup_environment()
    try:
        return _train(plan, manager.get("trainer", trainer_name), manager, strategy, console)
    except BaseException:
        note_failure_time()  # before teardown closes the connections the other processes wait on
        raise
    finally:
        strategy.teardown()


def _train(plan: TrainingPlan, trainer_record, manager: PluginManager, strategy: Strategy, console: Console) -> RunResult:
    config, device, trainer_name = plan.config, plan.device, plan.trainer_name
    output_dir = Path(config.output_dir)

    def say(message: str) -> None:
        if strategy.is_global_zero:  # plain log lines: no wrapping, no markup in user paths
            console.print(message, soft_wrap=True, markup=False, highlight=False)

    check_every_rank_agrees(strategy, {"device": device.name, "precision": plan.precision, "strategy": strategy.name, "trainer": trainer_name})
    say(f"device: {device.describe()}, {plan.device_reason}; precision: {plan.precision}; strategy: {strategy.name}")
    advice = device.precision_advice(plan.precision, training=True)
    if advice:
        say(advice)
    if strategy.world_size > 1:
        say(
            f"processes: {strategy.world_size} ({strategy.dp_size} data-parallel); global batch {plan.global_batch} rows "
            f"(--batch-size {config.batch_size} x --grad-accum {config.grad_accum} x {strategy.dp_size})"
        )
    device.seed(config.seed)

    # Model, tokenizer and data.
    tokenizer = load_tokenizer(plan.model_path, config.trust_remote_code)
    ensure_chat_template(tokenizer)
    trainer: Trainer = trainer_record.load()(tokenizer, config)
    trainer.name = trainer_name
    trainer.row_formats = trainer_record.spec.row_formats or CONVERSATION_FORMATS
    data = build_training_data(trainer, config)
    say(data.describe())
    quantization = device.quantization_config(config.adapter) if config.adapter in device.capabilities.quantization else None
    with strategy.model_init_context() as empty:
        model = load_model(
            plan.model_path, config.trust_remote_code, dtype=frozen_weights_dtype(config.adapter, plan.precision, strategy),
            empty=empty, attn_implementation=device.attention_implementation(),
            quantization_config=quantization, model_kind=trainer_record.spec.model_kind, pad_token_id=tokenizer.pad_token_id,
        )
    model = device.prepare_model(model)
    model = apply_adapter(
        model, config.adapter, config.lora_rank, config.lora_alpha, config.lora_dropout, config.target_modules, trainer_record.spec.model_kind
    )
    if config.gradient_checkpointing or config.low_memory:
        enable_activation_checkpointing(model)
    if config.release_memory or config.low_memory:
        return_large_blocks_to_the_system()
    if config.compile:
        model.compile()  # in place: the module, its parameters and their names stay what they were
    trainable = sum(parameter_size(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_size(p) for p in model.parameters())
    build_optimizer = manager.get("optimizer", config.optimizer).load()
    model, optimizer = strategy.setup(
        model,
        lambda module: build_optimizer(parameter_groups(module, config.weight_decay), config.learning_rate),
        StepSettings(config.batch_size, config.grad_accum, config.max_grad_norm),
    )
    model.train()
    say(f"model: {config.model} ({config.adapter}); trainable parameters {trainable:,} of {total:,}")

    def make_reference(path: str | None) -> ReferenceModel:
        def load_copy():
            return load_model(resolve_model(path, config.hub) if path else plan.model_path, config.trust_remote_code,
                              attn_implementation=device.attention_implementation())

        return ReferenceModel(strategy, shares_weights=config.adapter != "full" and path is None, load_copy=load_copy)

    trainer_options = {spec.name: config.plugin_options.get(spec.name, spec.default) for spec in trainer_record.spec.options}
    trainer.setup(TrainerContext(strategy, device, plan.precision, manager, trainer_options, make_reference))

    # Packed rows are all close to --max-length already: grouping them would only sort them.
    step_plan = StepPlan(plan.global_batch, config.batch_size, config.seed, group_by_length=config.group_by_length and not config.packing)
    source: StepSource = trainer.step_source(data.train_rows, step_plan) or DatasetSteps(data.train_rows, step_plan, strategy)
    total_steps = config.max_steps or config.epochs * source.steps_per_epoch
    scheduler = build_scheduler(
        config.lr_scheduler, optimizer, total_steps, warmup_steps(total_steps, config.warmup_steps, config.warmup_ratio)
    )
    state = TrainingState(model, optimizer, scheduler, LoopState(), tokenizer, trainer)

    # Resume from the newest complete checkpoint, if any.
    if strategy.is_global_zero:
        remove_staging_leftovers(output_dir)
    strategy.barrier()
    if plan.resume_from is not None:
        check_within_schedule(plan.resume_from, total_steps)
        # The checkpoint brings back optimizer state and schedule position; the rates and weight
        # decay are this run's options (a resumed run may change them).
        chosen = [{key: group[key] for key in ("initial_lr", "weight_decay")} for group in optimizer.param_groups]
        loaded = strategy.load_checkpoint(plan.resume_from, state)
        state.loop_state = loaded.loop_state
        rate_then = scheduler.get_last_lr()[0]
        source.load_state_dict(loaded.step_source_state)
        for group, values in zip(optimizer.param_groups, chosen):
            group.update(values)
        scheduler.base_lrs = [values["initial_lr"] for values in chosen]
        # Continue on this run's schedule (a larger --max-steps stretches it) from the saved step.
        for group, base_rate, rate_at in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_rate * rate_at(scheduler.last_epoch)
        say(f"resuming from {plan.resume_from} (step {state.loop_state.step} of {total_steps})")
        change = schedule_change(
            state.loop_state, total_steps, config.lr_scheduler, rate_then, optimizer.param_groups[0]["lr"]
        )
        if change:
            say(change)
    loop = state.loop_state
    loop.run_identity, loop.total_steps = plan.identity, total_steps
    if strategy.is_global_zero:
        write_config(config, output_dir / "config.yaml")

    def save() -> Path:
        folder = output_dir / f"checkpoint-{loop.step}"
        with advice_on_storage_errors(output_dir, config.save_total_limit):
            shortage = None
            if strategy.is_global_zero:
                rotate_checkpoints(output_dir, config.save_total_limit, making_room=True)
                newest = list_checkpoints(output_dir)[-1:]
                shortage = checkpoint_shortage(folder, newest[0][1] if newest else None, model, optimizer)
            shortage = strategy.all_gather_object(shortage)[0]
            if shortage:
                raise StorageError(shortage)
            state.step_source_state = source.state_dict()
            strategy.save_checkpoint(folder, state)
        if strategy.is_global_zero:
            rotate_checkpoints(output_dir, config.save_total_limit)
        return folder

    interval_tokens, interval_start = 0, time.perf_counter()
    step_metrics: dict[str, float] = {}  # what the source measured making steps since the last logged one
    logged_losses: list[float] = []  # the first and the latest finite logged loss
    if loop.step >= total_steps:
        say(f"nothing left to train: {loop.step} of {total_steps} steps were done already; writing the result again")
    progress = StepProgress(console, trainer_name, total_steps, loop.step, scheduler.get_last_lr()[0], enabled=strategy.is_global_zero)
    loggers = open_loggers(manager, config.report_to, output_dir, first_process=strategy.is_global_zero)
    with progress, loggers.run(config.to_dict(), step=loop.step), StopRequests() as stop_requests:
        while loop.step < total_steps:
            # One optimizer step: this rank's share of the step's rows, in micro-batches.
            step = source.next_step(model)
            step_metrics.update(step.metrics)
            loss, logged, step_tokens = accumulate_gradients(model, trainer, step.pieces, step.filler, strategy)

            outcome = strategy.optimizer_step(model, optimizer, config.max_grad_norm, loss_is_finite=math.isfinite(loss))
            loop.step += 1
            if outcome.applied:
                loop.bad_steps_in_a_row = 0
            else:
                loop.skipped_steps += 1
                if not outcome.loss_scale_overflow:
                    loop.bad_steps_in_a_row += 1
            step_learning_rate = optimizer.param_groups[0]["lr"]
            scheduler.step()

            loop.num_tokens += step_tokens
            interval_tokens += step_tokens
            if loop.bad_steps_in_a_row >= config.max_bad_steps:
                raise TrainingError(
                    f"stopped at step {loop.step}: {loop.bad_steps_in_a_row} steps in a row had a non-finite loss or "
                    f"gradient (--max-bad-steps {config.max_bad_steps}); the last checkpoint in {output_dir} is intact. "
                    "Lower --learning-rate, set --max-grad-norm, or check the data."
                )

            if loop.step % config.logging_steps == 0 or loop.step == total_steps:
                elapsed = time.perf_counter() - interval_start
                tokens_per_second = interval_tokens / elapsed if elapsed > 0 else 0.0
                record = {
                    "step": loop.step,
                    "epoch": source.epoch_progress(),
                    "loss": loss,
                    "learning_rate": step_learning_rate,
                    "grad_norm": outcome.grad_norm,
                    "num_tokens": loop.num_tokens,
                    "tokens_per_second": tokens_per_second,
                    "skipped_steps": loop.skipped_steps,
                    "memory_peak_bytes": device.memory_stats().get("peak"),
                    "device": device.name,
                    **step_metrics,
                    **logged,
                }
                step_metrics = {}
                if math.isfinite(loss):
                    logged_losses[1:] = [loss]
                loggers.log(record)
                progress.logged(loop.step, loss, record["learning_rate"], tokens_per_second)
                interval_tokens, interval_start = 0, time.perf_counter()
            else:
                progress.advanced(loop.step)

            if data.eval_rows and (loop.step % config.eval_steps == 0 or loop.step == total_steps):
                evaluation = evaluate(model, trainer, data.eval_rows, config.batch_size, strategy)
                loggers.log({"step": loop.step, "epoch": source.epoch_progress(), **evaluation, "device": device.name})
                say(f"step {loop.step}: eval_loss {evaluation['eval_loss']:.4f}")
            saved_now = config.save_steps and loop.step % config.save_steps == 0
            if saved_now:
                save()
            stop = stop_requests.agreed(strategy)
            if stop:
                folder = output_dir / f"checkpoint-{loop.step}" if saved_now else save()
                raise Stopped(
                    f"stopped by {signal_name(stop)} after step {loop.step} of {total_steps}; saved {folder}. "
                    "Run the same command again to resume from it",
                    exit_code(stop),
                )

    final_dir = output_dir / "final"
    with advice_on_storage_errors(output_dir, config.save_total_limit):
        strategy.save_final(final_dir, model, tokenizer)
    say(f"done: {loop.step} steps; result in {final_dir}")
    hint = rising_loss_hint(logged_losses, config.learning_rate)
    if hint:
        say(hint)
    return RunResult(output_dir, final_dir, loop.step, device.name, plan.precision)


def rising_loss_hint(losses: list[float], learning_rate: float) -> str | None:
    """A word when a run ends with its loss well above where it began (the first and last
    logged), the mark of a learning rate too high; small swings (an RL loss near 0) say nothing."""
    if len(losses) < 2:
        return None
    first, last = losses
    if first <= 0 or last < 1.5 * first or last - first < 0.5:
        return None
    return (
        f"note: the training loss rose from {first:.4f} to {last:.4f}: a --learning-rate too high ({learning_rate:g}) "
        "is the usual cause; fine-tuning takes about 1e-5 to 1e-3 (LoRA at the top of that range)"
    )


def frozen_weights_dtype(adapter: str, precision: str, strategy: Strategy) -> torch.dtype:
    """The dtype the base model's weights are loaded in: bf16 when only an adapter is trained and compute is bf16.

    Autocast would otherwise cast every frozen fp32 weight to bf16 on every forward and keep the
    copies for backward, and the fp32 residual stream would be stored in fp32; the adapter's own
    weights stay fp32 (peft upcasts them). Strategies that shard or flatten the parameters need
    one dtype and keep fp32. fp16 keeps fp32 weights: an fp16 residual stream can overflow.
    """
    if adapter in ("lora", "dora") and precision == "bf16" and strategy.holds_frozen_weights_in_compute_dtype:
        return torch.bfloat16
    return torch.float32


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in backward: transformers' newer name where it has it, the older one else."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def parameter_size(parameter: torch.Tensor) -> int:
    """Elements of the whole parameter, also when ZeRO-3 holds only a partition here (``ds_numel``)."""
    return getattr(parameter, "ds_numel", parameter.numel())


def check_every_rank_agrees(strategy: Strategy, choices: dict[str, str]) -> None:
    """Every process must have made rank 0's choices (the same plugins installed, the same options)."""
    gathered = strategy.all_gather_object(choices)
    for rank, theirs in enumerate(gathered[1:], start=1):
        different = [f"{key} {theirs.get(key)!r} where rank 0 chose {value!r}" for key, value in gathered[0].items() if theirs.get(key) != value]
        if different:
            raise ConfigError(
                f"rank {rank} chose {', '.join(different)}; every process needs the same plugins installed and the same options"
            )


def accumulate_gradients(model, trainer: Trainer, pieces, filler, strategy: Strategy):
    """Forward and backward this rank's micro-batches of one optimizer step.

    Returns the step's mean loss per item, its trainer metrics per item, and the tokens
    trained on, all over every rank. Each micro-batch's summed loss is divided by the item
    count of the whole step over all ranks (and scaled for the strategy's gradient reduction),
    so the applied gradient is the one of the whole global batch in one process. An empty
    piece (the step's rows ran out) runs ``filler`` at zero weight: forward and backward are
    collective, so every rank takes part in every micro-batch.
    """
    batches = [(trainer.collate(rows or filler), 1.0 if rows else 0.0) for rows in pieces]
    local = torch.tensor(
        [sum(trainer.count_items(batch) * weight for batch, weight in batches),
         sum(trainer.count_input_tokens(batch) * weight for batch, weight in batches)],
        dtype=torch.float64,
    )
    items, tokens = strategy.reduce(local).tolist()
    items = max(items, 1.0)
    backward_scale = strategy.dp_size if strategy.gradient_reduction == "mean" else 1
    # Losses and metrics stay where they were computed until the step's one reduction: reading
    # each micro-batch's value back would make the host wait for the device every micro-batch.
    losses: list[torch.Tensor] = []
    logged: dict[str, list[Any]] = {}
    for index, (batch, weight) in enumerate(batches):
        batch = move_to(batch, strategy.root_device)
        with strategy.no_sync(model, index < len(batches) - 1), strategy.autocast():
            output = trainer.compute_loss(model, batch)
        strategy.backward(output.loss * (weight * backward_scale / items), model)
        losses.append(output.loss.detach() * weight)
        for key, value in output.metrics.items():
            logged.setdefault(key, []).append(value * weight)
    keys = sorted(logged)
    totals = strategy.reduce(torch.stack([summed(losses, strategy.root_device), *(summed(logged[key], strategy.root_device) for key in keys)])).tolist()
    return totals[0] / items, {key: value / items for key, value in zip(keys, totals[1:])}, int(tokens)


def summed(values: list[Any], device: torch.device) -> torch.Tensor:
    """The sum, on ``device``, of numbers and tensors (one element each), in float64 where the device has it."""
    dtype = widest_float(device)
    return torch.stack([torch.as_tensor(value, device=device).detach().reshape(()).to(dtype) for value in values]).sum()


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``; float64 ones in float32 where the device has no float64 (MPS)."""
    narrowed = widest_float(device)

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, dtype=narrowed) if tensor.dtype == torch.float64 else tensor.to(device)

    return {key: moved(value) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@torch.no_grad()
def evaluate(model, trainer: Trainer, rows, batch_size: int, strategy: Strategy) -> dict[str, float]:
    """``eval_loss`` and the trainer's metrics, per item over every evaluation row (shared out among ranks)."""
    model.eval()
    loss_sum, items = 0.0, 0.0
    logged: dict[str, float] = {}
    for piece in shard_step(rows, strategy.dp_size, strategy.dp_rank, batch_size):
        weight = 1.0 if piece else 0.0
        batch = trainer.collate(piece or rows[:1])
        items += trainer.count_items(batch) * weight
        with strategy.autocast():
            output = trainer.compute_loss(model, move_to(batch, strategy.root_device))
        loss_sum += float(output.loss) * weight
        for key, value in output.metrics.items():
            logged[key] = logged.get(key, 0.0) + float(value) * weight
    model.train()
    keys = sorted(logged)
    totals = strategy.reduce(torch.tensor([loss_sum, items, *(logged[key] for key in keys)], dtype=torch.float64)).tolist()
    items = max(totals[1], 1.0)
    return {"eval_loss": totals[0] / items, **{f"eval_{key}": value / items for key, value in zip(keys, totals[2:])}}
