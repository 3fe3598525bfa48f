"""Access tokens: compact JWS (JWT) signed with Ed25519 ("EdDSA"), and their JWKS.

auth signs; every service (and Envoy's jwt_authn) verifies against auth's JWKS.
Verification is strict and in a fixed order, each failure with its own reason:
the header's `alg` must be exactly EdDSA (so `none` and HS256-with-the-public-key
are refused before any key is looked at), the `kid` must be a published key, the
signature must verify, then issuer, audience and the time window are checked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import Unauthenticated, Unavailable
from .telemetry import JWKS_FETCH_FAILURES

__all__ = [
    "ALGORITHM",
    "AUDIENCE",
    "ISSUER",
    "JWKS_PATH",
    "Claims",
    "JwksCache",
    "KeySource",
    "StaticKeys",
    "UnknownKey",
    "b64url",
    "b64url_decode",
    "jwk_of",
    "new_signing_key",
    "public_key_of_jwk",
    "sign",
    "verify",
]

ALGORITHM = "EdDSA"
ISSUER = "cex-auth"
AUDIENCE = "cex"
JWKS_PATH = "/.well-known/jwks.json"
CLOCK_SKEW_S = 30


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says."""

    subject: str  # an account id, or "svc:<name>" for a service
    key_id: str  # the API key it was issued from ("svc:<name>" for a service)
    scopes: frozenset[str]
    expires_at: int
    token_id: str

    @property
    def is_service(self) -> bool:
        return self.subject.startswith("svc:") and "internal" in self.scopes


class UnknownKey(Exception):
    """The token names a key id that is not (yet) in the key set."""

    def __init__(self, kid: str) -> None:
        super().__init__(kid)
        self.kid = kid


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def jwk_of(kid: str, key: Ed25519PublicKey) -> dict[str, str]:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "kid": kid, "alg": ALGORITHM}


def public_key_of_jwk(jwk: Mapping[str, Any]) -> Ed25519PublicKey | None:
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        return None
    try:
        return Ed25519PublicKey.from_public_bytes(b64url_decode(str(jwk["x"])))
    except (KeyError, ValueError, binascii.Error):
        return None


def sign(
    key: Ed25519PrivateKey,
    kid: str,
    *,
    subject: str,
    key_id: str,
    scopes: Sequence[str],
    issued_at: int,
    ttl_s: int,
    token_id: str,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
) -> str:
    header = {"alg": ALGORITHM, "typ": "JWT", "kid": kid}
    payload = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "key_id": key_id,
        "scope": " ".join(sorted(scopes)),
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl_s,
        "jti": token_id,
    }
    signing_input = f"{_part(header)}.{_part(payload)}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


def _part(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def _refuse(reason: str, message: str) -> Unauthenticated:
    return Unauthenticated(reason, message)


def _json_part(text: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(text))
    except (ValueError, binascii.Error):
        raise _refuse("AUTH_TOKEN_MALFORMED", "the token is not a JWT") from None
    if not isinstance(value, dict):
        raise _refuse("AUTH_TOKEN_MALFORMED", "the token is not a JWT")
    return value


def verify(
    token: str,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    now: float,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
) -> Claims:
    """Claims of a valid token, else Unauthenticated (UnknownKey when the kid is unknown)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise _refuse("AUTH_TOKEN_MALFORMED", "the token is not a JWT")
    header = _json_part(parts[0])
    if header.get("alg") != ALGORITHM:
        raise _refuse(
            "AUTH_ALGORITHM_NOT_ALLOWED", f"token algorithm {header.get('alg')!r} is not EdDSA"
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _refuse("AUTH_TOKEN_MALFORMED", "the token names no key id")
    key = keys.get(kid)
    if key is None:
        raise UnknownKey(kid)
    try:
        key.verify(b64url_decode(parts[2]), f"{parts[0]}.{parts[1]}".encode())
    except (InvalidSignature, ValueError, binascii.Error):
        raise _refuse("AUTH_INVALID_SIGNATURE", "the token's signature does not verify") from None
    payload = _json_part(parts[1])
    if payload.get("iss") != issuer:
        raise _refuse("AUTH_WRONG_ISSUER", "the token was not issued by cex auth")
    aud = payload.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if audience not in audiences:
        raise _refuse("AUTH_WRONG_AUDIENCE", "the token is not meant for this exchange")
    exp, nbf = payload.get("exp"), payload.get("nbf", 0)
    if not isinstance(exp, int) or not isinstance(nbf, int):
        raise _refuse("AUTH_TOKEN_MALFORMED", "the token has no valid exp/nbf")
    if now >= exp + CLOCK_SKEW_S:
        raise _refuse("AUTH_TOKEN_EXPIRED", "the token has expired; get a new one")
    if now + CLOCK_SKEW_S < nbf:
        raise _refuse("AUTH_TOKEN_NOT_YET_VALID", "the token is not valid yet")
    subject, key_id, scope = payload.get("sub"), payload.get("key_id", ""), payload.get("scope", "")
    if not isinstance(subject, str) or not subject or not isinstance(scope, str):
        raise _refuse("AUTH_TOKEN_MALFORMED", "the token has no subject")
    return Claims(
        subject=subject,
        key_id=str(key_id),
        scopes=frozenset(scope.split()),
        expires_at=exp,
        token_id=str(payload.get("jti", "")),
    )


class KeySource(Protocol):
    """Public keys by kid; `refresh=True` may fetch them again (for an unknown kid)."""

    async def keys(self, *, refresh: bool = False) -> Mapping[str, Ed25519PublicKey]: ...


class StaticKeys:
    """A fixed key set (tests, or auth's own keyring through a callable)."""

    def __init__(self, get: Callable[[], Mapping[str, Ed25519PublicKey]]) -> None:
        self._get = get

    async def keys(self, *, refresh: bool = False) -> Mapping[str, Ed25519PublicKey]:
        return self._get()


def _http_get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


class JwksCache:
    """auth's JWKS, fetched over HTTP and cached.

    Refetched when older than `ttl_s`, or when a token names an unknown kid (a
    key published after the last fetch), but never more often than
    `min_refresh_s`, so junk kids cannot make us hammer auth.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 300.0,
        min_refresh_s: float = 5.0,
        fetch: Callable[[str], Awaitable[Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self._fetch = fetch or (lambda u: asyncio.to_thread(_http_get_json, u))
        self._clock = clock
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    async def keys(self, *, refresh: bool = False) -> Mapping[str, Ed25519PublicKey]:
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at > self.ttl_s
        allowed = self._fetched_at is None or now - self._fetched_at >= self.min_refresh_s
        if stale or (refresh and allowed):
            async with self._lock:
                if self._fetched_at is None or self._clock() - self._fetched_at >= min(
                    self.min_refresh_s, self.ttl_s
                ):
                    await self._load()
        return self._keys

    async def _load(self) -> None:
        try:
            document = await self._fetch(self.url)
        except Exception:  # auth unreachable: keep what we had, try again later
            JWKS_FETCH_FAILURES.inc()
            if self._fetched_at is None:
                raise Unavailable(
                    "AUTH_KEYS_UNAVAILABLE", "the token signing keys cannot be fetched"
                ) from None
            self._fetched_at = self._clock()
            return
        found: dict[str, Ed25519PublicKey] = {}
        for jwk in document.get("keys", []) if isinstance(document, dict) else []:
            key = public_key_of_jwk(jwk)
            if key is not None and isinstance(jwk.get("kid"), str):
                found[jwk["kid"]] = key
        self._keys = found
        self._fetched_at = self._clock()
