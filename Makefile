# Flover on Triton: one command per job. `make setup` builds .venv from nothing.
PY := .venv/bin/python
STAMP := .venv/.installed
HOST ?= 127.0.0.1
export PYTHONUNBUFFERED := 1

.PHONY: setup test lint serve demo generate bench bench-quick bench-inprocess bench-sampling perf soak dashboard-snapshot clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[serve,test,bench]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check flover_backend clients tests model_repository benchmarks

serve: setup
	$(PY) -m flover_backend serve --host $(HOST) --models flover --openai-port 8003

generate: setup
	$(PY) -m flover_backend generate --model builtin:small --prompt "Once upon a time" --max-tokens 48

bench-inprocess: setup
	$(PY) -m benchmarks.inprocess --model builtin:small --out benchmarks/results

clean:
	rm -rf .venv .pytest_cache .hypothesis .ruff_cache

demo: setup
	$(PY) -m clients.demo

bench: setup
	$(PY) -m benchmarks.experiments

# 10 minutes of Poisson arrivals through both protocols, a quarter cancelled: lost/wrong counts and RSS growth.
soak: setup
	$(PY) -m benchmarks.soak --duration 600

bench-quick: setup
	$(PY) -m benchmarks.experiments --quick --out benchmarks/results/quick

# The sampling step alone on 32 x 32000 CPU logits: the old per-row sampler against the batched one.
bench-sampling: setup
	$(PY) -m benchmarks.sampling_bench --out benchmarks/results

# The Grafana dashboard's panels drawn from a recorded run (no Grafana needed): benchmarks/results/dashboard.png
dashboard-snapshot: setup
	$(PY) -m benchmarks.dashboard_snapshot

# perf_analyzer against the server `make serve` started (another terminal).
perf: setup
	$(PY) -m benchmarks.peers

# The lent-GPU script's code path on this CPU (tiny model); on a GPU run benchmarks/gpu_check.sh instead.
gpu-check-smoke: setup
	$(PY) -m benchmarks.gpu_check --smoke --out benchmarks/results/gpu-smoke
