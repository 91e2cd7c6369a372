"""The generation-backend hook: registration, listing, and choosing a backend by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import cpu_device, run_cli
from tunesmith.errors import ConfigError, PluginError
from tunesmith.generation import GenerationOptions, generate_batch
from tunesmith.generation_backend import GenerationBackend, MergedLoRABackend, TransformersBackend, create_generation_backend
from tunesmith.hooks import hookimpl
from tunesmith.plugins import create_plugin_manager
from tunesmith.records import GenerationBackendSpec


class EchoBackend(GenerationBackend):
    """Completes every prompt with the prompt itself; counts weight syncs."""

    synced = 0

    def generate(self, prompts, options, *, num_return_sequences=1, generator=None, stop_strings=(), all_finished=None):
        from tunesmith.generation import Completion

        return [Completion(i, list(p), "", "length") for i, p in enumerate(prompts) for _ in range(num_return_sequences)]

    def sync_weights(self, model):
        self.synced += 1


class BackendPlugin:
    def __init__(self, *specs: GenerationBackendSpec):
        self.specs = list(specs)

    @hookimpl
    def tunesmith_register_generation_backends(self):
        return self.specs


def manager_with(*specs: GenerationBackendSpec, distribution: str = "backends-dist"):
    manager = create_plugin_manager()
    manager.register(BackendPlugin(*specs), "backends", distribution=distribution, version="2.0")
    return manager


def test_the_transformers_backend_is_built_in_and_listed(monkeypatch, capsys):
    registered = create_plugin_manager().collect("generation backend")["transformers"]
    assert (registered.plugin, registered.distribution, registered.spec.devices) == ("tunesmith:builtin", "tunesmith", ())
    assert registered.load() is TransformersBackend

    monkeypatch.setenv("COLUMNS", "200")
    assert run_cli("plugins") == 0
    rows = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    assert any(row.startswith("generation backend transformers tunesmith") for row in rows), rows


def test_a_plugin_backend_is_chosen_by_name_and_made_for_the_model():
    manager = manager_with(GenerationBackendSpec("echo", EchoBackend, "prompts back", devices=("cpu", "cuda")))
    assert manager.collect("generation backend")["echo"].distribution == "backends-dist"
    device = cpu_device()
    backend = create_generation_backend(manager, "echo", "the model", "the tokenizer", device)
    assert isinstance(backend, EchoBackend)
    assert (backend.model, backend.tokenizer, backend.device) == ("the model", "the tokenizer", device)
    assert [c.token_ids for c in backend.generate([[1, 2]], GenerationOptions(), num_return_sequences=2)] == [[1, 2], [1, 2]]
    backend.sync_weights("the updated model")
    assert backend.synced == 1


def test_asking_for_a_missing_backend_lists_the_installed_ones():
    manager = manager_with(GenerationBackendSpec("echo", EchoBackend))
    with pytest.raises(PluginError, match=r"no generation backend named 'vllm' is installed; installed: echo, merged, transformers"):
        create_generation_backend(manager, "vllm", None, None, cpu_device())


def test_a_backend_for_other_devices_is_refused_naming_those_that_fit():
    manager = manager_with(GenerationBackendSpec("gpu-only", EchoBackend, devices=("cuda",)))
    with pytest.raises(ConfigError, match=r"generation backend 'gpu-only' runs on cuda, not on device 'cpu'; generation backends for cpu: merged, transformers"):
        create_generation_backend(manager, "gpu-only", None, None, cpu_device())


def test_a_dotted_path_is_imported_only_when_chosen_and_must_name_a_backend():
    manager = manager_with(
        GenerationBackendSpec("missing", "no_such_engine.backend:Backend"),
        GenerationBackendSpec("not-a-backend", "collections:OrderedDict"),
    )
    assert set(manager.collect("generation backend")) == {"missing", "not-a-backend", "merged", "transformers"}
    with pytest.raises(PluginError, match=r"'missing' from plugin backends \(distribution backends-dist\) could not be imported"):
        create_generation_backend(manager, "missing", None, None, cpu_device())
    with pytest.raises(PluginError, match="not a tunesmith.generation_backend.GenerationBackend subclass"):
        create_generation_backend(manager, "not-a-backend", None, None, cpu_device())


def test_records_are_validated_and_duplicates_name_both_distributions():
    with pytest.raises(PluginError, match="invalid generation backend name 'vLLM'"):
        GenerationBackendSpec("vLLM", EchoBackend)
    with pytest.raises(PluginError, match="devices 'cuda': expected a tuple"):
        GenerationBackendSpec("fast", EchoBackend, devices="cuda")
    with pytest.raises(PluginError, match="generation backend 'transformers' is registered twice") as duplicate:
        manager_with(GenerationBackendSpec("transformers", EchoBackend), distribution="other-dist").collect("generation backend")
    assert "(distribution tunesmith)" in str(duplicate.value) and "(distribution other-dist)" in str(duplicate.value)


def test_the_transformers_backend_generates_as_generate_batch(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    backend = create_generation_backend(create_plugin_manager(), "transformers", model, tokenizer, cpu_device())
    options = GenerationOptions(max_new_tokens=3, temperature=1.0)
    prompts = [[1, 20, 300], [1, 4000]]
    completions = backend.generate(prompts, options, num_return_sequences=2, generator=torch.Generator().manual_seed(0))
    expected = generate_batch(model, tokenizer, prompts, options, num_return_sequences=2, generator=torch.Generator().manual_seed(0))
    assert completions == expected
    backend.sync_weights(model)
    assert backend.model is model


def lora_policy(model_dir, **lora):
    """A peft LoRA model whose adapters already moved away from their zero start."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, **lora))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return policy


def test_the_merged_backend_generates_with_the_policy_s_current_weights(talkative_model_dir):
    policy = lora_policy(talkative_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(talkative_model_dir)
    backend = create_generation_backend(create_plugin_manager(), "auto", policy, tokenizer, cpu_device())
    assert isinstance(backend, MergedLoRABackend)
    prompts, greedy, ids = [[1, 20, 300], [1, 4000]], GenerationOptions(max_new_tokens=6), torch.tensor([[1, 20, 300, 7, 9]])
    for _ in range(2):
        completions = backend.generate(prompts, greedy)
        assert [c.token_ids for c in completions] == [c.token_ids for c in generate_batch(policy, tokenizer, prompts, greedy)]
        with torch.no_grad():
            torch.testing.assert_close(backend.merged(ids).logits, policy(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
            for name, parameter in policy.named_parameters():  # an optimizer update
                if "lora_" in name:
                    parameter.add_(torch.randn_like(parameter), alpha=0.05)
        backend.sync_weights(policy)


def test_auto_generates_with_the_model_itself_where_there_is_nothing_to_merge(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(create_generation_backend(create_plugin_manager(), "auto", full, tokenizer, cpu_device())) is TransformersBackend
    dora = lora_policy(tiny_model_dir, use_dora=True)
    assert type(create_generation_backend(create_plugin_manager(), "auto", dora, tokenizer, cpu_device())) is TransformersBackend
    with pytest.raises(ConfigError, match="'merged': DoRA adapters are not merged by this backend; use --generation-backend transformers"):
        create_generation_backend(create_plugin_manager(), "merged", dora, tokenizer, cpu_device())
