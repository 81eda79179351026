"""Production tokens: RS256/ES256 keys from a JWKS URL (served here over real HTTP)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kernel.auth import Caller, TokenVerifier
from kernel.errors import Unauthenticated
from kernel.settings import Settings

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _jwks() -> bytes:
    keys = []
    for kid, key, alg in (("rsa-1", RSA_KEY, "RS256"), ("ec-1", EC_KEY, "ES256")):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
        keys.append(jwk | {"kid": kid, "alg": alg, "use": "sig"})
    return json.dumps({"keys": keys}).encode()


@pytest.fixture(scope="module")
def jwks_url() -> Iterator[str]:
    body = _jwks()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    server.shutdown()
    server.server_close()


def _claims() -> dict[str, object]:
    return {"sub": "svc", "org_id": "org_a", "roles": ["viewer"], "exp": int(time.time()) + 60,
            "iss": "https://idp.test", "aud": "analytics"}  # fmt: skip


async def test_rs256_and_es256_tokens_from_the_jwks_are_accepted(jwks_url: str) -> None:
    verifier = TokenVerifier(Settings(jwt_jwks_url=jwks_url, jwt_issuer="https://idp.test", jwt_audience="analytics"))
    for kid, key, alg in (("rsa-1", RSA_KEY, "RS256"), ("ec-1", EC_KEY, "ES256")):
        token = jwt.encode(_claims(), key, algorithm=alg, headers={"kid": kid})
        assert await verifier.verify(token) == Caller("svc", "org_a", ("viewer",))


async def test_other_keys_and_algorithms_are_refused(jwks_url: str) -> None:
    verifier = TokenVerifier(Settings(jwt_jwks_url=jwks_url))
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = [
        jwt.encode(_claims() | {"aud": None}, stranger, algorithm="RS256", headers={"kid": "rsa-1"}),
        jwt.encode(_claims(), "s" * 40, algorithm="HS256", headers={"kid": "rsa-1"}),
        jwt.encode(_claims(), RSA_KEY, algorithm="RS256", headers={"kid": "unknown"}),
    ]
    for token in bad:
        with pytest.raises(Unauthenticated):
            await verifier.verify(token)
