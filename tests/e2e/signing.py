"""The stack's current token-signing key, read as an attacker with the database would."""

from __future__ import annotations

import asyncpg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


async def signing_key(database_url: str) -> tuple[str, Ed25519PrivateKey]:
    """(kid, private key) of auth's active signing key, to forge tokens in tests."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            """SELECT kid, private_pem FROM auth.signing_keys WHERE activate_time <= now()
               ORDER BY activate_time DESC LIMIT 1"""
        )
    finally:
        await conn.close()
    key = serialization.load_pem_private_key(bytes(row["private_pem"]), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return row["kid"], key
