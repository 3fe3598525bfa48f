"""Renders mesh/envoy/envoy.yaml for a stack: one cluster and host per service."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from string import Template
from typing import Any

import yaml

from .topology import SERVICES, Ports

__all__ = ["TEMPLATE", "render"]

TEMPLATE = Path(__file__).resolve().parents[2] / "mesh" / "envoy" / "envoy.yaml"
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


def render(ports: Ports, template: Path = TEMPLATE) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(template.read_text())
    service = config.pop("x-service")
    config = _fill(
        config,
        {"host": ports.host, "edge_port": ports.edge, "admin_port": ports.envoy_admin},
    )
    route_config = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]
    hosts = route_config["virtual_hosts"]
    default_routes = hosts[-1]["routes"]
    clusters = config["static_resources"]["clusters"]
    for spec in SERVICES:
        values = {
            "name": spec.name,
            "host": ports.host,
            "port": ports.grpc(spec),
            "grpc_service": spec.grpc_service,
        }
        clusters.append(_fill(copy.deepcopy(service["cluster"]), values))
        hosts.insert(-1, _fill(copy.deepcopy(service["virtual_host"]), values))
        if spec.grpc_service:
            default_routes.insert(0, _fill(copy.deepcopy(service["prefix_route"]), values))
    return config
