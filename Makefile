# Two commands on a fresh machine: `make run` and `make test`.
# Both create the virtualenv and install what they need themselves.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest

.PHONY: setup run status test test-unit test-chaos lint fmt bench-stack bench-match bench-ledger bench-audit bench-edge bench-risk bench-marketdata bench-market-data bench-trading bench-funding bench-telemetry soak clean

setup: $(INSTALLED)

# The server (cex-core) and, beside it, the SDK (cex-sdk, sdk/python) and the
# CCXT class (cex-ccxt, sdk/ccxt), all editable: the tests and the examples
# import cex_sdk and cex_ccxt from this checkout.
$(INSTALLED): pyproject.toml sdk/python/pyproject.toml sdk/ccxt/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e sdk/python -e sdk/ccxt
	touch $@

## run: the whole exchange on this machine (Ctrl-C stops it)
run: $(INSTALLED)
	$(BIN)/cex up

status: $(INSTALLED)
	$(BIN)/cex status

## test: every test but the long chaos loops (those: make test-chaos)
## (`tools` first: the chart tests render the chart with helm; see mk/ops.mk)
test: $(INSTALLED) tools
	$(PYTEST) -q

## test-unit: tests/unit with nothing but the virtualenv: no Go, no helm, no node.
## The chart tests that run helm (marker `helm`) are left out; make test runs them.
test-unit: $(INSTALLED)
	$(PYTEST) -q -m 'not chaos and not helm' tests/unit

# pytest exits 5 when a marker selects nothing; that is not a failure here.
test-chaos: $(INSTALLED)
	$(PYTEST) -q -m chaos -o addopts="--import-mode=importlib" || [ $$? -eq 5 ]

lint: $(INSTALLED)
	$(BIN)/ruff check services cex_stack chainsim tests bench sdk/python sdk/ccxt
	$(BIN)/ruff format --check services cex_stack chainsim tests bench sdk/python sdk/ccxt
	$(BIN)/mypy services cex_stack chainsim sdk/python/cex_sdk sdk/ccxt/cex_ccxt
	$(BIN)/hadolint Dockerfile

fmt: $(INSTALLED)
	$(BIN)/ruff check --fix services cex_stack chainsim tests bench sdk/python sdk/ccxt
	$(BIN)/ruff format services cex_stack chainsim tests bench sdk/python sdk/ccxt

## bench-stack: cold/warm start of every component and the cost of the Envoy hop
bench-stack: $(INSTALLED)
	$(BIN)/python -m bench.bench_stack

## bench-match: the fast order book in-process on exchange-core's command mix, then
## the same mix through SubmitCommands with journaling and publishing on
bench-match: $(INSTALLED)
	$(BIN)/python -m bench.bench_match
	$(BIN)/python -m bench.bench_match_service

## bench-ledger: CreateTransfers single and batched (synchronous_commit on)
bench-ledger: $(INSTALLED)
	$(BIN)/python -m bench.bench_ledger

## bench-audit: the ledger audit's time as the history grows (PostgreSQL alone, SQL-written history)
bench-audit: $(INSTALLED)
	$(BIN)/python -m bench.bench_audit $(BENCH_ARGS)

## bench-telemetry: PlaceOrder through Envoy with tracing off, on at 100% and at 1% (same run), and the metrics' cost
bench-telemetry: $(INSTALLED)
	$(BIN)/python -m bench.bench_telemetry $(BENCH_ARGS)

## bench-funding: deposit and withdrawal sagas end to end (sagas/s, step p50/p99)
bench-funding: $(INSTALLED)
	$(BIN)/python -m bench.bench_funding

## bench-risk: CheckOrder checks/s and p50/p99 through risk's gRPC server (in-process and own process)
bench-risk: $(INSTALLED)
	$(BIN)/python -m bench.bench_risk

## bench-edge: the latency Envoy adds per call with JWT verification on (p50/p99)
bench-edge: $(INSTALLED)
	$(BIN)/python -m bench.bench_edge

## bench-marketdata: events/s into the book and tape, fan-out latency p50/p99 to N subscribers
## (BENCH_ARGS="--replicas marketdata=1 --replicas marketdata=2": each behind a local Envoy, back to back)
bench-marketdata: $(INSTALLED)
	$(BIN)/python -m bench.bench_marketdata $(BENCH_ARGS)

bench-market-data: bench-marketdata  # the name issue 7 uses

## bench-trading: PlaceOrder through Envoy (ghz --rps sweep) and market-maker stream sessions
## (BENCH_ARGS="--replicas order=2,marketdata=2", repeatable: stacks with replicas, back to back)
bench-trading: $(INSTALLED)
	bench/install-ghz.sh .tools/bin
	$(BIN)/python -m bench.bench_trading $(BENCH_ARGS)

## soak: a steady rate through the stack for N minutes, reported per 30 s window
## (CPU per order per process, ack latency, audit time, storage per trade) with slopes
## (SOAK_ARGS="--minutes 20 --rate 40")
soak: $(INSTALLED)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis

include mk/proto.mk
include mk/ops.mk
include mk/sdk.mk
