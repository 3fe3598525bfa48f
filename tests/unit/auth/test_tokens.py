"""EdDSA JWTs: what verifies and, for each way a token can be bad, which reason refuses it."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import REGISTRY

from services.chassis import Unauthenticated, Unavailable
from services.chassis.tokens import (
    JwksCache,
    UnknownKey,
    b64url,
    b64url_decode,
    jwk_of,
    public_key_of_jwk,
    sign,
    verify,
)

KEY = Ed25519PrivateKey.generate()
KEYS = {"k1": KEY.public_key()}
NOW = 1_800_000_000


def _token(**overrides: object) -> str:
    claims: dict[str, object] = {
        "subject": "acc_1",
        "key_id": "ak_1",
        "scopes": ["trade", "read"],
        "issued_at": NOW,
        "ttl_s": 300,
        "token_id": "t1",
    }
    claims.update(overrides)
    key = claims.pop("key", KEY)
    kid = claims.pop("kid", "k1")
    return sign(key, kid, **claims)  # type: ignore[arg-type]


def _reason(token: str, now: float = NOW + 1) -> str:
    with pytest.raises(Unauthenticated) as refused:
        verify(token, KEYS, now=now)
    return refused.value.reason


def test_a_valid_token_verifies_to_its_claims() -> None:
    claims = verify(_token(), KEYS, now=NOW + 10)
    assert (claims.subject, claims.key_id, claims.scopes) == ("acc_1", "ak_1", {"read", "trade"})
    assert claims.expires_at == NOW + 300
    assert not claims.is_service
    service = verify(_token(subject="svc:order", scopes=["internal"]), KEYS, now=NOW)
    assert service.is_service


def test_the_header_names_eddsa_and_the_key_id() -> None:
    header = json.loads(b64url_decode(_token().split(".")[0]))
    assert header == {"alg": "EdDSA", "kid": "k1", "typ": "JWT"}


def test_expiry_and_not_before_allow_30s_of_clock_skew() -> None:
    assert verify(_token(), KEYS, now=NOW + 300 + 29).subject == "acc_1"
    assert _reason(_token(), now=NOW + 300 + 30) == "AUTH_TOKEN_EXPIRED"
    assert _reason(_token(issued_at=NOW + 100), now=NOW + 69) == "AUTH_TOKEN_NOT_YET_VALID"


def test_alg_none_and_hs256_with_the_public_key_are_refused_before_any_key() -> None:
    payload = _token().split(".")[1]
    none = b64url(json.dumps({"alg": "none", "kid": "k1"}).encode())
    assert _reason(f"{none}.{payload}.") == "AUTH_ALGORITHM_NOT_ALLOWED"
    hs = b64url(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    public = KEY.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    mac = hmac.new(public, f"{hs}.{payload}".encode(), hashlib.sha256).digest()
    assert _reason(f"{hs}.{payload}.{b64url(mac)}") == "AUTH_ALGORITHM_NOT_ALLOWED"


def test_a_tampered_payload_or_signature_does_not_verify() -> None:
    header, payload, signature = _token().split(".")
    other = _token(subject="acc_2").split(".")[1]
    assert _reason(f"{header}.{other}.{signature}") == "AUTH_INVALID_SIGNATURE"
    assert _reason(f"{header}.{payload}.{signature[:-4]}AAAA") == "AUTH_INVALID_SIGNATURE"


def test_issuer_audience_and_shape() -> None:
    assert _reason(_token(issuer="evil")) == "AUTH_WRONG_ISSUER"
    assert _reason(_token(audience="other")) == "AUTH_WRONG_AUDIENCE"
    for junk in ("", "a.b", "a.b.c.d", "!!.??.##", "e30.e30.e30"):
        assert _reason(junk) in ("AUTH_TOKEN_MALFORMED", "AUTH_ALGORITHM_NOT_ALLOWED")


def test_an_unknown_kid_is_reported_so_the_caller_can_refresh() -> None:
    with pytest.raises(UnknownKey) as unknown:
        verify(_token(key=Ed25519PrivateKey.generate(), kid="k9"), KEYS, now=NOW)
    assert unknown.value.kid == "k9"


def test_jwk_round_trip() -> None:
    jwk = jwk_of("k1", KEY.public_key())
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["alg"] == "EdDSA"
    key = public_key_of_jwk(jwk)
    assert key is not None
    assert verify(_token(), {"k1": key}, now=NOW).subject == "acc_1"
    assert public_key_of_jwk({"kty": "RSA", "n": "x"}) is None


class FakeJwks:
    def __init__(self) -> None:
        self.document: dict[str, object] = {"keys": [jwk_of("k1", KEY.public_key())]}
        self.fetches = 0
        self.fail = False

    async def __call__(self, url: str) -> object:
        self.fetches += 1
        if self.fail:
            raise OSError("auth is down")
        return self.document


async def test_the_jwks_cache_refreshes_on_unknown_kid_but_not_more_than_allowed() -> None:
    fake, now = FakeJwks(), [0.0]
    cache = JwksCache("http://auth/jwks", fetch=fake, clock=lambda: now[0], min_refresh_s=5)
    assert set(await cache.keys()) == {"k1"}
    assert set(await cache.keys(refresh=True)) == {"k1"}
    assert fake.fetches == 1  # too soon to fetch again
    new = Ed25519PrivateKey.generate()
    fake.document = {"keys": [jwk_of("k1", KEY.public_key()), jwk_of("k2", new.public_key())]}
    now[0] = 6
    assert set(await cache.keys(refresh=True)) == {"k1", "k2"}
    assert fake.fetches == 2
    now[0] = 400  # past the ttl: refetched without being asked
    fake.fail = True
    assert set(await cache.keys()) == {"k1", "k2"}  # auth down: keep what we had
    assert fake.fetches == 3


async def test_no_keys_at_all_is_unavailable() -> None:
    fake = FakeJwks()
    fake.fail = True
    with pytest.raises(Unavailable) as down:
        await JwksCache("http://auth/jwks", fetch=fake).keys()
    assert down.value.reason == "AUTH_KEYS_UNAVAILABLE"


async def test_failed_jwks_fetches_are_counted() -> None:
    def failures() -> float:
        return REGISTRY.get_sample_value("authn_jwks_fetch_failures_total") or 0.0

    fake, now = FakeJwks(), [0.0]
    cache = JwksCache("http://auth/jwks", fetch=fake, clock=lambda: now[0], min_refresh_s=5)
    before = failures()
    await cache.keys()
    assert failures() == before  # a good fetch is not a failure
    fake.fail = True
    now[0] = 400
    await cache.keys()  # stale, refetched, failed: the old keys stay
    assert failures() == before + 1
