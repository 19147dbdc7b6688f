"""Credit purchases with Stripe (issue #7): packs, checkout against a local fake of Stripe's API
(the real ``stripe`` library pointed at it), the signed webhook (signatures made with the
library's own helper), exactly-once fulfilment and refunds whatever the order of delivery, the
/me button, and billing off = nothing shows."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from support.gate import CHAT, open_account, spend
from support.stripe_api import SECRET_KEY, WEBHOOK_SECRET, FakeStripe, checkout_session, event, refunded_charge, signed
from support.web import admin_browser, api, base, csrf_of
from yarl import URL

from extproc.app import Service
from extproc.formats import format_price
from extproc.i18n import catalogue
from extproc.identity import mint_token
from extproc.ledger import Ledger, utcnow
from extproc.metrics import Metrics
from extproc.purchases import checkout_idempotency_key, parse_packs
from extproc.settings import Settings
from extproc.web.sessions import ME_COOKIE, Signer, new_session, open_session, session_cookie
from extproc_dev import devstack

WEBHOOK = "/api/billing/stripe/webhook"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    fake = FakeStripe()
    await fake.start()
    yield fake
    await fake.stop()


def billing_settings(settings: Settings, fake: FakeStripe, port: int) -> Settings:
    return settings.replace(stripe_secret_key=SECRET_KEY, stripe_webhook_secret=WEBHOOK_SECRET,
                            stripe_api_base=fake.url, http_port=port, public_url=f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
async def billing_service(settings: Settings, fake_stripe: FakeStripe) -> AsyncIterator[Service]:
    svc = Service(billing_settings(settings, fake_stripe, devstack.free_port()))
    await svc.start()
    yield svc
    await svc.stop(grace=1)


@pytest.fixture(scope="module")
def billing_envoy(tmp_path_factory: pytest.TempPathFactory, billing_service: Service,
                  upstream: Any) -> Iterator[devstack.Envoy]:
    proxy = devstack.Envoy(tmp_path_factory.mktemp("billing-envoy"), upstream=("127.0.0.1", upstream.port),
                           extproc=[("127.0.0.1", billing_service.grpc_port)],
                           http=("127.0.0.1", billing_service.http_port))
    proxy.start()
    yield proxy
    proxy.stop()


async def deliver(http: aiohttp.ClientSession, url: str, body: dict[str, Any], **sign: Any) -> tuple[int, Any]:
    raw, headers = signed(body, **sign)
    return await post_raw(http, url + WEBHOOK, raw, headers)


async def post_raw(http: aiohttp.ClientSession, url: str, raw: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with http.post(url, data=raw, headers=headers) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text.startswith("{") else text


async def balance(svc: Service, user: str) -> tuple[int, int, str]:
    assert svc.ledger is not None
    account = await svc.ledger.account(user)
    assert account is not None
    return account.balance, account.credits, account.state


async def entries(svc: Service, user: str, kind: str) -> list[dict[str, Any]]:
    assert svc.pool is not None
    rows = await svc.pool.fetch(
        "SELECT kind, tokens, actor, idempotency_key, reason FROM ledger_entries WHERE user_id = $1 AND kind = $2"
        " ORDER BY id", user, kind)
    return [dict(r) for r in rows]


async def metric(http: aiohttp.ClientSession, svc: Service, sample: str) -> float:
    async with http.get(base(svc) + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return 0.0


async def me_client(svc: Service, user: str) -> aiohttp.ClientSession:
    """A browser signed in to /me as ``user`` (the cookie and session row the e-mailed link
    would give)."""
    client = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    session = new_session(user, 3600, "test")
    await open_session(svc.pool, "me", session, source_ip=None, user_agent=None, now=svc.clock())
    cookie = session_cookie(Signer(svc.settings), "me", session)
    client.cookie_jar.update_cookies({ME_COOKIE: cookie}, response_url=URL(base(svc) + "/me"))
    return client


def chat() -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "oi"}]}


# ---------------------------------------------------------------- configuration


def test_packs_and_prices():
    assert [p.as_json() for p in parse_packs(Settings().credit_packs)] == [
        {"id": "small", "tokens": 100_000, "price": 2990, "currency": "brl"},
        {"id": "medium", "tokens": 500_000, "price": 12990, "currency": "brl"}]
    assert parse_packs(" big:1:50:USD , ")[0].currency == "usd"
    for bad in ("", "a:1:2", "A:1:2:brl", "a:0:2:brl", "a:1:-2:brl", "a:1:2:reais", "a:1:2:brl,a:3:4:brl",
                "a:1e3:2:brl", "a:١:2:brl"):
        with pytest.raises(ValueError, match="GATE_CREDIT_PACKS"):
            parse_packs(bad)
    assert format_price(2990, "brl", "pt-BR") == "R$ 29,90"
    assert format_price(1299000, "usd", "en") == "US$ 12,990.00"
    assert format_price(500, "jpy", "en") == "JPY 500"


def test_openapi_documents_the_billing_routes():
    from extproc import purchases as billing

    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml").read_text())
    documented = {(m, p) for p, item in spec["paths"].items() for m in item if p.startswith("/api/billing")}
    assert documented == {("get", "/api/billing/packs"), ("post", "/api/billing/checkout"),
                          ("post", WEBHOOK)}
    assert billing.__doc__ and "exactly once" in billing.__doc__


async def test_billing_routes_are_the_documented_ones(billing_service):
    assert billing_service.http_runner is not None
    served = {(r.method.lower(), r.resource.canonical) for r in billing_service.http_runner.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/api/billing")
              and r.method in ("GET", "POST")}
    assert served == {("get", "/api/billing/packs"), ("post", "/api/billing/checkout"), ("post", WEBHOOK)}


# ---------------------------------------------------------------- billing off


async def test_billing_off_nothing_shows(http, envoy, service, settings, auth, user):
    """No Stripe keys (the shared test service): the routes do not exist, /me has no button and
    the 402 points to the administrator, not to a purchase page."""
    await open_account(service, user)
    for method, path in (("GET", "/api/billing/packs"), ("POST", "/api/billing/checkout"), ("POST", WEBHOOK),
                         ("POST", "/me/billing/checkout")):
        async with http.request(method, envoy.url + path, json={"pack": "small"},
                                headers={"authorization": f"Bearer {mint_token(settings, user)}"}) as resp:
            assert resp.status == 404, (method, path)
    raw, headers = signed(event("checkout.session.completed", checkout_session(user)))
    assert (await post_raw(http, envoy.url + WEBHOOK, raw, headers))[0] == 404
    assert await balance(service, user) == (100_000, 0, "active")
    async with await me_client(service, user) as browser, browser.get(base(service) + "/me") as resp:
        page = await resp.text()
        assert resp.status == 200 and user in page
        assert "billing/checkout" not in page and "Comprar créditos" not in page
        assert "checkout.stripe.com" not in resp.headers["Content-Security-Policy"]
    await service.ledger.grant(user, -99_950, actor="test", reason="drain", kind="adjustment")
    async with http.post(envoy.url + CHAT, json=chat(), headers=auth(user)) as resp:
        assert resp.status == 402
        message = (await resp.json())["error"]["message"]
    assert "/me" not in message and "Fale com o administrador" in message


# ---------------------------------------------------------------- packs and checkout


async def test_packs_are_listed_through_envoy(http, billing_envoy):
    status, body = await api(http, billing_envoy.url + "/api/billing/packs")
    assert status == 200
    assert body == {"packs": [{"id": "small", "tokens": 100_000, "price": 2990, "currency": "brl"},
                              {"id": "medium", "tokens": 500_000, "price": 12990, "currency": "brl"}]}


async def test_checkout_sends_stripe_the_exact_parameters(http, billing_envoy, billing_service, fake_stripe, settings):
    user = f"ana/ü {uuid.uuid4().hex[:8]}"  # any text is a user id: it must survive the form encoding
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    await open_account(billing_service, user, email=email)
    token = mint_token(settings, user)
    public = billing_service.settings.public_url
    before = time.time()
    status, body = await api(http, billing_envoy.url + "/api/billing/checkout", "POST", token, {"pack": "small"})
    after = time.time()
    assert status == 200, body
    sent = fake_stripe.sessions()[-1]
    assert body == {"id": body["id"], "url": f"{fake_stripe.url}/c/pay/{body['id']}",
                    "pack": {"id": "small", "tokens": 100_000, "price": 2990, "currency": "brl"}}
    assert sent.params == {
        "mode": "payment",
        "line_items[0][price_data][currency]": "brl",
        "line_items[0][price_data][unit_amount]": "2990",
        "line_items[0][price_data][product_data][name]": "Solaris: 100.000 tokens",
        "line_items[0][quantity]": "1",
        "success_url": f"{public}/me?purchase=success",
        "cancel_url": f"{public}/me?purchase=cancelled",
        "client_reference_id": user,
        "metadata[user_id]": user, "metadata[pack]": "small", "metadata[tokens]": "100000",
        "payment_intent_data[metadata][user_id]": user, "payment_intent_data[metadata][pack]": "small",
        "payment_intent_data[metadata][tokens]": "100000",
        "locale": "pt-BR",
        "customer_email": email,
    }
    assert sent.headers["Authorization"] == f"Bearer {SECRET_KEY}"
    expected_keys = {checkout_idempotency_key(user, "small", None, t) for t in (before, after)}
    assert sent.headers["Idempotency-Key"] in expected_keys
    assert sent.headers["Idempotency-Key"].startswith("solaris-checkout-")

    # a double click: the same key, so Stripe answers the same session
    status, again = await api(http, billing_envoy.url + "/api/billing/checkout", "POST", token, {"pack": "small"})
    if time.time() // 60 == before // 60:  # (unless the minute turned in between)
        assert again["id"] == body["id"]
        assert fake_stripe.sessions()[-1].headers["Idempotency-Key"] == sent.headers["Idempotency-Key"]

    # a client-supplied Idempotency-Key decides instead, per user; reused for another pack: 409
    async with http.post(billing_envoy.url + "/api/billing/checkout", json={"pack": "medium"},
                         headers={"authorization": f"Bearer {token}", "Idempotency-Key": "order-1"}) as resp:
        assert resp.status == 200
        medium = await resp.json()
    assert fake_stripe.sessions()[-1].headers["Idempotency-Key"] == checkout_idempotency_key(user, "x", "order-1", 0)
    assert fake_stripe.sessions()[-1].params["line_items[0][price_data][unit_amount]"] == "12990"
    async with http.post(billing_envoy.url + "/api/billing/checkout", json={"pack": "medium"},
                         headers={"authorization": f"Bearer {token}", "Idempotency-Key": "order-1"}) as resp:
        assert resp.status == 200 and (await resp.json())["id"] == medium["id"]
    async with http.post(billing_envoy.url + "/api/billing/checkout", json={"pack": "small"},
                         headers={"authorization": f"Bearer {token}", "Idempotency-Key": "order-1"}) as resp:
        assert resp.status == 409 and (await resp.json())["error"]["code"] == "idempotency_conflict"
    async with http.post(billing_envoy.url + "/api/billing/checkout", json={"pack": "small"},
                         headers={"authorization": f"Bearer {token}", "Idempotency-Key": "x" * 201}) as resp:
        assert resp.status == 400
    assert await balance(billing_service, user) == (100_000, 0, "active")  # checkout alone credits nothing


async def test_checkout_refusals(http, billing_service, fake_stripe, settings, user):
    url = base(billing_service) + "/api/billing/checkout"
    await open_account(billing_service, user)
    token = mint_token(settings, user)
    sent = len(fake_stripe.requests)
    status, body = await api(http, url, "POST", token, {"pack": "huge"})
    assert status == 400 and body["error"]["fields"]["pack"]["code"] == "unknown_pack"
    assert (await api(http, url, "POST", token, [1]))[0] == 400
    assert (await api(http, url, "POST", token, raw=b"{not json"))[0] == 400
    assert (await api(http, url, "POST", token, {"pack": ["small"]}))[0] == 400
    assert (await api(http, url, "POST", None, {"pack": "small"}))[0] == 401
    assert (await api(http, url, "POST", settings.admin_token, {"pack": "small"}))[0] == 401
    forged = mint_token(settings.replace(jwt_secret="x" * 40), user)
    assert (await api(http, url, "POST", forged, {"pack": "small"}))[0] == 401
    status, body = await api(http, url, "POST", mint_token(settings, f"nobody-{uuid.uuid4().hex}"), {"pack": "small"})
    assert status == 404 and body["error"]["code"] == "no_account"
    assert len(fake_stripe.requests) == sent  # none of those reached Stripe
    fake_stripe.fail_with = 500
    status, body = await api(http, url, "POST", token, {"pack": "small"})
    assert status == 502 and body["error"]["code"] == "payment_provider_error"
    await billing_service.ledger.set_suspended(user, True, actor="test", reason="abuse")
    status, body = await api(http, url, "POST", token, {"pack": "small"})
    assert status == 403 and body["error"]["code"] == "account_suspended"


async def test_me_buy_button_posts_with_csrf_and_redirects_to_stripe(billing_service, fake_stripe, user):
    await open_account(billing_service, user)
    async with await me_client(billing_service, user) as browser:
        async with browser.get(base(billing_service) + "/me") as resp:
            page = await resp.text()
            csp = resp.headers["Content-Security-Policy"]
        assert resp.status == 200 and "Comprar créditos" in page
        assert page.count('action="/me/billing/checkout"') == 2
        assert "R$ 29,90" in page and "R$ 129,90" in page and 'name="pack" value="medium"' in page
        assert "form-action 'self' https://checkout.stripe.com" in csp and "default-src 'none'" in csp
        async with browser.get(base(billing_service) + "/me?purchase=success") as resp:
            assert "Pagamento enviado" in await resp.text()
        async with browser.get(base(billing_service) + "/me?purchase=cancelled") as resp:
            assert "Compra cancelada" in await resp.text()
        # the offer speaks the page's language (here the browser's), prices included
        async with browser.get(base(billing_service) + "/me?purchase=success",
                               headers={"accept-language": "en"}) as resp:
            page = await resp.text()
        assert "Buy credits" in page and "R$ 29.90" in page and "Payment sent." in page

        async with browser.post(base(billing_service) + "/me/billing/checkout", allow_redirects=False,
                                data={"csrf": csrf_of(page), "pack": "medium"}) as resp:
            assert resp.status == 303
            location = resp.headers["Location"]
        sent = fake_stripe.sessions()[-1]
        assert location == f"{fake_stripe.url}/c/pay/" + location.rsplit("/", 1)[1]
        assert (sent.params["metadata[user_id]"], sent.params["metadata[pack]"]) == (user, "medium")
        count = len(fake_stripe.requests)
        async with browser.post(base(billing_service) + "/me/billing/checkout",
                                data={"csrf": "forged", "pack": "medium"}) as resp:
            assert resp.status == 403
        async with browser.post(base(billing_service) + "/me/billing/checkout",
                                data={"csrf": csrf_of(page), "pack": "nope"}) as resp:
            assert resp.status == 400 and "Pacote de créditos desconhecido" in await resp.text()
        assert len(fake_stripe.requests) == count
    async with aiohttp.ClientSession() as stranger:
        async with stranger.post(base(billing_service) + "/me/billing/checkout",
                                 data={"csrf": csrf_of(page), "pack": "small"}) as resp:
            assert resp.status == 401


# ---------------------------------------------------------------- the webhook: fulfilment


async def test_paid_checkout_credits_once_through_envoy(http, billing_envoy, billing_service, settings, user):
    await open_account(billing_service, user, email=f"{user}@example.com")
    session = checkout_session(user)
    completed = event("checkout.session.completed", session)
    fulfilled_before = await metric(http, billing_service, 'solaris_purchases_total{event="fulfilled"}')

    status, body = await deliver(http, billing_envoy.url, completed)
    assert (status, body) == (200, {"received": True, "outcome": "fulfilled"})
    assert await balance(billing_service, user) == (200_000, 100_000, "active")
    raw, headers = signed(completed)
    for _ in range(3):  # Stripe redelivers the very same event
        assert await post_raw(http, billing_envoy.url + WEBHOOK, raw, headers) == (
            200, {"received": True, "outcome": "duplicate"})
    # another event of the same session (Stripe also sends async_payment_succeeded): no second credit
    status, body = await deliver(http, billing_envoy.url, event("checkout.session.async_payment_succeeded", session))
    assert body["outcome"] == "already_fulfilled"
    assert await balance(billing_service, user) == (200_000, 100_000, "active")

    purchases = await entries(billing_service, user, "purchase")
    assert len(purchases) == 1
    assert purchases[0]["tokens"] == 100_000 and purchases[0]["actor"] == "stripe"
    assert purchases[0]["idempotency_key"] == f"stripe:checkout:{session['id']}"
    assert "pacote small" in purchases[0]["reason"] and "R$ 29,90" in purchases[0]["reason"]
    row = await billing_service.pool.fetchrow("SELECT * FROM stripe_events WHERE event_id = $1", completed["id"])
    assert (row["type"], row["outcome"], row["object_id"]) == ("checkout.session.completed", "fulfilled",
                                                               session["id"])
    assert await metric(http, billing_service, 'solaris_purchases_total{event="fulfilled"}') == fulfilled_before + 1
    assert await metric(http, billing_service, 'solaris_purchase_tokens_total{kind="purchase"}') >= 100_000

    # the statement, the admin's user view and the audit trail show it
    status, body = await api(http, base(billing_service) + f"/api/admin/users/{user}/entries",
                             token=settings.admin_token)
    newest = body["entries"][0]
    assert (newest["kind"], newest["tokens"], newest["actor"]) == ("purchase", 100_000, "stripe")
    status, body = await api(http, base(billing_service) + f"/api/admin/audit?target={user}",
                             token=settings.admin_token)
    assert [(a["actor"], a["action"]) for a in body["entries"]] == [("stripe", "purchase")]
    assert body["entries"][0]["after"]["credits"] == 100_000
    admin = await admin_browser(billing_service, settings)
    async with admin, admin.get(base(billing_service) + f"/admin/users/{user}") as resp:
        page = await resp.text()
    assert "Compra" in page and "stripe" in page and "+100.000" in page
    async with await me_client(billing_service, user) as browser, browser.get(base(billing_service) + "/me") as resp:
        page = await resp.text()
    assert "Compra" in page and "+100.000" in page
    assert await billing_service.ledger.reconcile() == []


async def test_concurrent_redeliveries_credit_once(http, billing_service, user):
    await open_account(billing_service, user)
    session = checkout_session(user, pack="medium", tokens=500_000, amount=12990)
    completed = event("checkout.session.completed", session)
    others = [event("checkout.session.completed", session) for _ in range(3)]
    raw, headers = signed(completed)
    results = await asyncio.gather(
        *(post_raw(http, base(billing_service) + WEBHOOK, raw, headers) for _ in range(8)),
        *(deliver(http, base(billing_service), e) for e in others))
    assert all(status == 200 for status, _ in results)
    outcomes = [body["outcome"] for _, body in results]
    assert outcomes.count("fulfilled") == 1, outcomes
    assert set(outcomes) <= {"fulfilled", "already_fulfilled", "duplicate"}
    assert [e["tokens"] for e in await entries(billing_service, user, "purchase")] == [500_000]
    assert await balance(billing_service, user) == (600_000, 500_000, "active")
    assert await billing_service.ledger.reconcile() == []


async def test_async_payment_in_any_order(http, billing_service, user):
    """Boleto/Pix: completed arrives unpaid, async_payment_succeeded pays; Stripe may deliver
    them in either order, and the unpaid one alone credits nothing."""
    url = base(billing_service)
    await open_account(billing_service, user)
    unpaid_only = checkout_session(user, paid=False)
    assert (await deliver(http, url, event("checkout.session.completed", unpaid_only)))[1]["outcome"] == (
        "awaiting_payment")
    assert await balance(billing_service, user) == (100_000, 0, "active")

    session = checkout_session(user, paid=False)
    succeeded = event("checkout.session.async_payment_succeeded", {**session, "payment_status": "paid"})
    assert (await deliver(http, url, succeeded))[1]["outcome"] == "fulfilled"
    assert (await deliver(http, url, event("checkout.session.completed", session)))[1]["outcome"] == (
        "awaiting_payment")
    assert (await deliver(http, url, event("checkout.session.completed", {**session, "payment_status": "paid"})))[1][
        "outcome"] == "already_fulfilled"
    assert [e["tokens"] for e in await entries(billing_service, user, "purchase")] == [100_000]
    assert await balance(billing_service, user) == (200_000, 100_000, "active")


async def test_signatures_are_checked_on_the_raw_body(http, billing_envoy, billing_service, user):
    await open_account(billing_service, user)
    completed = event("checkout.session.completed", checkout_session(user))
    url = billing_envoy.url + WEBHOOK
    raw, headers = signed(completed)
    tampered = raw.replace(b'"100000"', b'"900000"')
    assert tampered != raw
    old_raw, old_headers = signed(completed, timestamp=int(time.time()) - 301)
    wrong_raw, wrong_headers = signed(completed, secret="whsec_not_ours")
    _, other_headers = signed(event("checkout.session.completed", checkout_session(user)))
    cases = [
        ("tampered body", tampered, headers),
        ("wrong secret", wrong_raw, wrong_headers),
        ("too old", old_raw, old_headers),
        ("no header", raw, {"Content-Type": "application/json"}),
        ("garbage header", raw, {"Stripe-Signature": "t=abc,v1=zz"}),
        ("no v1", raw, {"Stripe-Signature": headers["Stripe-Signature"].split(",")[0]}),
        ("another body's signature", raw, other_headers),
        ("re-serialized body", json.dumps(json.loads(raw)).encode(), headers),
        ("not UTF-8", b"\xff" + raw, headers),
    ]
    for name, body, hdrs in cases:
        status, answer = await post_raw(http, url, body, hdrs)
        assert status == 400, name
        assert answer["error"]["code"] == "invalid_signature", name
    signed_garbage = signed("not json")
    assert (await post_raw(http, url, *signed_garbage))[0] == 400
    assert await billing_service.pool.fetchval(
        "SELECT count(*) FROM stripe_events WHERE event_id = $1", completed["id"]) == 0
    assert await balance(billing_service, user) == (100_000, 0, "active")
    assert await metric(http, billing_service, 'solaris_purchases_total{event="rejected"}') >= len(cases)
    # the genuine one still works afterwards
    assert (await post_raw(http, url, raw, headers))[1]["outcome"] == "fulfilled"


async def test_events_not_for_us(http, billing_service, user):
    url = base(billing_service)
    await open_account(billing_service, user)
    unknown = event("customer.created", {"id": "cus_123", "object": "customer"})
    assert await deliver(http, url, unknown) == (200, {"received": True, "outcome": "ignored"})
    assert await billing_service.pool.fetchval(
        "SELECT outcome FROM stripe_events WHERE event_id = $1", unknown["id"]) == "ignored"
    foreign = {**checkout_session(user), "metadata": {}, "client_reference_id": None}
    assert (await deliver(http, url, event("checkout.session.completed", foreign)))[1]["outcome"] == "not_ours"
    inconsistent = checkout_session(user)
    inconsistent["metadata"]["tokens"] = "lots"
    assert (await deliver(http, url, event("checkout.session.completed", inconsistent)))[1]["outcome"] == "invalid"
    other_user = {**checkout_session(user), "client_reference_id": "someone-else"}
    assert (await deliver(http, url, event("checkout.session.completed", other_user)))[1]["outcome"] == "invalid"
    no_intent = refunded_charge(None, amount=2990, refunded=2990)
    assert (await deliver(http, url, event("charge.refunded", no_intent)))[1]["outcome"] == "not_ours"
    assert await balance(billing_service, user) == (100_000, 0, "active")

    ghost = f"ghost-{uuid.uuid4().hex}"  # paid, but the user has no account: recorded, not created
    ghost_event = event("checkout.session.completed", checkout_session(ghost))
    assert (await deliver(http, url, ghost_event))[1]["outcome"] == "unknown_user"
    assert await billing_service.ledger.account(ghost) is None
    assert await billing_service.pool.fetchval(
        "SELECT outcome FROM stripe_events WHERE event_id = $1", ghost_event["id"]) == "unknown_user"
    assert await billing_service.pool.fetchval(
        "SELECT tokens FROM billing_payments WHERE user_id = $1", ghost) == 100_000



# ---------------------------------------------------------------- the buyer erased (LGPD)


async def test_purchases_after_the_buyers_erasure_stay_under_the_pseudonym(http, billing_service, user):
    """The erasure renames the account and its payments, but Stripe's sessions still name the
    erased id in their metadata. Another event of a purchase credited before the erasure must
    not write the id back into billing_payments (nor fail the refund that comes after); a
    boleto paid after the erasure is credited to the pseudonym, so the books still match
    Stripe's, and nothing is ever filed under the erased id again."""
    pool = billing_service.pool
    await open_account(billing_service, user, email=f"{user}@example.com")
    credited, boleto = checkout_session(user), checkout_session(user, paid=False)
    assert await outcome(http, billing_service, event("checkout.session.completed", credited)) == "fulfilled"
    assert await outcome(http, billing_service, event("checkout.session.completed", boleto)) == "awaiting_payment"
    pseudonym = await billing_service.ledger.erase(user, actor="admin", reason="LGPD")

    assert await outcome(http, billing_service,
                         event("checkout.session.async_payment_succeeded", credited)) == "already_fulfilled"
    assert await outcome(http, billing_service, event("checkout.session.async_payment_succeeded",
                                                      {**boleto, "payment_status": "paid"})) == "fulfilled"
    owners = await pool.fetch("SELECT user_id FROM billing_payments WHERE payment_intent = ANY($1::text[])",
                              [credited["payment_intent"], boleto["payment_intent"]])
    assert [r["user_id"] for r in owners] == [pseudonym, pseudonym]
    assert await pool.fetchval("SELECT count(*) FROM billing_payments WHERE user_id = $1", user) == 0
    assert await billing_service.ledger.account(user) is None  # no account opened for the erased id

    refund = event("charge.refunded", refunded_charge(credited["payment_intent"], amount=2990, refunded=2990))
    assert await outcome(http, billing_service, refund) == "refunded"
    assert [e["tokens"] for e in await entries(billing_service, pseudonym, "purchase")] == [100_000, 100_000]
    assert [e["tokens"] for e in await entries(billing_service, pseudonym, "refund")] == [-100_000]
    assert await billing_service.ledger.reconcile() == []


async def test_an_erasure_between_the_look_up_and_the_grant(http, billing_service, user, monkeypatch):
    """The erasure commits after fulfilment looked the buyer up and before it wrote: the
    payment still ends up under the pseudonym, credited once, and the event is not lost as
    'unknown_user'. The erasure is run, for real, right after the first look-up."""
    ledger = billing_service.ledger
    await open_account(billing_service, user)
    look_up, erased = ledger.pseudonym_of, []

    async def erased_right_after(user_id: str) -> str | None:
        found = await look_up(user_id)
        if not erased:
            erased.append(await ledger.erase(user_id, actor="admin", reason="LGPD"))
        return found

    monkeypatch.setattr(ledger, "pseudonym_of", erased_right_after)
    session = checkout_session(user)
    assert await outcome(http, billing_service, event("checkout.session.completed", session)) == "fulfilled"
    assert await billing_service.pool.fetchval(
        "SELECT user_id FROM billing_payments WHERE payment_intent = $1", session["payment_intent"]) == erased[0]
    assert [e["tokens"] for e in await entries(billing_service, erased[0], "purchase")] == [100_000]
    assert await ledger.reconcile() == []

# ---------------------------------------------------------------- refunds


async def test_full_refund_claws_back_and_blocks(http, billing_service, user):
    url = base(billing_service)
    await open_account(billing_service, user)
    session = checkout_session(user)
    await deliver(http, url, event("checkout.session.completed", session))
    await spend(billing_service, user, 100_000, 50_000)  # the allowance and half of the purchase
    assert await balance(billing_service, user) == (50_000, 50_000, "active")
    refund = event("charge.refunded", refunded_charge(session["payment_intent"], amount=2990, refunded=2990))
    assert (await deliver(http, url, refund))[1]["outcome"] == "refunded"
    assert await balance(billing_service, user) == (-50_000, -50_000, "blocked")
    assert (await deliver(http, url, refund))[1]["outcome"] == "duplicate"
    again = event("charge.refunded", refunded_charge(session["payment_intent"], amount=2990, refunded=2990))
    assert (await deliver(http, url, again))[1]["outcome"] == "refund_recorded"
    refunds = await entries(billing_service, user, "refund")
    assert [(e["tokens"], e["actor"]) for e in refunds] == [(-100_000, "stripe")]
    assert refunds[0]["idempotency_key"] == f"stripe:refund:{session['payment_intent']}:2990"
    assert "R$ 29,90" in refunds[0]["reason"]
    _, body = await api(http, url + f"/api/admin/audit?target={user}&action=refund",
                             token=billing_service.settings.admin_token)
    assert [(a["actor"], a["after"]["state"]) for a in body["entries"]] == [("stripe", "blocked")]
    # blocked until positive again: a new purchase unblocks
    await deliver(http, url, event("checkout.session.completed",
                                   checkout_session(user, pack="medium", tokens=500_000, amount=12990)))
    assert await balance(billing_service, user) == (450_000, 450_000, "active")
    assert await billing_service.ledger.reconcile() == []


@pytest.mark.parametrize("order", ["in order", "reversed", "concurrent"])
async def test_partial_refunds_are_proportional_in_any_order(http, billing_service, user, order):
    url = base(billing_service)
    await open_account(billing_service, user)
    session = checkout_session(user, pack="medium", tokens=500_000, amount=12990)
    pi = session["payment_intent"]
    await deliver(http, url, event("checkout.session.completed", session))
    charge = f"ch_{uuid.uuid4().hex[:20]}"
    # two refunds of R$ 43,30 then the rest: Stripe reports the cumulative amount refunded
    events = [event("charge.refunded", refunded_charge(pi, amount=12990, refunded=cum, charge_id=charge))
              for cum in (4330, 8660, 12990)]
    if order == "in order":
        outcomes = [(await deliver(http, url, e))[1]["outcome"] for e in events]
        assert outcomes == ["refunded"] * 3
        assert [e["tokens"] for e in await entries(billing_service, user, "refund")] == [-166_666, -166_667, -166_667]
    elif order == "reversed":
        outcomes = [(await deliver(http, url, e))[1]["outcome"] for e in reversed(events)]
        assert outcomes == ["refunded", "refund_recorded", "refund_recorded"]
    else:
        results = await asyncio.gather(*(deliver(http, url, e) for e in events * 3))
        assert {status for status, _ in results} == {200}
    assert sum(e["tokens"] for e in await entries(billing_service, user, "refund")) == -500_000
    assert await balance(billing_service, user) == (100_000, 0, "active")
    assert await billing_service.ledger.reconcile() == []


async def test_a_partial_refund_rounds_down(http, billing_service, user):
    url = base(billing_service)
    await open_account(billing_service, user)
    session = checkout_session(user, tokens=100_000, amount=2990)
    await deliver(http, url, event("checkout.session.completed", session))
    await deliver(http, url, event("charge.refunded",
                                   refunded_charge(session["payment_intent"], amount=2990, refunded=1000)))
    assert [e["tokens"] for e in await entries(billing_service, user, "refund")] == [-33_444]  # 100000×1000/2990


async def test_refund_before_purchase_is_applied_when_the_purchase_arrives(http, billing_service, user):
    url = base(billing_service)
    await open_account(billing_service, user)
    session = checkout_session(user)
    refund = event("charge.refunded", refunded_charge(session["payment_intent"], amount=2990, refunded=1495))
    assert (await deliver(http, url, refund))[1]["outcome"] == "refund_recorded"
    assert await balance(billing_service, user) == (100_000, 0, "active")
    assert (await deliver(http, url, event("checkout.session.completed", session)))[1]["outcome"] == "fulfilled"
    assert [e["tokens"] for e in await entries(billing_service, user, "purchase")] == [100_000]
    assert [e["tokens"] for e in await entries(billing_service, user, "refund")] == [-50_000]
    assert await balance(billing_service, user) == (150_000, 50_000, "active")
    # and a purchase replayed later changes nothing
    assert (await deliver(http, url, event("checkout.session.completed", session)))[1]["outcome"] == (
        "already_fulfilled")
    assert await balance(billing_service, user) == (150_000, 50_000, "active")


# ---------------------------------------------------------------- the 402 and outages


async def test_402_through_envoy_links_to_the_purchase_page(http, billing_envoy, billing_service, auth, user):
    async with http.post(billing_envoy.url + CHAT, json={**chat(), "max_tokens": 5}, headers=auth(user)) as resp:
        assert resp.status == 200
    await billing_service.ledger.grant(user, -99_950, actor="test", reason="drain", kind="adjustment")
    async with http.post(billing_envoy.url + CHAT, json=chat(), headers=auth(user)) as resp:
        assert resp.status == 402
        error = (await resp.json())["error"]
    assert error["code"] == "quota_exceeded"
    assert error["message"].endswith(f"Compre mais créditos em {billing_service.settings.public_url}/me.")


async def test_webhook_answers_503_when_the_ledger_is_down(settings, fake_stripe, user):
    """Stripe retries anything but 2xx: a ledger outage must not be acknowledged."""
    from aiohttp.test_utils import TestClient, TestServer

    from extproc.web import build_app

    class DownPool:
        async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionRefusedError("database is down")

        fetch = fetchrow = execute = fetchval

    class DownService:
        def __init__(self) -> None:
            self.settings = billing_settings(settings, fake_stripe, 0)
            self.pool = DownPool()
            self.ledger = Ledger(self.pool, self.settings)  # type: ignore[arg-type]
            self.metrics = Metrics()
            self.clock = utcnow

    sent = len(fake_stripe.requests)
    async with TestClient(TestServer(build_app(DownService()))) as client:
        raw, headers = signed(event("checkout.session.completed", checkout_session(user)))
        resp = await client.post(WEBHOOK, data=raw, headers=headers)
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "ledger_unavailable"
        resp = await client.post("/api/billing/checkout", json={"pack": "small"},
                                 headers={"authorization": f"Bearer {mint_token(settings, user)}"})
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"
    assert len(fake_stripe.requests) == sent


async def test_a_burst_of_refund_deliveries_never_exhausts_the_pool(http, billing_service, user):
    """More simultaneous deliveries for one payment than the pool has connections: every one
    is answered and the clawback is still exactly the refunded share."""
    url = base(billing_service)
    await open_account(billing_service, user)
    session = checkout_session(user, pack="medium", tokens=500_000, amount=12990)
    await deliver(http, url, event("checkout.session.completed", session))
    charge = f"ch_{uuid.uuid4().hex[:20]}"
    burst = [event("charge.refunded", refunded_charge(session["payment_intent"], amount=12990,
                                                      refunded=4330 * (1 + i % 3), charge_id=charge))
             for i in range(60)]
    results = await asyncio.wait_for(asyncio.gather(*(deliver(http, url, e) for e in burst)), 30)
    assert {status for status, _ in results} == {200}
    assert sum(e["tokens"] for e in await entries(billing_service, user, "refund")) == -500_000
    assert await billing_service.ledger.reconcile() == []


# ---------------------------------------------------------------- disputes (chargebacks)


def dispute_of(payment_intent: str | None, *, status: str = "needs_response", dispute_id: str | None = None,
               amount: int = 2990) -> dict[str, Any]:
    """A Dispute object as Stripe puts it in every charge.dispute.* event."""
    return {"id": dispute_id or f"dp_{uuid.uuid4().hex[:24]}", "object": "dispute", "amount": amount,
            "currency": "brl", "charge": f"ch_{uuid.uuid4().hex[:24]}", "payment_intent": payment_intent,
            "status": status, "reason": "fraudulent", "is_charge_refundable": False, "metadata": {}}


async def disputable_purchase(service, user: str, **pack: object) -> tuple[str, dict, str, str]:
    """An account and a checkout session for it (not yet delivered): the webhook URL, the
    session, its payment intent and a fresh dispute id."""
    await open_account(service, user)
    session = checkout_session(user, **pack)
    return base(service), session, session["payment_intent"], f"dp_{uuid.uuid4().hex[:24]}"


def dispute_event(kind: str, payment_intent: str | None, dispute_id: str, status: str,
                  created: int | None = None, **kwargs: Any) -> dict[str, Any]:
    body = event(f"charge.dispute.{kind}", dispute_of(payment_intent, status=status, dispute_id=dispute_id, **kwargs))
    if created is not None:
        body["created"] = created
    return body


async def outcome(http: aiohttp.ClientSession, svc: Service, body: dict[str, Any]) -> str:
    status, answer = await deliver(http, base(svc), body)
    assert status == 200, answer
    return str(answer["outcome"])


async def clawbacks(svc: Service, user: str) -> list[tuple[str, int, str]]:
    """(kind, tokens, key) of every refund and dispute entry of ``user``, oldest first."""
    assert svc.pool is not None
    rows = await svc.pool.fetch(
        "SELECT kind, tokens, idempotency_key FROM ledger_entries WHERE user_id = $1"
        " AND (idempotency_key LIKE 'stripe:refund:%' OR idempotency_key LIKE 'stripe:dispute:%') ORDER BY id", user)
    return [(r["kind"], r["tokens"], r["idempotency_key"]) for r in rows]


def test_dispute_texts_exist_in_both_languages():
    pt, en = catalogue().section("pt-BR", "reason"), catalogue().section("en", "reason")
    assert set(pt) == set(en)
    assert "Contestação" in pt["dispute"] and "dispute" in en["dispute"]


async def test_dispute_claws_back_the_pack_blocks_and_402(http, billing_envoy, billing_service, settings, auth, user):
    """Buy, spend, dispute the card charge: the whole pack is taken back once (balance
    negative -> blocked -> 402), however many events Stripe sends about the dispute."""
    url, session, pi, dp = await disputable_purchase(billing_service, user)
    assert await outcome(http, billing_service, event("checkout.session.completed", session)) == "fulfilled"
    await spend(billing_service, user, 100_000, 50_000)  # the allowance and half of the purchase
    assert await balance(billing_service, user) == (50_000, 50_000, "active")

    created = dispute_event("created", pi, dp, "needs_response")
    assert await outcome(http, billing_service, created) == "dispute_clawed_back"
    assert await balance(billing_service, user) == (-50_000, -50_000, "blocked")
    assert await clawbacks(billing_service, user) == [("refund", -100_000, f"stripe:dispute:{pi}:1:{dp}")]
    [entry] = await entries(billing_service, user, "refund")
    assert entry["actor"] == "stripe"
    assert "Contestação (chargeback) de R$ 29,90" in entry["reason"] and dp in entry["reason"] and pi in entry["reason"]

    # the same event again, and every other event Stripe sends about this dispute: nothing more
    assert await outcome(http, billing_service, created) == "duplicate"
    for kind, status in (("funds_withdrawn", "needs_response"), ("updated", "under_review"),
                         ("closed", "lost")):
        assert await outcome(http, billing_service, dispute_event(kind, pi, dp, status)) == "dispute_recorded"
    assert await balance(billing_service, user) == (-50_000, -50_000, "blocked")
    assert len(await clawbacks(billing_service, user)) == 1
    row = await billing_service.pool.fetchrow("SELECT * FROM stripe_events WHERE event_id = $1", created["id"])
    assert (row["type"], row["outcome"], row["object_id"]) == ("charge.dispute.created", "dispute_clawed_back", dp)
    assert await billing_service.pool.fetchval(
        "SELECT status FROM billing_disputes WHERE dispute_id = $1", dp) == "lost"

    # the audit trail says who and why; the gate refuses the next request
    _, body = await api(http, url + f"/api/admin/audit?target={user}&action=refund", token=settings.admin_token)
    assert [(a["actor"], a["after"]["state"]) for a in body["entries"]] == [("stripe", "blocked")]
    assert "Contestação" in body["entries"][0]["reason"]
    async with http.post(billing_envoy.url + CHAT, json=chat(), headers=auth(user)) as resp:
        assert resp.status == 402
    assert await metric(http, billing_service, 'solaris_purchase_tokens_total{kind="dispute"}') >= 100_000
    assert await billing_service.ledger.reconcile() == []


async def test_dispute_won_gives_the_credits_back_once(http, billing_service, settings, user):
    url, session, pi, dp = await disputable_purchase(billing_service, user, pack="medium", tokens=500_000, amount=12990)
    await deliver(http, url, event("checkout.session.completed", session))
    now = int(time.time())
    opened = dispute_event("created", pi, dp, "needs_response", created=now - 100, amount=12990)
    assert await outcome(http, billing_service, opened) == "dispute_clawed_back"
    assert await balance(billing_service, user) == (100_000, 0, "active")

    won = dispute_event("closed", pi, dp, "won", created=now, amount=12990)
    assert await outcome(http, billing_service, won) == "dispute_reinstated"
    assert await balance(billing_service, user) == (600_000, 500_000, "active")
    assert await outcome(http, billing_service, won) == "duplicate"
    assert await outcome(http, billing_service, dispute_event("funds_reinstated", pi, dp, "won", created=now)) == (
        "dispute_recorded")
    # an older event delivered late does not reopen the dispute
    late = dispute_event("updated", pi, dp, "under_review", created=now - 50, amount=12990)
    assert await outcome(http, billing_service, late) == "dispute_recorded"
    assert await billing_service.pool.fetchval("SELECT status FROM billing_disputes WHERE dispute_id = $1", dp) == "won"
    assert await balance(billing_service, user) == (600_000, 500_000, "active")
    assert await clawbacks(billing_service, user) == [("refund", -500_000, f"stripe:dispute:{pi}:1:{dp}"),
                                                      ("adjustment", 500_000, f"stripe:dispute:{pi}:2:{dp}")]
    [back] = await entries(billing_service, user, "adjustment")
    assert back["actor"] == "stripe" and "Contestação encerrada (won)" in back["reason"]
    _, body = await api(http, url + f"/api/admin/audit?target={user}", token=settings.admin_token)
    assert [a["action"] for a in reversed(body["entries"])] == ["purchase", "refund", "adjustment"]
    assert await billing_service.pool.fetchval(
        "SELECT outcome FROM stripe_events WHERE event_id = $1", won["id"]) == "dispute_reinstated"
    assert await billing_service.ledger.reconcile() == []


async def test_dispute_statuses(http, billing_service, user):
    """Inquiries claw back and give back when they close without a chargeback; an unknown
    status keeps the credits taken; a dispute that is released and later held again (won,
    then lost on appeal) takes back again under a new key."""
    url = base(billing_service)
    await open_account(billing_service, user)
    now = int(time.time())

    inquiry = checkout_session(user)
    pi, dp = inquiry["payment_intent"], f"dp_{uuid.uuid4().hex[:24]}"
    await deliver(http, url, event("checkout.session.completed", inquiry))
    assert await outcome(http, billing_service, dispute_event("created", pi, dp, "warning_needs_response")) == (
        "dispute_clawed_back")
    assert await outcome(http, billing_service, dispute_event("closed", pi, dp, "warning_closed")) == (
        "dispute_reinstated")
    assert await balance(billing_service, user) == (200_000, 100_000, "active")

    odd = checkout_session(user)
    await deliver(http, url, event("checkout.session.completed", odd))
    assert await outcome(http, billing_service, dispute_event("created", odd["payment_intent"], "dp_odd" + user,
                                                              "something_new")) == "dispute_clawed_back"
    assert await balance(billing_service, user) == (200_000, 100_000, "active")

    cycle = checkout_session(user)
    pi, dp = cycle["payment_intent"], f"dp_{uuid.uuid4().hex[:24]}"
    await deliver(http, url, event("checkout.session.completed", cycle))
    steps = [("created", "needs_response", "dispute_clawed_back"), ("closed", "won", "dispute_reinstated"),
             ("updated", "appeal_under_review", "dispute_clawed_back"), ("closed", "lost", "dispute_recorded")]
    for i, (kind, status, expected) in enumerate(steps):
        assert await outcome(http, billing_service, dispute_event(kind, pi, dp, status, created=now + i)) == expected
    assert [(k, t) for k, t, key in await clawbacks(billing_service, user) if pi in key] == [
        ("refund", -100_000), ("adjustment", 100_000), ("refund", -100_000)]
    assert await balance(billing_service, user) == (200_000, 100_000, "active")

    no_intent = dispute_event("created", None, f"dp_{uuid.uuid4().hex[:24]}", "needs_response")
    assert await outcome(http, billing_service, no_intent) == "not_ours"
    assert await billing_service.ledger.reconcile() == []


@pytest.mark.parametrize("order", ["dispute first", "closed before created", "concurrent"])
async def test_dispute_before_purchase_is_applied_on_fulfilment(http, billing_service, user, order):
    url, session, pi, dp = await disputable_purchase(billing_service, user)
    completed = event("checkout.session.completed", session)
    now = int(time.time())
    opened = dispute_event("created", pi, dp, "needs_response", created=now)
    if order == "dispute first":
        assert await outcome(http, billing_service, opened) == "dispute_awaiting_purchase"
        assert await balance(billing_service, user) == (100_000, 0, "active")
        assert await outcome(http, billing_service, completed) == "fulfilled"
        assert await balance(billing_service, user) == (100_000, 0, "active")
        assert await outcome(http, billing_service, completed) == "duplicate"
        again = event("checkout.session.completed", session)
        assert await outcome(http, billing_service, again) == "already_fulfilled"
    elif order == "closed before created":
        # same second: the status further along (won) is kept whatever the order of delivery
        won = dispute_event("closed", pi, dp, "won", created=now)
        assert await outcome(http, billing_service, won) == "dispute_awaiting_purchase"
        assert await outcome(http, billing_service, opened) == "dispute_awaiting_purchase"
        assert await outcome(http, billing_service, completed) == "fulfilled"
        assert await balance(billing_service, user) == (200_000, 100_000, "active")
        assert await clawbacks(billing_service, user) == []
        return
    else:
        results = await asyncio.gather(*(deliver(http, url, e) for e in (opened, completed, opened, completed)))
        assert {status for status, _ in results} == {200}
    assert [e["tokens"] for e in await entries(billing_service, user, "purchase")] == [100_000]
    assert await clawbacks(billing_service, user) == [("refund", -100_000, f"stripe:dispute:{pi}:1:{dp}")]
    assert await balance(billing_service, user) == (100_000, 0, "active")
    assert await billing_service.ledger.reconcile() == []


@pytest.mark.parametrize("scenario", ["partial refund, dispute, won, full refund", "dispute, full refund, won",
                                      "dispute, partial refund, won"])
async def test_refunds_and_disputes_never_take_more_than_the_pack(http, billing_service, user, scenario):
    url, session, pi, dp = await disputable_purchase(billing_service, user, tokens=100_000, amount=2990)
    charge = f"ch_{uuid.uuid4().hex[:20]}"
    await deliver(http, url, event("checkout.session.completed", session))
    now = int(time.time())

    def refund(cumulative: int) -> dict[str, Any]:
        return event("charge.refunded", refunded_charge(pi, amount=2990, refunded=cumulative, charge_id=charge))

    def taken(entries_: list[tuple[str, int, str]]) -> int:
        return -sum(t for _, t, _ in entries_)

    if scenario == "partial refund, dispute, won, full refund":
        assert await outcome(http, billing_service, refund(1000)) == "refunded"  # 100000 x 1000 / 2990
        opened = dispute_event("created", pi, dp, "needs_response", created=now, amount=1990)
        assert await outcome(http, billing_service, opened) == "dispute_clawed_back"  # only the rest
        assert taken(await clawbacks(billing_service, user)) == 100_000
        won = dispute_event("closed", pi, dp, "won", created=now + 1, amount=1990)
        assert await outcome(http, billing_service, won) == "dispute_reinstated"  # the refund's share stays
        assert await outcome(http, billing_service, refund(2990)) == "refunded"
        assert [t for _, t, _ in await clawbacks(billing_service, user)] == [-33_444, -66_556, 66_556, -66_556]
        expected = 100_000
    elif scenario == "dispute, full refund, won":
        assert await outcome(http, billing_service, dispute_event("created", pi, dp, "needs_response",
                                                                  created=now)) == "dispute_clawed_back"
        assert await outcome(http, billing_service, refund(2990)) == "refund_recorded"  # the dispute took it all
        assert await outcome(http, billing_service, dispute_event("closed", pi, dp, "won",
                                                                  created=now + 1)) == "dispute_recorded"
        assert [t for _, t, _ in await clawbacks(billing_service, user)] == [-100_000]
        expected = 100_000
    else:
        assert await outcome(http, billing_service, dispute_event("created", pi, dp, "needs_response",
                                                                  created=now)) == "dispute_clawed_back"
        assert await outcome(http, billing_service, refund(1000)) == "refund_recorded"
        assert await outcome(http, billing_service, dispute_event("closed", pi, dp, "won",
                                                                  created=now + 1)) == "dispute_reinstated"
        assert [t for _, t, _ in await clawbacks(billing_service, user)] == [-100_000, 66_556]
        expected = 33_444
    assert taken(await clawbacks(billing_service, user)) == expected
    assert await balance(billing_service, user) == (200_000 - expected, 100_000 - expected, "active")
    assert await billing_service.ledger.reconcile() == []


async def test_concurrent_deliveries_of_a_dispute_apply_once(http, billing_service, user):
    url, session, pi, dp = await disputable_purchase(billing_service, user, pack="medium", tokens=500_000, amount=12990)
    await deliver(http, url, event("checkout.session.completed", session))
    now = int(time.time())
    opened = dispute_event("created", pi, dp, "needs_response", created=now, amount=12990)
    raw, headers = signed(opened)
    others = [dispute_event(kind, pi, dp, status, created=now, amount=12990)
              for kind, status in (("funds_withdrawn", "needs_response"), ("updated", "under_review")) * 3]
    results = await asyncio.gather(*(post_raw(http, url + WEBHOOK, raw, headers) for _ in range(6)),
                                   *(deliver(http, url, e) for e in others))
    assert {status for status, _ in results} == {200}
    outcomes = [body["outcome"] for _, body in results]
    assert outcomes.count("dispute_clawed_back") == 1, outcomes
    assert set(outcomes) <= {"dispute_clawed_back", "dispute_recorded", "duplicate"}
    assert await clawbacks(billing_service, user) == [("refund", -500_000, f"stripe:dispute:{pi}:1:{dp}")]
    assert await balance(billing_service, user) == (100_000, 0, "active")

    won = [dispute_event(kind, pi, dp, "won", created=now + 1, amount=12990)
           for kind in ("closed", "funds_reinstated") * 4]
    results = await asyncio.gather(*(deliver(http, url, e) for e in won))
    outcomes = [body["outcome"] for _, body in results]
    assert outcomes.count("dispute_reinstated") == 1, outcomes
    assert [t for _, t, _ in await clawbacks(billing_service, user)] == [-500_000, 500_000]
    assert await balance(billing_service, user) == (600_000, 500_000, "active")
    assert await billing_service.ledger.reconcile() == []
