"""Models and datasets named by Hub IDs (``ORG/NAME``), resolved to local folders and files.

``--model HuggingFaceTB/SmolLM2-135M-Instruct`` and ``--dataset trl-lib/Capybara`` are fetched
into (or, with ``HF_HUB_OFFLINE=1``, found in) the Hugging Face cache by ``huggingface_hub``,
with no network attempt when offline. ``--hub modelscope`` (or ``TUNESMITH_HUB=modelscope`` for
commands without the option) fetches through ModelScope instead, when its package is installed.
A local path always wins over an ID that reads the same.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tunesmith.errors import ConfigError

HUBS = ("huggingface", "modelscope")
#: ``ORG/NAME``: one slash, names of letters, digits, ``-``, ``_`` and ``.``
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
#: the data files a dataset repository's train split is read from, by suffix
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub ID and is not a local path (nor a missing data file's path, ``data/train.jsonl``)."""
    looks_like_a_file = name.lower().endswith((*DATA_SUFFIXES, ".yaml", ".txt", ".gguf", ".safetensors"))
    return bool(HUB_ID.match(name)) and not looks_like_a_file and not Path(name).expanduser().exists()


def chosen_hub(hub: str | None) -> str:
    hub = hub or os.environ.get("TUNESMITH_HUB") or "huggingface"
    if hub not in HUBS:
        raise ConfigError(f"hub {hub!r}: expected one of {', '.join(HUBS)}")
    return hub


def download(repo_id: str, kind: str, hub: str | None = None) -> Path:
    """The local folder holding Hub repository ``repo_id`` (``kind`` ``model`` or ``dataset``)."""
    if chosen_hub(hub) == "modelscope":
        return _from_modelscope(repo_id, kind)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    option = "--model" if kind == "model" else "--dataset"
    try:
        return Path(snapshot_download(repo_id, repo_type=kind))
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise ConfigError(
            f"{option} {repo_id}: not a local path, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"while {reason}; download it once with network access, or give a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{option} {repo_id}: no such {kind} on the Hugging Face Hub (or it is private: log in with `hf auth login`)") from None


def dataset_files(repo_id: str, hub: str | None = None) -> list[Path]:
    """The data files of a dataset repository's train split: those named for ``train`` (``train.jsonl``,
    ``data/train-00000-of-00002.parquet``), else every data file, in name order."""
    folder = download(repo_id, "dataset", hub)
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in DATA_SUFFIXES)
    train = [path for path in files if "train" in path.relative_to(folder).as_posix().lower()]
    if not (train or files):
        raise ConfigError(f"--dataset {repo_id}: the repository ({folder}) has no data file ({', '.join(DATA_SUFFIXES)})")
    return train or files


def _from_modelscope(repo_id: str, kind: str) -> Path:
    """Through ModelScope's own cache (``MODELSCOPE_CACHE``); offline (``HF_HUB_OFFLINE=1``, the
    one switch for every hub) only what that cache holds, with no network attempt."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ConfigError("--hub modelscope needs the modelscope package: pip install modelscope") from None
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return Path(snapshot_download(repo_id, repo_type=kind))
    try:
        return Path(snapshot_download(repo_id, repo_type=kind, local_files_only=True))
    except Exception as error:  # modelscope's error classes differ between its releases
        option = "--model" if kind == "model" else "--dataset"
        raise ConfigError(
            f"{option} {repo_id}: not a local path, and not in the ModelScope cache while HF_HUB_OFFLINE is set ({error})"
        ) from None
