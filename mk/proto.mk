# Contracts: lint, format, breaking-change check and code generation.
#
# Included by the top-level Makefile, which defines VENV and BIN; the defaults
# below only matter when this file is used on its own
# (make -f mk/proto.mk gen). Only local tools are used: buf from the buf-bin
# wheel, protoc from grpcio-tools, plugins from mypy-protobuf. See
# docs/adr/0001-contracts.md.

VENV ?= .venv
BIN ?= $(VENV)/bin

PROTO_BUF := $(BIN)/buf
# buf.gen.yaml finds `python` and the protoc-gen-* plugins on PATH.
# The Go plugins are in .tools/bin and protoc-gen-es in node_modules/.bin
# (mk/sdk.mk installs both).
PROTO_ENV := PATH="$(abspath $(BIN)):$(abspath .tools/bin):$(abspath node_modules/.bin):$$PATH"
PROTO_DESCRIPTOR := gen/descriptor/cex.binpb

# Regenerates gen/ from scratch:
#   gen/python/         messages, gRPC stubs and their .pyi stubs for proto/,
#                       plus __init__.py files and a py.typed marker;
#   gen/go/             Go messages and gRPC clients, a module of its own
#                       (go.mod and go.sum from sdk/go/gen-go.{mod,sum});
#   gen/ts/             TypeScript messages and services (protoc-gen-es);
#   gen/descriptor/     a FileDescriptorSet of proto/ with all imports and
#                       comments, for Envoy's grpc_json_transcoder and reflection.
# One shell command, so gen-check can reuse it.
PROTO_GEN_CMD = rm -rf gen \
	&& $(PROTO_ENV) $(PROTO_BUF) generate \
	&& for d in $$(find gen/python/cex -type d | LC_ALL=C sort); do : > "$$d/__init__.py"; done \
	&& : > gen/python/cex/py.typed \
	&& cp sdk/go/gen-go.mod gen/go/go.mod && cp sdk/go/gen-go.sum gen/go/go.sum \
	&& mkdir -p $(dir $(PROTO_DESCRIPTOR)) \
	&& $(PROTO_BUF) build --as-file-descriptor-set -o $(PROTO_DESCRIPTOR)

.PHONY: gen gen-check proto-lint proto-format proto-format-check proto-breaking proto-baseline-refresh proto-check

# The chart's edge config inlines the descriptor set, so it is regenerated too
# (edge-config in mk/ops.mk; CI checks it with edge-config-check).
gen: ## Regenerate gen/ (Python code and the descriptor set) from proto/, and the chart's edge config
	@$(PROTO_GEN_CMD)
	@echo "gen: regenerated gen/python and $(PROTO_DESCRIPTOR)"
	@$(BIN)/python -m cex_stack.envoy write

# Fails if `make gen` would change gen/. The comparison is against a copy of
# gen/ taken before regenerating, not against git, so it also works before the
# first commit; on a clean CI checkout the copy is exactly what is committed.
gen-check: ## Fail if gen/ is not what `make gen` produces
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT \
	&& if [ -d gen ]; then cp -a gen "$$tmp/gen"; else mkdir "$$tmp/gen"; fi \
	&& $(PROTO_GEN_CMD) \
	&& if diff -r -x __pycache__ -x "*.pyc" "$$tmp/gen" gen; then echo "gen-check: gen/ is up to date"; \
	   else echo "gen-check: gen/ was stale; it has been regenerated: review and commit it" >&2; exit 1; fi

proto-lint: ## buf lint (STANDARD rules; third_party is ignored)
	$(PROTO_BUF) lint

proto-format: ## Rewrite .proto files in buf's canonical format
	$(PROTO_BUF) format proto -w

proto-format-check: ## Fail if a .proto file under proto/ is not buf-formatted
	$(PROTO_BUF) format proto -d --exit-code

# The v1 contracts as landed, the baseline `proto-breaking` compares with: a
# buf image of proto/ (imports included so it resolves on its own, source info
# left out so comment edits do not churn it). It changes only by
# `make proto-baseline-refresh`, on purpose, in a commit of its own.
PROTO_BASELINE := proto/baseline/v1.binpb
PROTO_BASELINE_BUILD = $(PROTO_BUF) build proto --exclude-source-info -o

# FILE rules (buf.yaml) between proto/ and the baseline. The input is the proto
# module (the baseline holds no googleapis targets) and --exclude-imports skips
# the vendored googleapis files, which buf.yaml's `ignore` does not cover when
# seen as imports. Removing or renumbering a field, a method or a file fails;
# adding passes.
proto-breaking: ## buf breaking against the v1 baseline (proto/baseline/v1.binpb)
	$(PROTO_BUF) breaking proto --exclude-imports --against $(PROTO_BASELINE)

# On purpose only: what proto/ is now becomes what every later change must not
# break (after contract additions have landed, so they are protected too). It
# refuses while proto/ breaks the current baseline: a breaking change is a v2
# package, never a new baseline for v1.
proto-baseline-refresh: ## ON PURPOSE: make proto/ as it is now the v1 baseline (commit it alone, say why)
	@$(MAKE) --no-print-directory proto-breaking
	$(PROTO_BASELINE_BUILD) $(PROTO_BASELINE)
	@echo "proto-baseline-refresh: $(PROTO_BASELINE) is now proto/ as it is; commit it on its own, with the reason"

proto-check: proto-lint proto-format-check proto-breaking gen-check ## All contract checks
