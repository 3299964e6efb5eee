# The README's two commands. Each creates .venv on first use and installs what it needs.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean gpu-check

$(STAMP): pyproject.toml requirements_cpu.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements_cpu.txt
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llavactl train --profile tiny

test: $(STAMP)
	$(BIN)/ruff check llavactl tests benchmarks
	$(BIN)/python -m pytest -q

# Every CUDA path and a short benchmark (docs/gpu.md). No install step: a GPU machine uses the Python
# it has (and wheels carried in .whl/), so this target does not build .venv; it uses one that exists.
PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .ruff_cache
