# Quick start: `make demo` (train, then later stages) and `make test`.
# Both create .venv when missing and install ferry with the extras they need.
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= data
RUNS ?= runs
# torch/torchvision are installed first and pinned: these releases are what ferry is tested with.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.ferry-installed

.PHONY: demo test bench clean help

help:
	@echo "make demo [DATA_DIR=data]   train the digit CNN and print its test accuracy"
	@echo "make test [DATA_DIR=data]   run the test suite (real-MNIST tests skip when DATA_DIR lacks it)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[train,cpu,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ferry train --data-dir $(DATA_DIR) --out $(RUNS)/mnist-cnn

test: $(STAMP)
	FERRY_MNIST_DIR=$(DATA_DIR) $(BIN)/python -m pytest -q

clean:
	rm -rf $(RUNS) .pytest_cache
