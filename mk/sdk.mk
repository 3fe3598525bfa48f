# SDK code generation tools and the examples' builds.
#
# Included by the top-level Makefile. `make setup` and `make gen` install the
# Go and TypeScript protoc plugins into the project (nothing global):
#   .tools/bin/protoc-gen-go, protoc-gen-go-grpc   `go install` at pinned versions
#   node_modules/.bin/protoc-gen-es, tsc             `npm ci` from package-lock.json
# Each step is skipped while its stamp is newer than what pins it, so a warm
# `make setup` costs nothing. See docs/sdk.md.

TOOLS := .tools
TOOLS_BIN := $(TOOLS)/bin
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
GO_PLUGINS := $(TOOLS)/go-plugins-$(PROTOC_GEN_GO_VERSION)-$(PROTOC_GEN_GO_GRPC_VERSION).stamp
NODE_TOOLS := node_modules/.installed
# examples/go's dependencies downloaded and compiled once into Go's caches, so
# the e2e test's `go build` only compiles the example itself.
GO_EXAMPLE := $(TOOLS)/go-example.stamp

.PHONY: sdk-tools examples-lint sdk-wheel

## sdk-wheel: cex-sdk's wheel into dist/ (the SDK and the generated v1 code; docs/sdk.md)
sdk-wheel: $(INSTALLED)
	rm -rf sdk/python/build
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation --quiet -w dist sdk/python
	@ls -l dist/cex_sdk-*.whl

sdk-tools: $(GO_PLUGINS) $(NODE_TOOLS)

$(GO_PLUGINS):
	rm -f $(TOOLS)/go-plugins-*.stamp
	GOBIN="$(abspath $(TOOLS_BIN))" go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	GOBIN="$(abspath $(TOOLS_BIN))" go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
	touch $@

$(NODE_TOOLS): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(GO_EXAMPLE): examples/go/go.mod examples/go/go.sum sdk/go/gen-go.mod sdk/go/gen-go.sum
	mkdir -p $(TOOLS)
	cd examples/go && go build -o /dev/null .
	touch $@

# Plugins first, whichever of these runs.
setup gen gen-check: sdk-tools
setup: $(GO_EXAMPLE)
# The e2e tests compile examples/ts with the project's tsc and build examples/go.
test: $(NODE_TOOLS) $(GO_EXAMPLE)

# examples/python are scripts (not a package): ruff, and mypy strict with the
# SDK and the generated code on its path. Part of `make lint`.
examples-lint: $(INSTALLED)
	$(BIN)/ruff check examples/python
	$(BIN)/ruff format --check examples/python
	MYPYPATH=sdk/python:gen/python:examples/python $(BIN)/mypy --strict examples/python/*.py
lint: examples-lint
