# The README's two commands. Each creates .venv on first use and installs what it needs.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

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

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .ruff_cache
