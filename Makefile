# The two Quick start commands (`make run`, `make test`) each build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint format bench-reads bench-prefetch bench-redis-client bench-tick bench-replay load clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## the whole service on embedded defaults (Valkey, sandbox upstreams, workers, API)
	$(BIN)/prefetch dev

test: $(STAMP)  ## the test suite, against REDIS_URL or an embedded Valkey
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy engine api sandbox prefetch

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-reads: $(STAMP)  ## cached-read throughput with wrk, beside a bare aiohttp handler
	$(BIN)/python -m bench.bench_reads

bench-prefetch: $(STAMP)  ## end-to-end jobs/s, beside a plain asyncio fetch-and-SET loop
	$(BIN)/python -m bench.bench_prefetch

bench-redis-client: $(STAMP)
	$(BIN)/python -m bench.bench_redis_client

bench-tick: $(STAMP)  ## the cost of one strategy scheduler tick, 1M tracked users
	$(BIN)/python -m bench.bench_tick

bench-replay: $(STAMP)  ## the replayed week: hit rate and cost per strategy mix (+ its plot)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.replay

load: $(STAMP)  ## locust against a running service (see loadtests/README.md)
	$(BIN)/locust -f loadtests/locustfile.py --headless -u 64 -r 16 -t 60s --host http://127.0.0.1:3005

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
