"""The tunesmith-next-to-TRL benchmark scripts (``bench/*_vs_trl.py``) run end to end in their
``--quick`` mode, so they cannot rot: each runs both tools as separate processes on the tiny
model and reports positive figures for both and their ratios. Nothing here judges speed."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

pytest.importorskip("trl")

BENCH = Path(__file__).resolve().parents[1] / "bench"
# sft_vs_trl's --settings best differs from its defaults only in the flags each tool is given.
SCRIPTS = {
    "sft": ("sft_vs_trl", ["--settings", "defaults"]),
    "dpo": ("dpo_vs_trl", []),
    "grpo": ("grpo_vs_trl", []),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_mode_reports_both_tools(name, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The script's main in this process (sparing a start-up); the tools it compares in their own."""
    monkeypatch.syspath_prepend(str(BENCH))
    module, options = SCRIPTS[name]
    json_path = tmp_path / "result.json"
    quick = ["--quick", "--model", str(tiny_model_dir), "--dir", str(tmp_path), "--json", str(json_path)]
    importlib.import_module(module).main([*options, *quick])
    output = capsys.readouterr().out
    result = json.loads(json_path.read_text())
    for tool in ("tunesmith", "trl"):
        figures = result["tools"][tool]
        assert figures["median_wall_s"] > 0 and figures["median_peak_rss_mib"] > 0
        assert all(rate > 0 for rate in figures["per_s"].values())
        assert f"{tool}: {figures['command']}" in output
    assert all(value > 0 for key, value in result["ratios"].items() if key != "peak_device")
    assert result["units"] and all(count > 0 for count in result["units"].values())
    assert len(result["runs"]) == 2 and result["command"].startswith(f"python bench/{module}.py")
