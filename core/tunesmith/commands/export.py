"""``tunesmith export``: merge a trained adapter into its base model and save a standalone model folder."""

from __future__ import annotations

from pathlib import Path

import click

from tunesmith.adapters import adapter_folder, base_model
from tunesmith.models import DEFAULT_MODEL


@click.command("export")
@click.option(
    "--model",
    default=None,
    show_default=f"{DEFAULT_MODEL}; the base recorded in the run's config.yaml, or else in the adapter's adapter_config.json",
    help="Base model the adapter was trained on: a local Hugging Face model folder or the alias smollm2-135m.",
)
@click.option("--adapter", required=True, help="peft adapter folder to merge (OUTPUT/final or OUTPUT/checkpoint-N).")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Folder to write the merged model into.")
@click.option("--force/--no-force", default=False, show_default=True, help="Replace --output if it exists and is not empty.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, show_default=True, help="Allow the model folder's own Python code to run.")
@click.option("--device", default="auto", help="Device to merge on: a registered device name (tunesmith env lists them), or auto.")
def export_command(model, adapter, output, force, trust_remote_code, device):
    """Merge a LoRA/DoRA adapter into its base model; save safetensors weights and the tokenizer."""
    from tunesmith.export import export_merged
    from tunesmith.plugins import create_plugin_manager
    from tunesmith.runtime import select_runtime

    # The merge adds the low-rank update in fp32, so that it does not round twice.
    runtime = select_runtime(create_plugin_manager(), device, "fp32")
    already = f"there is nothing to merge; use or copy that folder as it is, e.g. tunesmith infer --model {adapter}"
    adapter_path = adapter_folder(adapter, if_full_model=already)
    model_name = base_model(model, adapter_path)
    if model is None:
        click.echo(f"base model: {model_name}", err=True)
    click.echo(runtime.describe(), err=True)
    export_merged(model_name, adapter_path, output, runtime, force=force, trust_remote_code=trust_remote_code)
    click.echo(f"merged model written to {output}")
