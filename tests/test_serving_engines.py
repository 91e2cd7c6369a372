"""The serving-engine hook: ``tunesmith serve --engine NAME`` picks a registered engine, which
the server's routes use exactly as the built-in ``transformers`` one."""

from __future__ import annotations

import threading

import pytest

from tests.helpers import run_cli
from tunesmith import ChoicePiece, ConfigError, PluginError, QueueFull, ServingEngine, ServingEngineSpec, hookimpl
from tunesmith.plugins import create_plugin_manager
from tunesmith.runtime import select_runtime
from tunesmith.serving.batcher import Batcher
from tunesmith.serving.engine import serving_engine_class

WORDS = ("Red", ", green", " and blue.")


class CannedEngine(ServingEngine):
    """Answers every choice with WORDS, a piece at a time, from a thread of its own; requests
    for the adapter ``busy`` find the queue full."""

    loaded_with: tuple = ()

    @classmethod
    def load(cls, model, adapters, runtime, *, max_queue, max_batch_rows, trust_remote_code):
        from transformers import AutoTokenizer

        cls.loaded_with = (model, dict(adapters), runtime.device.name, max_queue, max_batch_rows, trust_remote_code)
        engine = cls()
        engine.tokenizer, engine.max_batch_rows, engine.context_length = AutoTokenizer.from_pretrained(model), max_batch_rows, 128
        return engine

    def submit(self, job):
        if job.adapter == "busy":
            raise QueueFull("1 request is already waiting")

        def answer():
            for step, word in enumerate(WORDS):
                last = step == len(WORDS) - 1
                job.deliver([ChoicePiece(index, word, (step,), (-0.5,), "stop" if last else None) for index in range(job.n)])
            job.deliver(None)

        threading.Thread(target=answer).start()

    def cancel(self, job):
        job.cancelled.set()


class EnginePlugin:
    def __init__(self, *specs):
        self.specs = list(specs)

    @hookimpl
    def tunesmith_register_serving_engines(self):
        return self.specs


def manager_with(*specs):
    manager = create_plugin_manager()
    manager.register(EnginePlugin(*specs), "engines", distribution="engines-dist", version="1.0")
    return manager


def test_the_transformers_engine_is_built_in_and_a_plugin_engine_is_found_by_name():
    manager = manager_with(ServingEngineSpec("canned", CannedEngine, "words", devices=("cpu",)))
    runtime = select_runtime(manager, "cpu", "fp32")
    assert serving_engine_class(manager, "transformers", runtime) is Batcher
    assert serving_engine_class(manager, "canned", runtime) is CannedEngine
    assert manager.collect("serving engine")["canned"].distribution == "engines-dist"


def test_an_engine_for_other_devices_or_not_an_engine_is_refused():
    manager = manager_with(ServingEngineSpec("gpu-only", CannedEngine, devices=("cuda",)), ServingEngineSpec("odd", "collections:OrderedDict"))
    runtime = select_runtime(manager, "cpu", "fp32")
    with pytest.raises(ConfigError, match=r"serving engine 'gpu-only' runs on cuda, not on device 'cpu'; serving engines for cpu: odd, transformers"):
        serving_engine_class(manager, "gpu-only", runtime)
    with pytest.raises(PluginError, match="not a tunesmith.serving.engine.ServingEngine subclass"):
        serving_engine_class(manager, "odd", runtime)


def test_serve_with_an_unknown_engine_names_the_installed_ones(capsys):
    assert run_cli("serve", "--engine", "vllm", "--device", "cpu") != 0
    assert "no serving engine named 'vllm' is installed; installed: transformers" in capsys.readouterr().err


def test_the_routes_serve_a_plugin_engine_as_they_serve_the_built_in_one(tiny_model_dir, tmp_path):
    from starlette.testclient import TestClient

    from tunesmith.serving.server import ServerSettings, create_app

    manager = manager_with(ServingEngineSpec("canned", CannedEngine))
    runtime = select_runtime(manager, "cpu", "fp32")
    adapters = {"tuned": tmp_path, "busy": tmp_path}
    engine = serving_engine_class(manager, "canned", runtime).load(
        str(tiny_model_dir), adapters, runtime, max_queue=3, max_batch_rows=4, trust_remote_code=False
    )
    assert CannedEngine.loaded_with == (str(tiny_model_dir), adapters, "cpu", 3, 4, False)
    settings = ServerSettings("base", ("tuned", "busy"), None, 1 << 20, engine.context_length, 16)
    with TestClient(create_app(engine, settings)) as client:
        reply = client.post("/v1/chat/completions", json={"model": "tuned", "messages": [{"role": "user", "content": "Colours?"}], "n": 2})
        assert reply.status_code == 200, reply.text
        assert [choice["message"]["content"] for choice in reply.json()["choices"]] == ["".join(WORDS)] * 2
        assert reply.json()["usage"]["completion_tokens"] == 2 * len(WORDS)
        streamed = client.post("/v1/completions", json={"model": "base", "prompt": "Colours:", "stream": True})
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        assert all(word in streamed.text for word in WORDS)
        full = client.post("/v1/chat/completions", json={"model": "busy", "messages": [{"role": "user", "content": "Colours?"}]})
        assert full.status_code == 429 and "already waiting" in full.json()["error"]["message"]
        too_long = client.post("/v1/completions", json={"model": "base", "prompt": "word " * 200})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] in ("prompt", "max_tokens")
