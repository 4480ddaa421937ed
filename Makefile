# diffusers-pdmd developer commands. `make demo` and `make test` install into .venv first (once).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECK_DIRS := src tests examples benchmarks

.PHONY: install demo test style quality bench clean

# pip prints its progress (no -q): the first install downloads torch and the diffusers stack, which takes minutes.
$(STAMP): setup.py
	@echo "==> [1/4] creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [2/4] upgrading pip"
	$(BIN)/python -m pip install --progress-bar on --upgrade pip
	@echo "==> [3/4] installing torch 2.14.1 and torchvision 0.29.1 (the largest download)"
	$(BIN)/python -m pip install --progress-bar on torch==2.14.1 torchvision==0.29.1
	@echo "==> [4/4] installing diffusers-pdmd with its [dev] extra (diffusers, transformers, peft, accelerate, ...)"
	$(BIN)/python -m pip install --progress-bar on -e ".[dev]"
	touch $(STAMP)
	@echo "==> installed into $(VENV)"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m diffusers_pdmd.demo --output_dir demo_output

test: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist loadfile -q tests

style: $(STAMP)
	$(BIN)/ruff check --fix $(CHECK_DIRS)
	$(BIN)/ruff format $(CHECK_DIRS)

quality: $(STAMP)
	$(BIN)/ruff check $(CHECK_DIRS)
	$(BIN)/ruff format --check $(CHECK_DIRS)

bench: $(STAMP)
	$(BIN)/python benchmarks/quality_digits.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
