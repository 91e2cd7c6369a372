"""``fsdp``: PyTorch FSDP2 (``fully_shard``). Parameters, gradients and optimizer state are
sharded across processes: each decoder layer is its own unit, gathered for its forward and
backward and freed after, then the root module takes what is left (embeddings, head, norms).
Only the first process reads the weights; the others build the model on the meta device and
receive their shards (and the buffers) from it, so no other process holds the whole model.

Mixed precision is FSDP's ``MixedPrecisionPolicy`` (parameters computed in bf16 or fp16,
gradients reduced in fp32), not autocast, with a sharded loss scaler for fp16; ``--fsdp-cpu-offload`` keeps the sharded parameters and the
optimizer step on the CPU. Checkpoints are written by every process through
``torch.distributed.checkpoint`` (only trainable parameters and their optimizer state), which
reshards on load, so a run resumes on a different number of processes. ``final/`` holds full,
unsharded weights gathered to the first process.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tunesmith.checkpoint import LoadedCheckpoint, TrainingState, read_loop_files, write_loop_files
from tunesmith.device import PRECISION_DTYPES
from tunesmith.errors import ConfigError
from tunesmith.strategies.process_group import ProcessGroupStrategy

SHARDED_FOLDER = "sharded"


class FSDPStrategy(ProcessGroupStrategy):
    name = "fsdp"
    gradient_reduction = "mean"
    checkpoint_format = "dcp"

    def __init__(self, device, precision, environment=None, options=None):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        super().__init__(device, precision, environment, options)
        # Each process holds only its shards' gradients: the scaler agrees on overflow across processes.
        self.scaler = ShardedGradScaler(device.type, enabled=precision == "fp16")
        self.cpu_offload = bool(self.options.get("fsdp_cpu_offload", False))
        self.tied_names: set[str] = set()
        self.built_empty = False

    @contextlib.contextmanager
    def model_init_context(self):
        # Only the first process reads the weights; the others build an empty model and receive
        # their shards in setup, so no other process ever holds the whole model.
        self.built_empty = self.world_size > 1 and not self.is_global_zero
        yield self.built_empty

    def setup(self, model, make_optimizer, settings):
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        mesh = init_device_mesh(self.root_device.type, (self.world_size,))
        compute_dtype = None if self.precision == "fp32" else PRECISION_DTYPES[self.precision]
        settings = dict(
            mesh=mesh,
            mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32),
            # Pinned host memory needs an accelerator; on a CPU device the "offload" stays where it is.
            offload_policy=CPUOffloadPolicy(pin_memory=self.root_device.type != "cpu") if self.cpu_offload else OffloadPolicy(),
        )
        full = model.state_dict() if self.world_size > 1 and self.is_global_zero else {}
        if not self.cpu_offload and not self.built_empty:
            model = model.to(self.root_device)
        # Tied weights (embeddings and head) come out of a full state dict twice; save_final keeps one.
        self.tied_names = {name for name, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
        layer_classes = set(next((m._no_split_modules for m in model.modules() if getattr(m, "_no_split_modules", None)), ()))
        for module in model.modules():
            if type(module).__name__ in layer_classes:
                fully_shard(module, **settings)
        fully_shard(model, **settings)
        if self.world_size > 1:
            if self.built_empty:
                model.to_empty(device="cpu" if self.cpu_offload else self.root_device)
            set_model_state_dict(model, full, options=self._state_dict_options(full_state_dict=True, broadcast_from_rank0=True))
            for buffer in model.buffers():  # not in the state dict when non-persistent (rotary frequencies)
                dist.broadcast(buffer, src=0)
        return model, make_optimizer(model)

    def autocast(self):
        return contextlib.nullcontext()  # the mixed-precision policy casts parameters itself

    def clip_grad_norm(self, model, max_norm):
        norm = super().clip_grad_norm(model, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _state_dict_options(self, **extra):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, **extra)

    def save_checkpoint(self, folder: Path, state: TrainingState) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        def write(staging: Path) -> None:
            model_state, optimizer_state = get_state_dict(state.model, state.optimizer, options=self._state_dict_options())
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging / SHARDED_FOLDER)
            if self.is_global_zero:
                if state.tokenizer is not None:
                    state.tokenizer.save_pretrained(staging)
                write_loop_files(staging, state, self.scaler.state_dict() if self.scaler.is_enabled() else None)
            self.save_rng_state(staging)

        self.write_atomically(folder, write)

    def load_checkpoint(self, folder: Path, state: TrainingState) -> LoadedCheckpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (folder / SHARDED_FOLDER).is_dir():
            raise ConfigError(f"{folder}: no {SHARDED_FOLDER}/ folder, so it was not written by --strategy fsdp")
        model_state, optimizer_state = get_state_dict(state.model, state.optimizer, options=self._state_dict_options())
        saved = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(saved, checkpoint_id=folder / SHARDED_FOLDER)
        set_state_dict(
            state.model, state.optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"],
            # dcp.load already failed on any trainable tensor missing from the checkpoint; the
            # frozen base weights are not in it by design.
            options=self._state_dict_options(strict=False),
        )
        self.load_rng_state(folder)
        loaded = read_loop_files(folder, state)
        if loaded.scaler_state is not None:
            self.scaler.load_state_dict(loaded.scaler_state)
        return loaded

    def save_final(self, folder: Path, model, tokenizer) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=self._state_dict_options(full_state_dict=True, cpu_offload=True))
        full = {name: tensor for name, tensor in full.items() if name not in self.tied_names}

        def write(staging: Path) -> None:
            if self.is_global_zero:
                model.save_pretrained(staging, state_dict=full)
                tokenizer.save_pretrained(staging)

        self.write_atomically(folder, write)
