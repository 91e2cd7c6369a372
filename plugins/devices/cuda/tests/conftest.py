"""How the cuda distribution points the conformance suite at itself.

A standalone repository would also declare ``pytest_plugins = ["tunesmith.testing"]`` here; this
one lives inside the tunesmith repo, where a nested conftest may not load plugins, so
``test_cuda_conformance.py`` declares it instead.
"""

import pytest

from tunesmith.plugins import ALLOW_LIST_VARIABLE, create_plugin_manager


@pytest.fixture
def tunesmith_device_name():
    return "cuda"


@pytest.fixture
def tunesmith_plugin_manager(monkeypatch):
    # Opt in even where the allow-list hides plugins (the tunesmith repo's suite empties it).
    monkeypatch.setenv(ALLOW_LIST_VARIABLE, "tunesmith-cuda")
    return create_plugin_manager()
