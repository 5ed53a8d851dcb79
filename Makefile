# The two Quick start commands (`make run`, `make test`) each build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

# `make load` knobs (see loadtests/README.md)
DURATION ?= 30s
USERS ?= 64
SPAWN_RATE ?= 16
HOST ?= http://127.0.0.1:3005
P99_MS ?= 100
MAX_ERROR_RATE ?= 0.01
IMAGE ?= exprsn-prefetch:e2e
# promtool checks and unit-tests the alert rules when installed (auto); CI says required.
PROMTOOL ?= auto
DEPLOY_STAMP := $(VENV)/.deploy-stamp
FUZZ_STAMP := $(VENV)/.fuzz-stamp
FUZZ_EXAMPLES ?= 30

.PHONY: run test test-cluster test-rabbitmq test-netns lint format bench bench-quick soak bench-reads bench-prefetch bench-redis-client bench-tick bench-replay bench-api-memory \
	load sizing deploy-lint docker-e2e fuzz topology clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## the whole service on embedded defaults (Valkey, sandbox upstreams, workers, API)
	$(BIN)/prefetch dev

test: $(STAMP)  ## the test suite, against REDIS_URL or an embedded Valkey
	$(BIN)/python -m pytest

test-cluster: $(STAMP)  ## the Redis Cluster tests (a 6-node cluster and TLS servers of their own)
	$(BIN)/python -m pytest -m cluster tests/test_cluster.py

test-rabbitmq: $(STAMP)  ## the engine and queue tests again on RabbitMQ (the machine's, a vhost of their own)
	$(BIN)/python -m pytest -m rabbitmq

test-netns: $(STAMP)  ## the network-namespace tests of the pod topology (root)
	$(BIN)/python -m pytest -m netns

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --explicit-package-bases engine api sandbox prefetch deploy/topology bench

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)  ## every benchmark against its ceiling and the BullMQ peer: JSON + PNG charts
	$(BIN)/python -m bench

bench-quick: $(BENCH_STAMP)  ## the same in about five minutes (small runs, one round)
	$(BIN)/python -m bench --quick

soak: $(STAMP)  ## chaos soak: Redis killed and restarted, a worker SIGKILLed, nothing lost
	$(BIN)/python -m bench.soak

bench-reads: $(STAMP)  ## cached-read throughput with wrk, beside a bare aiohttp handler
	$(BIN)/python -m bench.bench_reads

bench-prefetch: $(STAMP)  ## end-to-end jobs/s, beside a plain asyncio fetch-and-SET loop
	$(BIN)/python -m bench.bench_prefetch

bench-redis-client: $(STAMP)  ## GET of a 9.6 KB entry: FastRedis, redis-py, glide; one node and a cluster
	$(BIN)/python -m bench.bench_redis_client --size 9830 --cluster

bench-tick: $(STAMP)  ## the cost of one strategy scheduler tick, 1M tracked users
	$(BIN)/python -m bench.bench_tick

bench-replay: $(STAMP)  ## the replayed week: hit rate and cost per strategy mix (+ its plot)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.replay

bench-api-memory: $(STAMP)  ## API RSS under 20,000 distinct tokens and users
	$(BIN)/python -m bench.bench_api_memory

load: $(STAMP)  ## locust against a running service; fails on errors > MAX_ERROR_RATE or p99 > P99_MS
	LOAD_P99_MS=$(P99_MS) LOAD_MAX_ERROR_RATE=$(MAX_ERROR_RATE) $(BIN)/locust \
		-f loadtests/locustfile.py --headless --only-summary \
		-u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) --host $(HOST)

sizing: $(STAMP)  ## the sizing model for 1M, 10M and 100M daily users (see tuning.md)
	$(BIN)/python -m bench.sizing

$(DEPLOY_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,deploy]'
	touch $(DEPLOY_STAMP)

deploy-lint: $(DEPLOY_STAMP)  ## hadolint, the Kubernetes manifests, the dashboard and the alert rules
	$(BIN)/hadolint Dockerfile
	$(BIN)/python deploy/k8s/validate.py --self-test
	$(BIN)/python deploy/prometheus/check.py --promtool $(PROMTOOL)

$(FUZZ_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,fuzz]'
	touch $(FUZZ_STAMP)

fuzz: $(FUZZ_STAMP)  ## schemathesis against a running `prefetch dev`: service and user tokens
	$(BIN)/python -m tests.fuzz_api --examples $(FUZZ_EXAMPLES)

topology: $(STAMP)  ## pods as separate hosts: network namespaces, rolling restart, failover, cuts (root)
	$(BIN)/python -m deploy.topology test

docker-e2e: $(STAMP)  ## build the image and run api, worker and sandbox containers end to end
	$(BIN)/python deploy/docker/e2e.py --image $(IMAGE)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
