"""What a run prints while it trains: with stdout going to a file, one plain line per logged step,
written as the step happens (a bar would only show when the run ends)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from tests.helpers import chat_rows, write_jsonl


def test_a_run_writing_to_a_file_shows_each_logged_step_while_it_runs(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    log = tmp_path / "run.log"
    command = [sys.executable, "-m", "tunesmith", "sft", "--model", str(tiny_model_dir), "--dataset", str(data),
               "--output-dir", str(tmp_path / "run"), "--precision", "fp32", "--save-steps", "0", "--max-steps", "400",
               "--batch-size", "2", "--logging-steps", "2"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while len(re.findall(r"^sft step \d+/400 ", log.read_text(), re.MULTILINE)) < 2:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        finally:
            process.kill()
            process.wait()
    text = log.read_text()
    first = re.search(r"^sft step 2/400  loss (\S+)  lr (\S+)  (\d+) tok/s  (\S+) left$", text, re.MULTILINE)
    assert first, text
    assert float(first.group(1)) > 0 and float(first.group(2)) > 0
    assert "\r" not in text and "Loading weights" not in text  # no bar redrawn, no third-party bars
