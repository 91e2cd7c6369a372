"""Points the conformance suite (and this directory's own tests) at the ``mps`` device.

``test_mps_conformance.py`` declares ``pytest_plugins = ["tunesmith.testing"]`` rather than this
file: inside the tunesmith repo a nested conftest may not load plugins.
"""

import pytest

from tunesmith.plugins import ALLOW_LIST_VARIABLE, create_plugin_manager


@pytest.fixture
def tunesmith_device_name():
    return "mps"


@pytest.fixture
def tunesmith_plugin_manager(monkeypatch):
    # Opt in even where the allow-list hides plugins (the tunesmith repo's suite empties it).
    monkeypatch.setenv(ALLOW_LIST_VARIABLE, "tunesmith-mps")
    return create_plugin_manager()
