"""The JOSE library under tokens.py (PyJWT): what it must keep as it was.

The attack matrix is test_tokens.py (unchanged since the move). Here: the JWKS
entry keeps the exact shape Envoy's jwt_authn and Istio read, a token is a
plain RFC 7519 EdDSA JWT that another implementation verifies, and tokens
signed with anything but Ed25519 are refused before any key is looked up.
"""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.chassis import Unauthenticated
from services.chassis.tokens import b64url, jwk_of, kid_of, public_key_of_jwk, sign, verify

KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000


def test_the_jwks_entry_keeps_the_shape_envoy_reads() -> None:
    jwk = jwk_of("k1", KEY.public_key())
    raw = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert jwk == {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "kid": "k1", "alg": "EdDSA"}
    assert len(jwk["x"]) == 43  # 32 bytes, unpadded base64url


def test_a_token_is_a_standard_eddsa_jwt() -> None:
    token = sign(
        KEY, "k1", subject="acc_1", key_id="ak_1", scopes=["read"], issued_at=NOW, ttl_s=300,
        token_id="t1",
    )  # fmt: skip
    assert kid_of(token) == "k1"
    claims = jwt.decode(
        token, KEY.public_key(), algorithms=["EdDSA"], audience="cex", issuer="cex-auth",
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )  # fmt: skip
    assert claims == {
        "iss": "cex-auth", "aud": "cex", "sub": "acc_1", "key_id": "ak_1", "scope": "read",
        "iat": NOW, "nbf": NOW, "exp": NOW + 300, "jti": "t1",
    }  # fmt: skip


@pytest.mark.parametrize("alg", ["ES256", "HS256"])
def test_a_token_signed_with_another_algorithm_is_refused(alg: str) -> None:
    key: object = ec.generate_private_key(ec.SECP256R1()) if alg == "ES256" else b"k" * 32
    payload = {"iss": "cex-auth", "aud": "cex", "sub": "acc_1", "exp": NOW + 300}
    token = jwt.encode(payload, key, algorithm=alg, headers={"kid": "k1"})  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated) as refused:
        verify(token, {"k1": KEY.public_key()}, now=NOW)
    assert refused.value.reason == "AUTH_ALGORITHM_NOT_ALLOWED"


def test_only_ed25519_public_keys_are_taken_from_a_jwks() -> None:
    private = {**jwk_of("k1", KEY.public_key()), "d": b64url(KEY.private_bytes_raw())}
    assert isinstance(jwt.PyJWK.from_dict(private).key, Ed25519PrivateKey)  # PyJWT reads it,
    assert public_key_of_jwk(private) is None  # but a private key is never a verifying key
    assert public_key_of_jwk(jwk_of("k1", KEY.public_key())) is not None
    assert public_key_of_jwk({"kty": "OKP", "crv": "X25519", "x": "A" * 43}) is None
    assert public_key_of_jwk({"kty": "OKP", "crv": "Ed25519", "x": "%%%"}) is None
    assert public_key_of_jwk({"kty": "OKP", "crv": "Ed25519"}) is None
