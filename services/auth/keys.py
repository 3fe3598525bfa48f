"""auth's signing keys: the keyring in memory, its rotation, and the JWKS over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.chassis import Unavailable
from services.chassis.tokens import JWKS_PATH, jwk_of, new_signing_key

from .config import AuthConfig
from .domain import SigningKey, published, signing_key
from .store import Store

__all__ = ["Keyring", "serve_jwks"]

_log = logging.getLogger("cex.auth.keys")
RELOAD_MIN_S = 5.0  # at most one reload this often on an unknown kid


class Keyring:
    """The signing keys as last loaded from PostgreSQL (shared by every auth replica)."""

    def __init__(self, store: Store, config: AuthConfig, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._keys: list[SigningKey] = []
        self._private: dict[str, Ed25519PrivateKey] = {}
        self._reloaded_at = -RELOAD_MIN_S

    async def rotate_and_reload(self) -> None:
        c = self._config
        key = new_signing_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        rotated = await self._store.rotate_if_due(
            kid=f"k{secrets.token_hex(8)}",
            private_pem=pem,
            now=self._clock(),
            rotate_after=timedelta(seconds=c.key_rotate_s),
            publish_ahead=timedelta(seconds=c.key_publish_ahead_s),
            retire_after=timedelta(seconds=c.token_ttl_max_s + 60),
        )
        if rotated:
            _log.info("new signing key added")
        await self.reload()

    async def reload(self) -> None:
        self._reloaded_at = time.monotonic()
        self._keys = await self._store.signing_keys()
        for k in self._keys:
            if k.kid not in self._private:
                loaded = serialization.load_pem_private_key(k.private_pem, password=None)
                assert isinstance(loaded, Ed25519PrivateKey)
                self._private[k.kid] = loaded

    def signer(self) -> tuple[str, Ed25519PrivateKey]:
        current = signing_key(self._keys, self._clock())
        if current is None:
            raise Unavailable("AUTH_NO_SIGNING_KEY", "no signing key is active yet")
        return current.kid, self._private[current.kid]

    def public(self) -> dict[str, Ed25519PublicKey]:
        now = self._clock()
        return {k.kid: self._private[k.kid].public_key() for k in published(self._keys, now)}

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [jwk_of(kid, key) for kid, key in self.public().items()]}

    # KeySource, for auth's own interceptor: no HTTP round trip to itself.
    async def keys(self, *, refresh: bool = False) -> Mapping[str, Ed25519PublicKey]:
        # Junk kids must not turn into a database query each.
        if refresh and time.monotonic() - self._reloaded_at >= RELOAD_MIN_S:
            await self.reload()
        return self.public()

    async def maintain(self) -> None:
        """Reload (another replica may have rotated) and rotate when due, forever."""
        while True:
            await asyncio.sleep(self._config.key_check_s)
            try:
                await self.rotate_and_reload()
            except Exception:
                _log.exception("signing key maintenance failed; will retry")


@contextlib.asynccontextmanager
async def serve_jwks(keyring: Keyring, host: str, port: int) -> AsyncIterator[int]:
    """A tiny HTTP/1.1 server: GET /.well-known/jwks.json (Envoy, Istio, services)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method == "GET" and path.split("?", 1)[0] == JWKS_PATH:
                status, body = "200 OK", json.dumps(keyring.jwks()).encode()
                kind = "application/json"
            else:
                status, body, kind = "404 Not Found", b"not found\n", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: max-age=60\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    bound = server.sockets[0].getsockname()[1]
    try:
        yield int(bound)
    finally:
        server.close()
        await server.wait_closed()
