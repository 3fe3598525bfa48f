#!/bin/sh
# ghz (gRPC load generator) into a project-local bin dir, built by `go install`.
# Usage: bench/install-ghz.sh [bin-dir]   (default: .tools/bin)
set -eu
BIN_DIR="${1:-.tools/bin}"
mkdir -p "$BIN_DIR"
if [ -x "$BIN_DIR/ghz" ]; then
  exit 0
fi
command -v go >/dev/null 2>&1 || { echo "install-ghz: Go is needed (https://go.dev/dl/)" >&2; exit 1; }
GOBIN="$(cd "$BIN_DIR" && pwd)" GOFLAGS=-mod=mod go install github.com/bojand/ghz/cmd/ghz@latest
"$BIN_DIR/ghz" --version
