"""Renders mesh/envoy/envoy.yaml for a stack: one cluster and host per service."""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import urlsplit

import yaml

from services.chassis.errors import (
    ExchangeError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)

from .topology import SERVICES, Ports

__all__ = [
    "PERMISSION_DENIED",
    "RATE_LIMITED",
    "TEMPLATE",
    "UNAUTHENTICATED",
    "Tracing",
    "render",
    "tracing_from_env",
]

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "mesh" / "envoy" / "envoy.yaml"
DESCRIPTOR = ROOT / "gen" / "descriptor" / "cex.binpb"
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


# What Envoy's own refusals carry (it cannot tell us which check failed).
UNAUTHENTICATED = Unauthenticated(
    "EDGE_UNAUTHENTICATED", "missing, expired or invalid access token (see www-authenticate)"
)
PERMISSION_DENIED = PermissionDenied(
    "EDGE_PERMISSION_DENIED", "the access token is not valid for this audience"
)
RATE_LIMITED = ResourceExhausted(
    "EDGE_RATE_LIMITED", "too many requests on this route", retry_after_s=1.0
)


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


def render(
    ports: Ports, template: Path = TEMPLATE, *, tracing: Tracing | None = None
) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(template.read_text())
    service = config.pop("x-service")
    values = {
        "host": ports.host,
        "edge_port": ports.edge,
        "admin_port": ports.envoy_admin,
        "jwks_port": ports.jwks,
        "jwks_url": ports.jwks_url,
        "descriptor": str(DESCRIPTOR),
        "unauthenticated_details": _details(UNAUTHENTICATED),
        "rate_limited_details": _details(RATE_LIMITED),
        "permission_denied_details": _details(PERMISSION_DENIED),
    }
    edge_routes = _fill(config.pop("x-edge-routes"), values)
    config = _fill(config, values)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    _http_filter(hcm, "envoy.filters.http.grpc_json_transcoder")["services"] = [
        spec.grpc_service for spec in SERVICES if spec.grpc_service
    ]
    route_config = hcm["route_config"]
    hosts = route_config["virtual_hosts"]
    default_routes = hosts[-1]["routes"]
    clusters = config["static_resources"]["clusters"]
    for spec in SERVICES:
        values = {
            **values,
            "name": spec.name,
            "host": ports.host,
            "port": ports.grpc(spec),
            "grpc_service": spec.grpc_service,
            "grpc_service_re": re.escape(spec.grpc_service),
        }
        clusters.append(_fill(copy.deepcopy(service["cluster"]), values))
        hosts.insert(-1, _fill(copy.deepcopy(service["virtual_host"]), values))
        if spec.grpc_service:
            default_routes[0:0] = _fill(copy.deepcopy(service["prefix_routes"]), values)
    for host in hosts:
        host["routes"][0:0] = copy.deepcopy(edge_routes)
    if tracing is not None:
        _enable_tracing(config, hcm, tracing)
    else:
        config.pop("x-tracing")
    return config
