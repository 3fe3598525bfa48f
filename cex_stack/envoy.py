"""Renders mesh/envoy/envoy.yaml: one cluster and host per service.

One rendering, two places: the local stack's Envoy (`Upstreams.local`) and the
Kubernetes edge, helm/cex/files/edge/envoy.yaml (`KUBERNETES`, written by
`make edge-config`), whose placeholders the chart fills with its Service names
and ports. Filters, routes, rate limits and error replies are the same bytes in
both; only where Envoy listens and where each cluster points differ.
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import ipaddress
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import urlsplit

import yaml
from google.api import annotations_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor

from services.chassis.errors import (
    ExchangeError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

from .topology import SERVICES, Ports

__all__ = [
    "KUBERNETES",
    "NOT_FOUND",
    "PERMISSION_DENIED",
    "RATE_LIMITED",
    "TEMPLATE",
    "UNAUTHENTICATED",
    "Address",
    "RestSchema",
    "Tracing",
    "Upstreams",
    "kubernetes_config",
    "render",
    "tracing_from_env",
    "xff_trusted_hops_from_env",
]

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "mesh" / "envoy" / "envoy.yaml"
DESCRIPTOR = ROOT / "gen" / "descriptor" / "cex.binpb"
REST_LUA = ROOT / "mesh" / "envoy" / "rest.lua"
REST_FIELDS_LUA = ROOT / "mesh" / "envoy" / "rest_fields.lua"
KUBERNETES_CONFIG = ROOT / "helm" / "cex" / "files" / "edge" / "envoy.yaml"
# Types whose JSON is an object of any keys; other google.protobuf types are JSON scalars.
_OPEN_TYPES = {
    "google.protobuf.Any",
    "google.protobuf.ListValue",
    "google.protobuf.Struct",
    "google.protobuf.Value",
}
_WHOLE = re.compile(r"^\$\{(\w+)\}$")


def _fill(node: Any, values: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {key: _fill(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_fill(item, values) for item in node]
    if isinstance(node, str):
        whole = _WHOLE.match(node)
        if whole:
            return values[whole[1]]
        return Template(node).substitute(values)
    return node


def _details(error: ExchangeError) -> str:
    """A grpc-status-details-bin value (base64, as HTTP/2 carries -bin headers)."""
    return base64.b64encode(error.to_status("envoy").SerializeToString()).decode()


def _json(error: ExchangeError) -> dict[str, Any]:
    """The same google.rpc.Status as a REST body: an Envoy `json_format`, field names as
    the transcoder prints the services' errors (`preserve_proto_field_names`). Its strings
    are format strings: `%LOCAL_REPLY_BODY%` in a message is Envoy's own text."""
    text = json_format.MessageToJson(error.to_status("envoy"), preserving_proto_field_name=True)
    body: dict[str, Any] = json.loads(text)
    return body


# What Envoy's own refusals carry (it cannot tell us which check failed).
UNAUTHENTICATED = Unauthenticated(
    "EDGE_UNAUTHENTICATED", "missing, expired or invalid access token (see www-authenticate)"
)
PERMISSION_DENIED = PermissionDenied(
    "EDGE_PERMISSION_DENIED", "the access token is not valid for this audience"
)
RATE_LIMITED = ResourceExhausted(
    "EDGE_RATE_LIMITED", "too many requests from this client", retry_after_s=1.0
)
NOT_FOUND = NotFound("EDGE_NOT_FOUND", "no method for %REQ(:METHOD)% %REQ(:PATH)%")
TOO_LARGE = ResourceExhausted("EDGE_REQUEST_TOO_LARGE", "the request body is too large")
UNAVAILABLE = Unavailable("EDGE_UNAVAILABLE", "%LOCAL_REPLY_BODY%")


@dataclass(frozen=True, slots=True)
class RestSchema:
    """What a REST body may name, from the descriptor set the transcoder uses.

    `methods`: gRPC path -> request message, for every method whose REST binding takes
    a JSON body. `messages`: message -> field name (proto and JSON spelling) -> True for
    a leaf, "*" for a field whose JSON object has keys of its own (a map, Struct, Any),
    or the field's message type.
    """

    methods: dict[str, str]
    messages: dict[str, dict[str, str | bool]]

    @classmethod
    def load(cls, services: Iterable[str], descriptor: Path = DESCRIPTOR) -> RestSchema:
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor.read_bytes())
        pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            pool.AddSerializedFile(file.SerializeToString())
        schema = cls({}, {})
        wanted = set(services)
        for file in files.file:
            for service in file.service:
                name = f"{file.package}.{service.name}"
                if name not in wanted:
                    continue
                for method in service.method:
                    rule = method.options.Extensions[annotations_pb2.http]
                    bodies = {rule.body, *(b.body for b in rule.additional_bindings)}
                    if bodies == {""}:
                        continue  # no body: query and path parameters, which the transcoder checks
                    if bodies != {"*"}:
                        raise ValueError(f'{name}.{method.name}: only body "*" is checked')
                    request = pool.FindMessageTypeByName(method.input_type.lstrip("."))
                    schema.methods[f"/{name}/{method.name}"] = request.full_name
                    schema._add(request)
        return schema

    def _add(self, message: Descriptor) -> None:
        if message.full_name in self.messages:
            return
        fields: dict[str, str | bool] = {}
        self.messages[message.full_name] = fields
        for field in message.fields:
            kind: str | bool = True
            child = field.message_type
            if child is not None:
                if child.GetOptions().map_entry or child.full_name in _OPEN_TYPES:
                    kind = "*"
                elif not child.full_name.startswith("google.protobuf."):
                    kind = child.full_name
                    self._add(child)
            fields[field.name] = fields[field.json_name] = kind

    def lua(self) -> str:
        """The tables mesh/envoy/rest_fields.lua reads, as Lua source."""

        def value(kind: str | bool) -> str:
            return "true" if kind is True else json.dumps(kind)

        lines = ["METHODS = {"]
        lines += [
            f"  [{json.dumps(k)}] = {json.dumps(v)}," for k, v in sorted(self.methods.items())
        ]
        lines += ["}", "MESSAGES = {"]
        for name, fields in sorted(self.messages.items()):
            inner = ", ".join(f"[{json.dumps(f)}] = {value(k)}" for f, k in sorted(fields.items()))
            lines.append(f"  [{json.dumps(name)}] = {{{inner}}},")
        lines.append("}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Address:
    """A host (an IP, a DNS name or a chart placeholder) and a port (a placeholder
    is a string)."""

    host: str
    port: int | str


@dataclass(frozen=True, slots=True)
class Upstreams:
    """Where the edge listens and where it sends each service's calls: everything
    that differs between the local stack and the Kubernetes edge.

    `via_mesh`: each cluster's one endpoint is a name that a mesh resolves and
    balances (Kubernetes: the mesh Service, whose VirtualService routes by gRPC path
    and whose sidecar picks, retries and ejects pods), so Envoy runs no health
    checks of its own; otherwise each is the service's own process, checked by
    Envoy's gRPC health checks. A cluster whose host is not an IP is resolved by
    DNS (STRICT_DNS), else STATIC.
    """

    listen: Address
    admin: Address
    jwks: Address
    services: Mapping[str, Address]  # by ServiceSpec.name: its (first) replica
    via_mesh: bool = False
    # Further replicas of a service, each another endpoint of its cluster.
    replicas: Mapping[str, Sequence[Address]] = dataclasses.field(default_factory=dict)

    @classmethod
    def local(cls, ports: Ports, replicas: Mapping[str, int] | None = None) -> Upstreams:
        """The local stack: every part on `ports.host`, at its port in the layout;
        `replicas`: processes per service (the first at the service's own port)."""
        counts = replicas or {}
        return cls(
            listen=Address(ports.host, ports.edge),
            admin=Address(ports.host, ports.envoy_admin),
            jwks=Address(ports.host, ports.jwks),
            services={spec.name: Address(ports.host, ports.grpc(spec)) for spec in SERVICES},
            replicas={
                spec.name: [
                    Address(ports.host, ports.grpc(spec, r))
                    for r in range(2, counts.get(spec.name, 1) + 1)
                ]
                for spec in SERVICES
                if counts.get(spec.name, 1) > 1
            },
        )

    @property
    def jwks_url(self) -> str:
        return f"http://{self.jwks.host}:{self.jwks.port}/.well-known/jwks.json"


# The Kubernetes edge (helm/cex/templates/edge.yaml fills the placeholders): the
# listener and admin on every interface of the pod, every service through the mesh
# address (CEX_MESH_ADDR, as the services call each other), auth's JWKS port.
KUBERNETES = Upstreams(
    listen=Address("0.0.0.0", "__CEX_EDGE_PORT__"),
    admin=Address("0.0.0.0", "__CEX_EDGE_ADMIN_PORT__"),
    jwks=Address("__CEX_AUTH_HOST__", "__CEX_JWKS_PORT__"),
    services={spec.name: Address("__CEX_MESH_HOST__", "__CEX_GRPC_PORT__") for spec in SERVICES},
    via_mesh=True,
)
_KUBERNETES_XFF_TRUSTED_HOPS = "__CEX_EDGE_XFF_TRUSTED_HOPS__"


def _cluster_type(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "STRICT_DNS"
    return "STATIC"


def _descriptor() -> str:
    """The descriptor set the transcoder reads, base64, without source info (comments
    the transcoder never reads: a fifth of the size, so the chart's ConfigMap stays small)."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())
    for file in files.file:
        file.ClearField("source_code_info")
    return base64.b64encode(files.SerializeToString(deterministic=True)).decode()


def _http_filter(hcm: dict[str, Any], name: str) -> dict[str, Any]:
    found = next(f for f in hcm["http_filters"] if f["name"] == name)
    config: dict[str, Any] = found["typed_config"]
    return config


@dataclass(frozen=True, slots=True)
class Tracing:
    """Where Envoy sends its spans (OTLP/gRPC) and the share of new traces it starts."""

    host: str
    port: int
    sampling_percent: float = 100.0


def tracing_from_env(env: Mapping[str, str]) -> Tracing | None:
    """Envoy traces as the services do: OTEL_TRACES_EXPORTER=otlp to the collector in
    OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, a ratio sampler's OTEL_TRACES_SAMPLER_ARG as
    its random sampling (Envoy starts the traces: clients rarely send a traceparent)."""
    if env.get("OTEL_TRACES_EXPORTER", "none").strip().lower() != "otlp":
        return None
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or "http://localhost:4317"
    )
    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    if url.hostname is None:
        raise ValueError(f"OTEL_EXPORTER_OTLP_ENDPOINT={endpoint!r} names no host")
    percent = 100.0
    if "traceidratio" in env.get("OTEL_TRACES_SAMPLER", ""):
        percent = min(max(float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0")) * 100, 0.0), 100.0)
    return Tracing(url.hostname, url.port or 4317, percent)


def _enable_tracing(config: dict[str, Any], hcm: dict[str, Any], tracing: Tracing) -> None:
    spec = config.pop("x-tracing")
    hcm["tracing"] = spec["tracing"]
    hcm["tracing"]["random_sampling"] = {"value": tracing.sampling_percent}
    cluster = spec["cluster"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"] = {"address": tracing.host, "port_value": tracing.port}
    config["static_resources"]["clusters"].append(cluster)


def xff_trusted_hops_from_env(env: Mapping[str, str]) -> int:
    """How many proxies in front of the edge append to X-Forwarded-For and are trusted
    (CEX_EDGE_XFF_TRUSTED_HOPS, default 0: the peer is the client)."""
    text = env.get("CEX_EDGE_XFF_TRUSTED_HOPS", "0").strip() or "0"
    hops = int(text)
    if hops < 0:
        raise ValueError(f"CEX_EDGE_XFF_TRUSTED_HOPS={text!r} must be 0 or more")
    return hops


def render(
    upstreams: Upstreams,
    template: Path = TEMPLATE,
    *,
    tracing: Tracing | None = None,
    xff_trusted_hops: int | str = 0,
) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(template.read_text())
    service = config.pop("x-service")
    limits = config.pop("x-rate-limits")
    by_account = config.pop("x-balance-by-account")
    values = {
        "xff_trusted_hops": xff_trusted_hops,
        "edge_host": upstreams.listen.host,
        "edge_port": upstreams.listen.port,
        "admin_host": upstreams.admin.host,
        "admin_port": upstreams.admin.port,
        "jwks_host": upstreams.jwks.host,
        "jwks_port": upstreams.jwks.port,
        "jwks_url": upstreams.jwks_url,
        "cluster_type": _cluster_type(upstreams.jwks.host),
        "descriptor": _descriptor(),
        "rest_lua": REST_LUA.read_text(),
        "unauthenticated_details": _details(UNAUTHENTICATED),
        "rate_limited_details": _details(RATE_LIMITED),
        "permission_denied_details": _details(PERMISSION_DENIED),
        "unauthenticated_json": _json(UNAUTHENTICATED),
        "permission_denied_json": _json(PERMISSION_DENIED),
        "rate_limited_json": _json(RATE_LIMITED),
        "not_found_json": _json(NOT_FOUND),
        "too_large_json": _json(TOO_LARGE),
        "unavailable_json": _json(UNAVAILABLE),
    }
    edge_routes = _fill(config.pop("x-edge-routes"), values)
    config = _fill(config, values)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    transcoded = [spec.grpc_service for spec in SERVICES if spec.grpc_service]
    _http_filter(hcm, "envoy.filters.http.grpc_json_transcoder")["services"] = transcoded
    _http_filter(hcm, "cex.rest_fields")["default_source_code"] = {
        "inline_string": RestSchema.load(transcoded).lua() + REST_FIELDS_LUA.read_text()
    }
    route_config = hcm["route_config"]
    hosts = route_config["virtual_hosts"]
    default_routes = hosts[-1]["routes"]
    clusters = config["static_resources"]["clusters"]
    # Services whose every method is public are limited per address, the others per
    # account (their calls carry a verified token by the time the limit applies).
    jwt = _http_filter(hcm, "envoy.filters.http.jwt_authn")
    public = {rule["match"].get("prefix") for rule in jwt["rules"] if "requires" not in rule}
    for spec in SERVICES:
        address = upstreams.services[spec.name]
        values = {
            **values,
            "name": spec.name,
            "host": address.host,
            "port": address.port,
            "cluster_type": _cluster_type(address.host),
            "grpc_service": spec.grpc_service,
            "grpc_service_re": re.escape(spec.grpc_service),
        }
        per = "per_address" if f"/{spec.grpc_service}/" in public else "per_account"
        values["client_limit"] = _fill(copy.deepcopy(limits[per]), values)
        cluster = _fill(copy.deepcopy(service["cluster"]), values)
        if upstreams.via_mesh:
            del cluster["health_checks"]
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        for extra in upstreams.replicas.get(spec.name, ()):
            endpoint = copy.deepcopy(endpoints[0])
            endpoint["endpoint"]["address"]["socket_address"] = {
                "address": extra.host,
                "port_value": extra.port,
            }
            endpoints.append(endpoint)
        clusters.append(cluster)
        host = _fill(copy.deepcopy(service["virtual_host"]), values)
        prefix = _fill(copy.deepcopy(service["prefix_routes"]), values) if spec.grpc_service else []
        if spec.balance == "account":
            cluster["lb_policy"] = by_account["lb_policy"]
            for route in [*host["routes"], *prefix]:
                route["route"]["hash_policy"] = copy.deepcopy(by_account["hash_policy"])
        hosts.insert(-1, host)
        default_routes[0:0] = prefix
    for host in hosts:
        host["routes"][0:0] = copy.deepcopy(edge_routes)
    if tracing is not None:
        _enable_tracing(config, hcm, tracing)
    for key in [k for k in config if k.startswith("x-")]:
        del config[key]  # the template's own blocks (anchors, per-service parts)
    return config


def kubernetes_config() -> str:
    """helm/cex/files/edge/envoy.yaml as it must be: `render(KUBERNETES)`, placeholders
    for what only the chart knows (its Service names, ports and trusted hops)."""
    config = render(KUBERNETES, xff_trusted_hops=_KUBERNETES_XFF_TRUSTED_HOPS)
    header = (
        "# Generated by `make edge-config` (cex_stack/envoy.py from mesh/envoy/): do not edit.\n"
        "# The Kubernetes edge's Envoy, the local stack's config with other addresses;\n"
        "# helm/cex/templates/edge.yaml replaces the __CEX_*__ placeholders.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    """`python -m cex_stack.envoy write|check`: (re)write the chart's edge config, or
    fail if the committed one is not what the renderer makes (CI, `make edge-config-check`)."""
    parser = argparse.ArgumentParser(prog="python -m cex_stack.envoy", description=main.__doc__)
    parser.add_argument("action", choices=["write", "check"])
    parser.add_argument("--path", type=Path, default=KUBERNETES_CONFIG)
    args = parser.parse_args(argv)
    text = kubernetes_config()
    if args.action == "write":
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(text)
        print(f"edge-config: wrote {args.path}")
        return 0
    if args.path.exists() and args.path.read_text() == text:
        print(f"edge-config-check: {args.path} is up to date")
        return 0
    print(
        f"edge-config-check: {args.path} is stale: run `make edge-config` and commit it",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
