# Flover on Triton: one command per job. `make setup` builds .venv from nothing.
PY := .venv/bin/python
STAMP := .venv/.installed
HOST ?= 127.0.0.1
export PYTHONUNBUFFERED := 1

.PHONY: setup system-deps test lint serve demo generate bench bench-quick bench-inprocess perf clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[serve,test,bench]"
	touch $(STAMP)

# perf_analyzer (inside the tritonclient wheel) links Debian's libb64; root on these machines can apt-get it.
system-deps:
	@dpkg -s libb64-0d >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libb64-0d; }

test: setup system-deps
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check flover_backend clients tests model_repository benchmarks

serve: setup
	$(PY) -m flover_backend serve --host $(HOST)

generate: setup
	$(PY) -m flover_backend generate --model builtin:small --prompt "Once upon a time" --max-tokens 48

bench-inprocess: setup
	$(PY) -m flover_backend bench --model builtin:small --out benchmarks/results

clean:
	rm -rf .venv .pytest_cache .hypothesis .ruff_cache
