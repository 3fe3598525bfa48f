// The module of the generated Go code; `make gen` copies this file to
// gen/go/go.mod. Versions match .tools' protoc-gen-go/protoc-gen-go-grpc
// (mk/sdk.mk) and what examples/go builds against.
module github.com/cex-core/cex-core/gen/go

go 1.24

require (
	google.golang.org/genproto/googleapis/api v0.0.0-20261026165753-2ffab32bce7e
	google.golang.org/genproto/googleapis/rpc v0.0.0-20261026165753-2ffab32bce7e
	google.golang.org/grpc v1.85.0
	google.golang.org/protobuf v1.36.12
)
