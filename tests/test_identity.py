"""Identity: every mode, and the hostile-token matrix (all 401, none crash)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from extproc.identity import Authenticator, IdentityError, identity_from_claims
from extproc.settings import Settings

SECRET = "identity-test-secret-0123456789abcdef-xyz"
GATE_KEY = "gate-key-abcdefghijklmnop"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
    data = json.loads(algo.to_jwk(key.public_key()))
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


@pytest.fixture(scope="module")
async def jwks_server() -> AsyncIterator[dict[str, Any]]:
    state: dict[str, Any] = {"fetches": 0}

    async def keys(request: web.Request) -> web.Response:
        state["fetches"] += 1
        return web.json_response({"keys": [jwk(RSA_KEY, "rsa-1", "RS256"), jwk(EC_KEY, "ec-1", "ES256"),
                                           {"kty": "bogus", "kid": "broken"}]})

    app = web.Application()
    app.router.add_get("/jwks.json", keys)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    state["url"] = f"http://127.0.0.1:{port}/jwks.json"
    yield state
    await runner.cleanup()


def settings(**kw: Any) -> Settings:
    return Settings(jwt_secret=SECRET, gate_key=GATE_KEY, **kw)


def hs(claims: dict[str, Any], key: str = SECRET, **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm="HS256", headers=headers or None)


def now() -> int:
    return int(time.time())


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_hs256_claims_mapping() -> None:
    auth = Authenticator(settings())
    ident = await auth.authenticate(bearer(hs({"id": "u1", "email": "a@b.c", "username": "ana",
                                               "role": "admin", "exp": now() + 60})))
    assert (ident.user_id, ident.email, ident.name, ident.admin, ident.via) == ("u1", "a@b.c", "ana", True, "jwt")
    ident = await auth.authenticate(bearer(hs({"sub": "u2", "exp": now() + 60, "roles": ["Admin"]})))
    assert (ident.user_id, ident.admin) == ("u2", True)
    ident = await auth.authenticate(bearer(hs({"id": 42, "exp": now() + 60})))
    assert ident.user_id == "42" and not ident.admin


async def test_jwks_rs256_and_es256(jwks_server: dict[str, Any]) -> None:
    auth = Authenticator(settings(jwks_url=jwks_server["url"]))
    rs = jwt.encode({"sub": "oidc-user", "exp": now() + 60}, RSA_KEY, algorithm="RS256",
                    headers={"kid": "rsa-1"})
    es = jwt.encode({"sub": "oidc-ec", "exp": now() + 60}, EC_KEY, algorithm="ES256", headers={"kid": "ec-1"})
    assert (await auth.authenticate(bearer(rs))).user_id == "oidc-user"
    assert (await auth.authenticate(bearer(es))).user_id == "oidc-ec"
    fetches = jwks_server["fetches"]
    for _ in range(5):
        await auth.authenticate(bearer(rs))
    assert jwks_server["fetches"] == fetches  # cached, no fetch per request


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs_confusion_token() -> str:
    """An HS256 token signed with the RSA *public* key, the classic confusion attack."""
    import hashlib
    import hmac

    public = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = _b64(json.dumps({"sub": "attacker", "exp": now() + 60}).encode())
    sig = hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64(sig)}"


@pytest.mark.parametrize("case", [
    "alg_none", "hs_rs_confusion", "expired", "not_yet_valid", "wrong_issuer", "wrong_audience",
    "oversized", "garbage_base64", "unknown_kid", "no_exp", "bad_signature", "no_id", "id_is_dict",
    "placeholder_id", "control_chars", "wrong_secret_rs_without_jwks",
])
async def test_hostile_tokens_are_401(case: str, jwks_server: dict[str, Any]) -> None:
    cfg = settings(jwks_url=jwks_server["url"], jwt_issuer="https://librechat.example",
                   jwt_audience="solaris")
    good = {"id": "u", "exp": now() + 60, "iss": "https://librechat.example", "aud": "solaris"}
    token = {
        "alg_none": lambda: jwt.encode(good, None, algorithm="none"),
        "hs_rs_confusion": _hs_confusion_token,
        "expired": lambda: hs({**good, "exp": now() - 100}),
        "not_yet_valid": lambda: hs({**good, "nbf": now() + 3600}),
        "wrong_issuer": lambda: hs({**good, "iss": "https://evil.example"}),
        "wrong_audience": lambda: hs({**good, "aud": "other"}),
        "oversized": lambda: hs({**good, "pad": "x" * 10_000}),
        "garbage_base64": lambda: "@@@.!!!.###",
        "unknown_kid": lambda: jwt.encode(good, RSA_KEY, algorithm="RS256", headers={"kid": "nope"}),
        "no_exp": lambda: hs({k: v for k, v in good.items() if k != "exp"}),
        "bad_signature": lambda: hs(good)[:-4] + "AAAA",
        "no_id": lambda: hs({k: v for k, v in good.items() if k != "id"}),
        "id_is_dict": lambda: hs({**good, "id": {"x": 1}}),
        "placeholder_id": lambda: hs({**good, "id": "{{LIBRECHAT_USER_ID}}"}),
        "control_chars": lambda: hs({**good, "id": "u\r\nX-Admin: 1"}),
        "wrong_secret_rs_without_jwks": lambda: jwt.encode(good, RSA_KEY, algorithm="RS256"),
    }[case]()
    auth = Authenticator(cfg if case != "wrong_secret_rs_without_jwks" else settings())
    with pytest.raises(IdentityError) as err:
        await auth.authenticate(bearer(token))
    assert SECRET not in str(err.value) and token not in str(err.value)


async def test_issuer_and_audience_accepted_when_matching() -> None:
    auth = Authenticator(settings(jwt_issuer="iss-a", jwt_audience="aud-a"))
    ident = await auth.authenticate(bearer(hs({"id": "ok", "exp": now() + 60, "iss": "iss-a", "aud": "aud-a"})))
    assert ident.user_id == "ok"


@pytest.mark.parametrize("headers,ok", [
    ({"authorization": f"Bearer {GATE_KEY}", "x-user-id": "lc-1", "x-user-email": "z@z.z"}, True),
    ({"x-api-key": GATE_KEY, "x-user-id": "lc-2"}, True),
    ({"authorization": f"Bearer {GATE_KEY}x", "x-user-id": "lc-1"}, False),
    ({"authorization": f"Bearer {GATE_KEY}"}, False),
    ({"authorization": f"Bearer {GATE_KEY}", "x-user-id": "{{LIBRECHAT_USER_ID}}"}, False),
    ({"authorization": f"Bearer {GATE_KEY}", "x-user-id": "a\nb"}, False),
    ({"authorization": f"Bearer {GATE_KEY}", "x-user-id": "x" * 300}, False),
    ({"authorization": f"Bearer {GATE_KEY}", "x-user-id": "ok", "x-user-email": "{{LIBRECHAT_USER_EMAIL}}"},
     False),
    ({"x-user-id": "lc-1"}, False),
])
async def test_trusted_headers_need_the_gateway_key(headers: dict[str, str], ok: bool) -> None:
    auth = Authenticator(settings(identity_mode="trusted-headers"))
    if ok:
        ident = await auth.authenticate(headers)
        assert ident.via == "trusted-headers" and ident.user_id.startswith("lc-")
    else:
        with pytest.raises(IdentityError):
            await auth.authenticate(headers)


async def test_modes_do_not_leak_into_each_other() -> None:
    trusted = {"authorization": f"Bearer {GATE_KEY}", "x-user-id": "lc-1"}
    with pytest.raises(IdentityError, match="missing token"):
        await Authenticator(settings(identity_mode="jwt")).authenticate(trusted)
    token = hs({"id": "jwt-user", "exp": now() + 60})
    with pytest.raises(IdentityError):  # trusted-headers mode never reads a JWT
        await Authenticator(settings(identity_mode="trusted-headers")).authenticate(bearer(token))
    assert (await Authenticator(settings()).authenticate(trusted)).user_id == "lc-1"


async def test_no_gate_key_configured_refuses_trusted_headers() -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET, gate_key=""))
    with pytest.raises(IdentityError):
        await auth.authenticate({"authorization": "Bearer ", "x-user-id": "u"})


async def test_custom_jwt_header() -> None:
    auth = Authenticator(settings(jwt_header="x-librechat-token"))
    ident = await auth.authenticate({"x-librechat-token": hs({"id": "h", "exp": now() + 60})})
    assert ident.user_id == "h"


async def test_unreachable_jwks_is_401_not_crash() -> None:
    auth = Authenticator(settings(jwks_url="http://127.0.0.1:1/jwks.json"))
    token = jwt.encode({"sub": "x", "exp": now() + 60}, RSA_KEY, algorithm="RS256", headers={"kid": "rsa-1"})
    with pytest.raises(IdentityError, match="unknown signing key"):
        await auth.authenticate(bearer(token))


def test_identity_from_claims_ignores_non_string_extras() -> None:
    ident = identity_from_claims({"id": "u", "email": 5, "name": ["x"]})
    assert (ident.email, ident.name) == (None, None)


async def test_verified_tokens_are_cached_until_they_expire(monkeypatch) -> None:
    auth = Authenticator(settings())
    token = hs({"id": "cached", "exp": now() + 30})
    first = await auth.authenticate(bearer(token))
    calls = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    assert await auth.authenticate(bearer(token)) == first and calls == []  # no second verification
    other = hs({"id": "other", "exp": now() + 30})
    assert (await auth.authenticate(bearer(other))).user_id == "other" and calls == [1]


def test_verified_cache_never_outlives_the_token(monkeypatch) -> None:
    from extproc.identity import Identity, VerifiedCache

    cache = VerifiedCache(ttl=60)
    cache.put("short", Identity("u"), time.time() + 5)
    cache.put("long", Identity("v"), time.time() + 3600)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 10)
    assert cache.get("short") is None and cache.get("long") is not None
    monkeypatch.setattr(time, "time", lambda: real_time() + 61)
    assert cache.get("long") is None  # at most ttl, whatever the token's exp


def test_verified_cache_is_bounded() -> None:
    from extproc.identity import Identity, VerifiedCache

    cache = VerifiedCache(max_entries=3)
    for i in range(5):
        cache.put(f"t{i}", Identity(f"u{i}"), time.time() + 60)
    assert cache.get("t4") is not None and cache.get("t0") is None
