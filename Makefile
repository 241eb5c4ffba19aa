# Each target sets up everything it needs on a fresh machine: a venv, then the pinned-from-disk torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean mutate

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/objcrop demo --out demo_report

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q
	$(BIN)/ruff check objcrop tests benchmarks tools
	$(BIN)/ruff format --check objcrop tests benchmarks tools

lint: $(STAMP)
	$(BIN)/ruff check objcrop tests benchmarks tools
	$(BIN)/ruff format --check objcrop tests benchmarks tools

# Mutation testing of the core modules, one module at a time against its own tests (docs/testing.md); slow, not in
# `make test`. Each result goes to docs/mutation/<module>.json and the table in docs/testing.md.
# MODULES="boxes metrics" runs some, MUTATE_ARGS=--no-ssl all but the ssl ones.
$(VENV)/.mutate-installed: $(STAMP)
	$(BIN)/pip install -e '.[mutate]'
	touch $@

mutate: $(VENV)/.mutate-installed
	$(BIN)/python tools/mutate.py --record $(MUTATE_ARGS) $(MODULES)

clean:
	rm -rf $(VENV) demo_report build *.egg-info
