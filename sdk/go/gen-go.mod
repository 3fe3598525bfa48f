// The module of the generated Go code; `make gen` copies this file to
// gen/go/go.mod and gen-go.sum to gen/go/go.sum, so the module builds on its
// own (`go build ./...` in gen/go; tests/integration/sdk/test_builds.py).
// Versions match .tools' protoc-gen-go/protoc-gen-go-grpc (mk/sdk.mk) and what
// examples/go builds against; after changing one, run `go mod tidy` in gen/go
// and copy go.mod and go.sum back here.
module github.com/cex-core/cex-core/gen/go

go 1.26.0

require (
	google.golang.org/genproto/googleapis/api v0.0.0-20261026165753-2ffab32bce7e
	google.golang.org/genproto/googleapis/rpc v0.0.0-20261026165753-2ffab32bce7e
	google.golang.org/grpc v1.85.0
	google.golang.org/protobuf v1.36.12
)

require (
	golang.org/x/net v0.60.0 // indirect
	golang.org/x/sys v0.48.0 // indirect
	golang.org/x/text v0.42.0 // indirect
)
