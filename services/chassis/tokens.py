"""Access tokens: compact JWS (JWT) signed with Ed25519 ("EdDSA"), and their JWKS.

auth signs; every service (and Envoy's jwt_authn) verifies against auth's JWKS.
The JOSE work is PyJWT's (signing, signature verification, the issuer and
audience checks, JWK parsing and serialising); this module fixes how it is
used, strictly and in a fixed order, each failure with its own reason:
the header's `alg` must be exactly EdDSA (so `none` and HS256-with-the-public-key
are refused before any key is looked at, and PyJWT is told to accept EdDSA
only), the `kid` must be a published key, the signature must verify, then
issuer, audience and the time window are checked.

The time window is checked here, against the `now` the caller passes (PyJWT
reads the wall clock itself and cannot be given one): the Authenticator's
clock decides, as for its cache of verified tokens, and tests can fix it.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm
from jwt.utils import base64url_decode, base64url_encode

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
    "kid_of",
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
    return base64url_encode(data).decode()


def b64url_decode(text: str) -> bytes:
    return base64url_decode(text)


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says."""

    subject: str  # an account id, or "svc:<name>" for a service
    key_id: str  # the API key it was issued from ("svc:<name>" for a service)
    scopes: frozenset[str]
    expires_at: int
    token_id: str
    # A master account's sub-accounts when the token was issued (ADR 0017): the
    # accounts whose resources it may read and fund. Empty for every other token.
    subs: frozenset[str] = frozenset()

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
    """The public JWK as the JWKS publishes it (Envoy's and Istio's format:
    kty OKP, crv Ed25519, x, kid, alg)."""
    jwk = OKPAlgorithm.to_jwk(key, as_dict=True)
    return {"kty": "OKP", "crv": "Ed25519", "x": str(jwk["x"]), "kid": kid, "alg": ALGORITHM}


def public_key_of_jwk(jwk: Mapping[str, Any]) -> Ed25519PublicKey | None:
    """The Ed25519 public key of a JWK; None for any other kind of key, or junk."""
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        return None
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=ALGORITHM).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, KeyError, TypeError, ValueError):
        return None
    return key if isinstance(key, Ed25519PublicKey) else None


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
    subs: Sequence[str] = (),
) -> str:
    payload: dict[str, object] = {
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
    if subs:
        payload["subs"] = sorted(subs)
    # The header: {"alg": "EdDSA", "kid": kid, "typ": "JWT"}.
    return jwt.encode(payload, key, algorithm=ALGORITHM, headers={"kid": kid, "typ": "JWT"})


def _refuse(reason: str, message: str) -> Unauthenticated:
    return Unauthenticated(reason, message)


def kid_of(token: str) -> str:
    """The kid of a token's header, unverified (for a token that has just verified)."""
    return str(jwt.get_unverified_header(token)["kid"])


# What PyJWT checks, and what it does not: the time window is ours (see above).
_DECODE_OPTIONS: Any = {
    "require": ["iss", "aud", "sub", "exp"],
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_iss": True,
    "verify_aud": True,
}


def _decode(token: str, key: Ed25519PublicKey, *, issuer: str, audience: str) -> dict[str, Any]:
    """The payload once PyJWT has checked the signature, the issuer and the audience."""
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            issuer=issuer,
            audience=audience,
            options=_DECODE_OPTIONS,
        )
    except jwt.InvalidSignatureError:
        raise _refuse("AUTH_INVALID_SIGNATURE", "the token's signature does not verify") from None
    except jwt.InvalidIssuerError:
        raise _refuse("AUTH_WRONG_ISSUER", "the token was not issued by cex auth") from None
    except jwt.InvalidAudienceError:
        raise _refuse("AUTH_WRONG_AUDIENCE", "the token is not meant for this exchange") from None
    except jwt.MissingRequiredClaimError as missing:
        if missing.claim == "iss":
            raise _refuse("AUTH_WRONG_ISSUER", "the token was not issued by cex auth") from None
        if missing.claim == "aud":
            raise _refuse(
                "AUTH_WRONG_AUDIENCE", "the token is not meant for this exchange"
            ) from None
        raise _refuse("AUTH_TOKEN_MALFORMED", f"the token has no {missing.claim}") from None
    except jwt.PyJWTError:
        raise _refuse("AUTH_TOKEN_MALFORMED", "the token is not a valid JWT") from None
    return payload


def verify(
    token: str,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    now: float,
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
) -> Claims:
    """Claims of a valid token, else Unauthenticated (UnknownKey when the kid is unknown)."""
    if token.count(".") != 2:
        raise _refuse("AUTH_TOKEN_MALFORMED", "the token is not a JWT")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _refuse("AUTH_TOKEN_MALFORMED", "the token is not a JWT") from None
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
    payload = _decode(token, key, issuer=issuer, audience=audience)
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
    subs = payload.get("subs", [])
    if not isinstance(subs, list) or not all(isinstance(s, str) and s for s in subs):
        raise _refuse("AUTH_TOKEN_MALFORMED", "the token's subs claim is not a list of ids")
    return Claims(
        subject=subject,
        key_id=str(key_id),
        scopes=frozenset(scope.split()),
        expires_at=exp,
        token_id=str(payload.get("jti", "")),
        subs=frozenset(subs),
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
    `min_refresh_s`, so junk kids cannot make us hammer auth. Each key is parsed
    by PyJWT (`public_key_of_jwk`). PyJWT's own PyJWKClient is not used: it
    fetches with blocking urllib on the caller's thread (the event loop here),
    refetches on every unknown kid with no floor, and takes neither a clock nor
    a fetcher, which this policy and its tests need.
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
            key = public_key_of_jwk(jwk) if isinstance(jwk, dict) else None
            if key is not None and isinstance(jwk.get("kid"), str):
                found[jwk["kid"]] = key
        self._keys = found
        self._fetched_at = self._clock()
