"""``deepspeed``: DeepSpeed ZeRO stages 0-3 with optional CPU offload of optimizer state and parameters.

DeepSpeed sets up model and optimizer together (``deepspeed.initialize`` with the optimizer
plugin's torch optimizer, so no fused op is compiled) and steps itself. tunesmith keeps the
loop: the engine runs in DeepSpeed's *unmanaged* gradient-accumulation mode, where
``backward`` only accumulates and every ``step()`` is an accumulation boundary, so a step of
any number of micro-batches is one DeepSpeed step. Gradient clipping comes from
``--max-grad-norm`` (DeepSpeed's own default of 1.0 never applies silently), precision from
``--precision``, and the ZeRO settings from ``--zero-stage`` and the offload switches, or from a
user's JSON file given with ``--deepspeed FILE``.

On a CPU-only machine DeepSpeed would JIT-compile a shared-memory communication op with a C++
compiler at start-up; this strategy bypasses it, so collectives run on the torch.distributed
backend (gloo) and no compiler is needed. Checkpoints are DeepSpeed's own
(``save_checkpoint``/``load_checkpoint``, trainable parameters only); on a different number of
processes a ZeRO-1/2 checkpoint is converted to DeepSpeed's universal checkpoint and resharded.
Under ZeRO-3 the model is created already partitioned (transformers builds it inside
``deepspeed.zero.Init``), so no process holds it whole; ``final/`` gathers the partitions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import os
import shutil
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.version import Version

from tunesmith.atomic import STAGING_PREFIX
from tunesmith.checkpoint import LoadedCheckpoint, TrainingState, read_loop_files, read_loop_state, write_loop_files
from tunesmith.errors import ConfigError
from tunesmith.strategies.process_group import ProcessGroupStrategy
from tunesmith.strategy import StepOutcome, StepSettings

MINIMUM_VERSION = "0.19.4"
ENGINE_FOLDER = "deepspeed"
CHECKPOINT_TAG = "state"
#: keys of a --deepspeed file that tunesmith sets from its own options
OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum",
    "gradient_clipping": "--max-grad-norm",
    "bf16": "--precision",
    "fp16": "--precision",
}


class DeepSpeedStrategy(ProcessGroupStrategy):
    name = "deepspeed"
    gradient_reduction = "mean"
    checkpoint_format = "deepspeed"
    #: under ZeRO-3, transformers' handle on the DeepSpeed config, kept alive while the model lives
    partitioned_init = None

    @classmethod
    def check_runnable(cls, device, precision, options):
        try:
            installed = metadata.version("deepspeed")
        except metadata.PackageNotFoundError:
            raise ConfigError("--strategy deepspeed needs the deepspeed package: pip install 'deepspeed>=0.19.4'") from None
        if Version(installed) < Version(MINIMUM_VERSION):
            raise ConfigError(
                f"--strategy deepspeed needs deepspeed {MINIMUM_VERSION} or newer (for its unmanaged gradient accumulation); "
                f"{installed} is installed: pip install -U deepspeed"
            )
        if options.get("offload_param") and not options.get("deepspeed") and options.get("zero_stage") != 3:
            raise ConfigError(f"--offload-param needs --zero-stage 3 (ZeRO partitions parameters only there), not {options.get('zero_stage')}")
        if options.get("deepspeed"):
            read_config_file(Path(options["deepspeed"]))

    @classmethod
    def reshards_checkpoints(cls, options) -> bool:
        # ZeRO-1/2 reshard exactly through DeepSpeed's universal checkpoint. Under ZeRO-3 its
        # universal loader restores the optimizer moments inexactly when there is more than one
        # parameter group (measured: 1e-4 off after one step), so such a resume is refused.
        return zero_stage(options) != 3

    def setup_environment(self) -> None:
        # DeepSpeed picks its accelerator by itself, and prints a notice on stdout unless told.
        os.environ.setdefault("DS_ACCELERATOR", self.device.type)
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        # DeepSpeed's ZeRO collectives call a torch function that torch now calls deprecated; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
        if self.device.type == "cpu":
            # `import deepspeed.comm.torch as x` would bind torch itself (deepspeed.comm re-exports it).
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        super().setup_environment()

    @contextlib.contextmanager
    def model_init_context(self):
        if zero_stage(self.options) != 3:
            yield False
            return
        # transformers creates the model inside deepspeed.zero.Init while this object is alive,
        # so each process holds only its partition of the weights from the start.
        from transformers.integrations import HfDeepSpeedConfig

        self.partitioned_init = HfDeepSpeedConfig(self.engine_config(StepSettings(1, 1, 0.0)))
        yield False

    def engine_config(self, settings) -> dict[str, Any]:
        """The DeepSpeed configuration: the user's file (if any) with the keys tunesmith owns set from its options."""
        config: dict[str, Any] = {}
        path = self.options.get("deepspeed") or ""
        if path:
            config = read_config_file(Path(path))
        else:
            zero: dict[str, Any] = {"stage": zero_stage(self.options)}
            if self.options.get("offload_optimizer"):
                zero["offload_optimizer"] = {"device": "cpu"}
            if self.options.get("offload_param"):
                zero["offload_param"] = {"device": "cpu"}
            config["zero_optimization"] = zero
        owned = {
            "train_micro_batch_size_per_gpu": settings.micro_batch_size,
            "gradient_accumulation_steps": settings.grad_accum,
            "gradient_clipping": settings.max_grad_norm,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16"},
        }
        for key, value in owned.items():
            if key in config and config[key] != value and not (isinstance(config[key], dict) and key in ("bf16", "fp16")):
                raise ConfigError(
                    f"--deepspeed {path}: {key} is {config[key]!r} there, but tunesmith sets it from {OWNED_KEYS[key]} "
                    f"({value!r}); remove it from the file or change {OWNED_KEYS[key]}"
                )
        config.pop("train_batch_size", None)
        config.update(owned)
        # The optimizer plugin's torch optimizer also steps offloaded state: DeepSpeed's own CPU Adam
        # would be JIT-compiled with a C++ compiler, and would replace the optimizer the user chose.
        config.update(
            managed_gradient_accumulation=False, zero_allow_untested_optimizer=True, zero_force_ds_cpu_optimizer=False,
            steps_per_print=2**31,
        )
        return config

    def setup(self, model, make_optimizer, settings):
        import deepspeed

        model = model.to(self.root_device)
        optimizer = make_optimizer(model)
        with launcher_variables(self.environment):
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.engine_config(settings))
        # The scheduler drives the torch optimizer whose parameter groups DeepSpeed steps with.
        return engine, optimizer

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed keeps bf16/fp16 parameters itself

    def backward(self, loss, model) -> None:
        model.backward(loss, scale_wrt_gas=False)  # the engine already normalised the loss over the step

    def optimizer_step(self, model, optimizer, max_grad_norm, loss_is_finite=True) -> StepOutcome:
        # Always step: DeepSpeed clears its gradient buffers there, and skips the update itself
        # when the gradient norm is not finite.
        model.step()
        norm = model.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        applied = bool(model.was_step_applied()) and loss_is_finite
        return StepOutcome(grad_norm, applied, loss_scale_overflow=self.precision == "fp16" and loss_is_finite and not applied)

    def unwrap(self, model):
        return getattr(model, "module", model)

    def save_checkpoint(self, folder: Path, state: TrainingState) -> None:
        def write(staging: Path) -> None:
            state.model.save_checkpoint(str(staging / ENGINE_FOLDER), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True)
            if self.is_global_zero:
                if state.tokenizer is not None:
                    state.tokenizer.save_pretrained(staging)
                write_loop_files(staging, state)
            self.save_rng_state(staging)

        self.write_atomically(folder, write)

    def load_checkpoint(self, folder: Path, state: TrainingState) -> LoadedCheckpoint:
        if not (folder / ENGINE_FOLDER / CHECKPOINT_TAG).is_dir():
            raise ConfigError(f"{folder}: no {ENGINE_FOLDER}/{CHECKPOINT_TAG}/ folder, so it was not written by --strategy deepspeed")
        saved_world_size = read_loop_state(folder).run_identity.get("world_size", self.world_size)
        if saved_world_size == self.world_size:
            self._load_engine_state(state.model, folder / ENGINE_FOLDER)
        else:
            # ZeRO shards belong to the process count that wrote them: reshard through DeepSpeed's
            # universal checkpoint, converted once (by rank 0) beside the checkpoint, never inside it.
            universal = folder.parent / f"{STAGING_PREFIX}universal-{folder.name}"
            if self.is_global_zero:
                shutil.rmtree(universal, ignore_errors=True)
                convert_to_universal(folder / ENGINE_FOLDER / CHECKPOINT_TAG, universal / CHECKPOINT_TAG)
            self.barrier()
            state.model._config.load_universal_checkpoint = True
            try:
                self._load_engine_state(state.model, universal)
            finally:
                state.model._config.load_universal_checkpoint = False
            self.barrier()
            if self.is_global_zero:
                shutil.rmtree(universal, ignore_errors=True)
        self.load_rng_state(folder)
        return read_loop_files(folder, state)

    @staticmethod
    def _load_engine_state(engine, folder: Path) -> None:
        engine.load_checkpoint(
            str(folder), tag=CHECKPOINT_TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=False
        )

    def save_final(self, folder: Path, model, tokenizer) -> None:
        import deepspeed

        module = self.unwrap(model)
        trainable = [(name, parameter) for name, parameter in module.named_parameters() if parameter.requires_grad]
        # Under ZeRO-3 each process holds a partition; gathering is a no-op for whole parameters.
        with deepspeed.zero.GatheredParameters([parameter for _, parameter in trainable], modifier_rank=None):
            full = {name: parameter.detach().float().cpu().clone() for name, parameter in trainable} if self.is_global_zero else {}

        def write(staging: Path) -> None:
            if self.is_global_zero:
                module.save_pretrained(staging, state_dict=full)
                tokenizer.save_pretrained(staging)

        self.write_atomically(folder, write)


@contextlib.contextmanager
def launcher_variables(environment):
    """DeepSpeed reads the launcher's variables even in one process that no launcher started: lend them."""
    lent = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"} if not environment.launched else {}
    lent = {name: value for name, value in lent.items() if name not in os.environ}
    os.environ.update(lent)
    try:
        yield
    finally:
        for name in lent:
            os.environ.pop(name, None)


def zero_stage(options) -> int:
    """The ZeRO stage these options choose (``--zero-stage``, or the ``--deepspeed`` file's)."""
    if options.get("deepspeed"):
        return int(read_config_file(Path(options["deepspeed"])).get("zero_optimization", {}).get("stage", 0))
    return int(options.get("zero_stage", 2))


def convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` conversion, in this process."""
    from deepspeed.checkpoint.ds_to_universal import main

    arguments = argparse.Namespace(
        input_folder=str(source), output_folder=str(target), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its progress report is not the user's business
        main(arguments)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"--deepspeed {path}: cannot read the file ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"--deepspeed {path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--deepspeed {path}: expected a JSON object of DeepSpeed settings")
    return config
