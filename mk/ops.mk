# Operations: the Kubernetes/Istio chart and its offline validation.
#
# Included by the top-level Makefile (VENV, BIN, INSTALLED). Tools live in
# .tools/ and are made by scripts/install-tools.sh from the Go module proxy only:
# helm and kubeconform by `go install` at pinned versions, and JSON schemas for
# Kubernetes' built-in kinds (k8s.io/kubernetes' OpenAPI spec) and for Istio's
# and prometheus-operator's kinds (their CRDs). See docs/operations.md.

TOOLS_BIN := .tools/bin
HELM := $(TOOLS_BIN)/helm
KUBECONFORM := $(TOOLS_BIN)/kubeconform
CHART := helm/cex
CHART_OUT := .tools/render
# Kubernetes version the chart is rendered for (helm's built-in default is 1.34).
CHART_KUBE_VERSION ?= 1.34.0
KUBECONFORM_FLAGS := -strict -summary -output text \
	-schema-location '.tools/schemas/kubernetes/{{ .ResourceKind }}{{ .KindSuffix }}.json' \
	-schema-location '.tools/schemas/crds/{{ .ResourceKind }}{{ .KindSuffix }}.json'

.PHONY: tools chart-check chart-render edge-config edge-config-check

## edge-config: helm/cex/files/edge/envoy.yaml, the Kubernetes edge's Envoy config,
## rendered by cex_stack/envoy.py from mesh/envoy/ as the local Envoy's is (placeholders
## for the chart's addresses). `make gen` runs it too: the config carries the descriptor set.
edge-config: $(INSTALLED)
	$(BIN)/python -m cex_stack.envoy write

## edge-config-check: fail if helm/cex/files/edge/envoy.yaml is not what `make edge-config` writes
edge-config-check: $(INSTALLED)
	$(BIN)/python -m cex_stack.envoy check

## tools: helm, kubeconform and the JSON schemas into .tools/ (idempotent; seconds when present)
tools: $(INSTALLED)
	@PYTHON=$(BIN)/python bash scripts/install-tools.sh

## chart-render: helm template with the default and the production-like values into .tools/render/
chart-render: tools
	@mkdir -p $(CHART_OUT)
	$(HELM) template cex $(CHART) --namespace cex --kube-version $(CHART_KUBE_VERSION) > $(CHART_OUT)/default.yaml
	$(HELM) template cex $(CHART) --namespace cex --kube-version $(CHART_KUBE_VERSION) \
		-f $(CHART)/values-production.yaml > $(CHART_OUT)/production.yaml

## chart-check: the edge's config up to date, helm lint --strict, then every rendered
## object against its schema (offline)
chart-check: edge-config-check chart-render
	$(HELM) lint --strict $(CHART) --namespace cex --kube-version $(CHART_KUBE_VERSION)
	$(HELM) lint --strict $(CHART) --namespace cex --kube-version $(CHART_KUBE_VERSION) -f $(CHART)/values-production.yaml
	$(KUBECONFORM) $(KUBECONFORM_FLAGS) $(CHART_OUT)/default.yaml
	$(KUBECONFORM) $(KUBECONFORM_FLAGS) $(CHART_OUT)/production.yaml
