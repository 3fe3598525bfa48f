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
# Branch that proto-breaking compares against.
PROTO_BREAKING_BRANCH ?= main
PROTO_DESCRIPTOR := gen/descriptor/cex.binpb

# Regenerates gen/ from scratch:
#   gen/python/         messages, gRPC stubs and their .pyi stubs for proto/,
#                       plus __init__.py files and a py.typed marker;
#   gen/go/             Go messages and gRPC clients, a module of its own
#                       (go.mod from sdk/go/gen-go.mod);
#   gen/ts/             TypeScript messages and services (protoc-gen-es);
#   gen/descriptor/     a FileDescriptorSet of proto/ with all imports and
#                       comments, for Envoy's grpc_json_transcoder and reflection.
# One shell command, so gen-check can reuse it.
PROTO_GEN_CMD = rm -rf gen \
	&& $(PROTO_ENV) $(PROTO_BUF) generate \
	&& for d in $$(find gen/python/cex -type d | LC_ALL=C sort); do : > "$$d/__init__.py"; done \
	&& : > gen/python/cex/py.typed \
	&& cp sdk/go/gen-go.mod gen/go/go.mod \
	&& mkdir -p $(dir $(PROTO_DESCRIPTOR)) \
	&& $(PROTO_BUF) build --as-file-descriptor-set -o $(PROTO_DESCRIPTOR)

.PHONY: gen gen-check proto-lint proto-format proto-format-check proto-breaking proto-check

gen: ## Regenerate gen/ (Python code and the descriptor set) from proto/
	@$(PROTO_GEN_CMD)
	@echo "gen: regenerated gen/python and $(PROTO_DESCRIPTOR)"

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

# Compares the working tree with the branch (FILE rules). Skipped while that
# branch does not exist or has no .proto file yet (first contracts commit).
# --exclude-imports: without it buf also checks each module's imports, i.e.
# the vendored googleapis files as seen from proto/, which the `ignore` in
# buf.yaml does not cover.
proto-breaking: ## buf breaking against the main branch
	@if git rev-parse -q --verify "$(PROTO_BREAKING_BRANCH)^{commit}" >/dev/null 2>&1 \
	   && git ls-tree -r --name-only "$(PROTO_BREAKING_BRANCH)" -- proto | grep -q '\.proto$$'; then \
	  echo "$(PROTO_BUF) breaking --exclude-imports --against '.git#branch=$(PROTO_BREAKING_BRANCH)'"; \
	  $(PROTO_BUF) breaking --exclude-imports --against '.git#branch=$(PROTO_BREAKING_BRANCH)'; \
	else \
	  echo "proto-breaking: skipped ($(PROTO_BREAKING_BRANCH) has no proto/ yet)"; \
	fi

proto-check: proto-lint proto-format-check proto-breaking gen-check ## All contract checks
