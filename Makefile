# Two commands do all set-up on a fresh machine:  `make run`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines here carry a local CPU wheel of torch 2.13.0; GPU users: make run TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.yaml
# test workers (pytest-xdist): one per core of the 2-core CI machine
TEST_WORKERS ?= 2

.PHONY: install run test bench results clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: install
	$(VENV)/bin/quantbench assets fetch
	$(VENV)/bin/quantbench run --config $(CONFIG)

test: install
	$(VENV)/bin/quantbench assets fetch
	command -v chromium >/dev/null 2>&1 || (apt-get update && apt-get install -y chromium)  # HTML report test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

bench: install
	$(VENV)/bin/quantbench assets fetch
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/census.py
	$(PY) benchmarks/quant.py

# Reference runs whose tables README.md and docs/ include (committed; `quantbench tables --check` in the tests)
results: install
	$(VENV)/bin/quantbench assets fetch
	$(VENV)/bin/quantbench run --config configs/default.yaml --out results/reference --run-id default
	$(VENV)/bin/quantbench run --config configs/mitigations.yaml --out results/reference --run-id mitigations
	$(VENV)/bin/quantbench run --config configs/export.yaml --out results/reference --run-id export
	$(VENV)/bin/quantbench run --config configs/mixed.yaml --out results/reference --run-id mixed
	$(VENV)/bin/quantbench run --config configs/pushed.yaml --out results/reference --run-id pushed
	$(VENV)/bin/quantbench run --config configs/gguf-ladder.yaml --out results/reference --run-id gguf-ladder
	$(VENV)/bin/quantbench run --config configs/fp-formats.yaml --out results/reference --run-id fp-formats
	$(VENV)/bin/quantbench run --config configs/reference-small.yaml --out results/reference --run-id small
	$(VENV)/bin/quantbench tables

clean-venv:
	rm -rf $(VENV)
