#!/usr/bin/env bash
# Installs the chart tools into .tools/ (project-local, idempotent, offline
# apart from the Go module proxy):
#   .tools/bin/helm, .tools/bin/kubeconform       go install at pinned versions
#   .tools/schemas/kubernetes/*.json              built-in kinds, from the OpenAPI
#                                                 spec in the k8s.io/kubernetes module
#   .tools/schemas/crds/*.json                    Istio kinds from istio.io/api's CRDs,
#                                                 ServiceMonitor/PrometheusRule from
#                                                 the prometheus-operator module
# A stamp per step records the version it was made from, so a second run costs
# a few file checks and a version bump redoes only that step.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION=v3.19.5
KUBECONFORM_VERSION=v0.7.0
KUBERNETES_VERSION=v1.34.4            # k8s.io/kubernetes: api/openapi-spec/swagger.json
ISTIO_API_VERSION=v1.24.2             # istio.io/api: kubernetes/customresourcedefinitions.gen.yaml
PROMETHEUS_OPERATOR_VERSION=v0.85.0   # example/prometheus-operator-crd/*.yaml

TOOLS="$PWD/.tools"
BIN="$TOOLS/bin"
SCHEMAS="$TOOLS/schemas"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
mkdir -p "$BIN" "$SCHEMAS"

stamp_ok() { [ -f "$TOOLS/.$1" ] && [ "$(cat "$TOOLS/.$1")" = "$2" ]; }
stamp() { echo "$2" >"$TOOLS/.$1"; }

if ! command -v go >/dev/null 2>&1; then
    # Without Go the chart tests skip (saying why) and `make chart-check` fails;
    # CI must have it, so there this is an error.
    echo "install-tools: go is not on PATH: helm and kubeconform cannot be built" >&2
    if [ -n "${CI:-}" ]; then exit 1; fi
    exit 0
fi

# Module cache path of a module@version (downloads it through the Go module proxy).
module_dir() {
    (cd / && go mod download -json "$1") | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])'
}

install_go_tool() {  # name package version [ldflags]
    if stamp_ok "$1" "$3 ${4:-}" && [ -x "$BIN/$1" ]; then return; fi
    echo "install-tools: go install $2@$3"
    (cd / && GOBIN="$BIN" CGO_ENABLED=0 GOFLAGS=-trimpath go install -ldflags "-s -w ${4:-}" "$2@$3")
    stamp "$1" "$3 ${4:-}"
}

# As helm's own release build: its version, and the Kubernetes version that
# `helm lint` and `helm template` assume (that of its client-go, 0.34 -> 1.34).
HELM_LDFLAGS="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in pkg/lint/rules pkg/chartutil; do
    HELM_LDFLAGS="$HELM_LDFLAGS -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=34"
done
install_go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "$HELM_LDFLAGS" &
helm_pid=$!
install_go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION" &
kc_pid=$!

schemas_key="$KUBERNETES_VERSION $ISTIO_API_VERSION $PROMETHEUS_OPERATOR_VERSION $(sha256sum scripts/k8s_schemas.py | cut -c1-16)"
if ! stamp_ok schemas "$schemas_key"; then
    echo "install-tools: JSON schemas (kubernetes $KUBERNETES_VERSION, istio.io/api $ISTIO_API_VERSION, prometheus-operator $PROMETHEUS_OPERATOR_VERSION)"
    k8s_dir=$(module_dir "k8s.io/kubernetes@$KUBERNETES_VERSION")
    istio_dir=$(module_dir "istio.io/api@$ISTIO_API_VERSION")
    promop_dir=$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")
    rm -rf "$SCHEMAS.new" && mkdir -p "$SCHEMAS.new"
    "$PYTHON" scripts/k8s_schemas.py openapi "$k8s_dir/api/openapi-spec/swagger.json" "$SCHEMAS.new/kubernetes"
    "$PYTHON" scripts/k8s_schemas.py crds "$SCHEMAS.new/crds" \
        "$istio_dir/kubernetes/customresourcedefinitions.gen.yaml" \
        "$promop_dir/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
        "$promop_dir/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml"
    rm -rf "$SCHEMAS" && mv "$SCHEMAS.new" "$SCHEMAS"
    stamp schemas "$schemas_key"
fi

wait "$helm_pid"
wait "$kc_pid"
