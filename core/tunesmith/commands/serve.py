"""``tunesmith serve``: an OpenAI-compatible HTTP server for a model and its adapters."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from tunesmith.errors import ConfigError
from tunesmith.models import DEFAULT_MODEL
from tunesmith.records import PRECISION_NAMES, validate_name

API_KEY_VARIABLE = "TUNESMITH_API_KEY"


@click.command("serve")
@click.option(
    "--model",
    default=None,
    show_default=f"{DEFAULT_MODEL}; with --adapter, the base recorded with the first adapter",
    help="Local Hugging Face model folder (a merged export works too), or the built-in alias smollm2-135m.",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=DIR",
    help="Serve the peft adapter in DIR as model NAME too (repeatable); a request's model picks it.",
)
@click.option("--model-name", default=None, show_default="the --model folder's name", help="The model name requests give for the base model alone.")
@click.option("--host", default="127.0.0.1", help="Address to listen on; 0.0.0.0 listens on every interface (and needs --api-key).")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--api-key",
    envvar=API_KEY_VARIABLE,
    default=None,
    show_default=f"${API_KEY_VARIABLE}, else none",
    help="Every route but /health then needs 'Authorization: Bearer KEY'.",
)
@click.option("--max-queue", default=64, type=click.IntRange(min=1), help="Most requests waiting for a batch; more are answered 429.")
@click.option("--max-batch-size", default=32, type=click.IntRange(min=1), help="Most choices (a request's n each) generated in one batch.")
@click.option("--max-body-bytes", default=1 << 20, type=click.IntRange(min=1), help="Largest request body accepted; larger is answered 413.")
@click.option("--default-max-tokens", default=256, type=click.IntRange(min=1), help="Reply length limit for a request that sets no max_tokens.")
@click.option(
    "--engine", "engine_name", default="transformers", show_default=True,
    help="What generates the replies: a registered serving engine (tunesmith plugins lists them).",
)
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, show_default=True, help="Allow the model folder's own Python code to run.")
@click.option("--device", default="auto", help="Device to run on: a registered device name (tunesmith env lists them), or auto.")
@click.option(
    "--precision", default="auto", type=click.Choice(["auto", *PRECISION_NAMES]),
    help="Weights and compute in this precision; auto picks the device's fastest native one.",
)
def serve_command(
    model, adapters, model_name, host, port, api_key, max_queue, max_batch_size, max_body_bytes, default_max_tokens,
    engine_name, trust_remote_code, device, precision,
):
    """Serve the model and its adapters over OpenAI's HTTP API until interrupted.

    Routes: POST /v1/chat/completions and /v1/completions (streamed with "stream": true),
    GET /v1/models and GET /health. Concurrent requests for the same model or adapter are
    generated together in one batch.
    """
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as missing:
        raise ConfigError(f"tunesmith serve needs starlette and uvicorn ({missing}); install them: pip install 'tunesmith[serve]'") from None

    from tunesmith.adapters import base_model
    from tunesmith.plugins import create_plugin_manager
    from tunesmith.runtime import select_runtime
    from tunesmith.serving.engine import serving_engine_class
    from tunesmith.serving.server import ServerSettings, create_app

    if api_key is None and not _loopback(host):
        raise ConfigError(f"--host {host} accepts connections from other machines; set --api-key (or ${API_KEY_VARIABLE}) too")
    adapter_paths = parse_adapter_options(adapters)
    manager = create_plugin_manager()
    runtime = select_runtime(manager, device, precision)
    engine_class = serving_engine_class(manager, engine_name, runtime)
    base = base_model(model, next(iter(adapter_paths.values()), None))
    served_name = model_name or Path(base).name
    if served_name in adapter_paths:
        raise ConfigError(f"--adapter {served_name}=...: the base model is served under that name; give the adapter another name or set --model-name")
    click.echo(runtime.describe(), err=True)
    engine = engine_class.load(
        base, adapter_paths, runtime, max_queue=max_queue, max_batch_rows=max_batch_size, trust_remote_code=trust_remote_code
    )
    settings = ServerSettings(
        base_model=served_name,
        adapters=tuple(adapter_paths),
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        context_length=engine.context_length,
        default_max_tokens=default_max_tokens,
    )
    click.echo(f"serving {', '.join((served_name, *adapter_paths))} on http://{host}:{port}/v1", err=True)
    engine.start()
    try:
        uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="info")
    finally:
        engine.close()


def parse_adapter_options(values: tuple[str, ...]) -> dict[str, Path]:
    """``--adapter NAME=DIR`` values as checked adapter folders by name."""
    from tunesmith.adapters import adapter_folder
    from tunesmith.errors import PluginError

    adapters: dict[str, Path] = {}
    for value in values:
        name, separator, folder = value.partition("=")
        if not separator or not folder:
            raise ConfigError(f"--adapter {value}: expected NAME=DIR, e.g. --adapter support=runs/support/final")
        try:
            validate_name("adapter", name)
        except PluginError as error:
            raise ConfigError(f"--adapter {value}: {error}") from None
        if name in adapters:
            raise ConfigError(f"--adapter {value}: the name {name!r} is already given to {adapters[name]}; names must differ")
        adapters[name] = adapter_folder(folder, if_full_model="serve it with its own tunesmith serve --model instead")
    return adapters


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
