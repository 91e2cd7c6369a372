"""The built-in sft trainer, single strategy and adamw optimizer pass the checkpoint fault suite
(``tunesmith.testing``) that plugins run against themselves."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tunesmith.testing")
pytest_plugins = ["tunesmith.testing"]

from tests.helpers import chat_rows, write_jsonl  # noqa: E402
from tunesmith.testing import CheckpointFaults  # noqa: E402


@pytest.fixture(scope="session")  # one command for every test, so the suite runs its uninterrupted reference once
def tunesmith_fault_command(tiny_model_dir, tmp_path_factory):
    data = write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_rows(8))
    return ["sft", "--model", tiny_model_dir, "--dataset", data, "--batch-size", "2", "--precision", "fp32",
            "--lr-scheduler", "constant", "--learning-rate", "1e-3"]


class TestSFTCheckpointFaults(CheckpointFaults):
    pass
