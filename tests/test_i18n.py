"""Language: the one message catalogue, the formatters (Babel), and ledger reasons stored as
codes and shown in the reader's language (pages, CSV, API), old free-text rows as written."""

from __future__ import annotations

import csv
import io
import json
import string
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import aiohttp
import asyncpg
import pytest
from support.clock import Clock

from extproc import reasons
from extproc.app import Service
from extproc.errors import MESSAGES, REFUSALS, Messages, translate_identity
from extproc.formats import (
    fmt_date,
    fmt_date_text,
    fmt_day_month,
    fmt_dt,
    fmt_int,
    fmt_number,
    fmt_pct,
    fmt_signed,
    fmt_value,
    format_price,
    group_separator,
)
from extproc.i18n import CATALOGUE_FILE, LANGUAGES, Catalogue, catalogue
from extproc.identity import mint_token
from extproc.ledger import Ledger
from extproc.migrate import dbmate, expected_versions
from extproc.settings import Settings
from extproc.web.kit import WebContext

MIGRATION = "20261129000002"


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


# ---------------------------------------------------------------- the catalogue


def test_every_text_exists_in_every_language_with_the_same_placeholders():
    raw = json.loads(CATALOGUE_FILE.read_text(encoding="utf-8"))
    assert set(raw) == set(LANGUAGES)
    assert set(raw["pt-BR"]) == set(raw["en"])
    for key, text in raw["en"].items():
        assert placeholders(text) == placeholders(raw["pt-BR"][key]), key
    for section in ("gate", "refusal", "identity", "billing", "reason", "me", "err"):
        assert catalogue().section("en", section), section


def test_a_missing_text_falls_back_to_english_then_to_its_key():
    texts = Catalogue({"en": {"a.b": "Hello {name}", "a.c": "only English"}, "pt-BR": {"a.b": "Olá {name}"}})
    assert texts.text("pt-BR", "a.b", name="Ana") == "Olá Ana"
    assert texts.text("pt-BR", "a.c") == "only English"
    assert texts.text("pt-BR", "a.nope") == "a.nope"
    assert texts.section("pt-BR", "a") == {"b": "Olá {name}", "c": "only English"}
    assert texts.texts("fr") == texts.texts("pt-BR")  # an unknown language reads the default
    with pytest.raises(ValueError):
        Catalogue({"en": {}})


def test_the_gates_errors_read_the_catalogue_unchanged():
    assert MESSAGES["pt-BR"]["internal_error"] == catalogue().text("pt-BR", "gate.internal_error")
    assert set(REFUSALS["pt-BR"]) == set(REFUSALS["en"]) and "model_required" in REFUSALS["en"]
    error = Messages("pt-BR").quota_exceeded(1_234, 56_789, "01/02/2026")
    assert error.message.startswith("Seu saldo de tokens acabou: restam 1.234 tokens e esta mensagem precisa "
                                    "de cerca de 56.789. O saldo renova em 01/02/2026.")
    assert Messages("en").quota_exceeded(-5, 1000, "2026-02-01").message.startswith(
        "Your token balance is used up: 0 tokens left and this message needs about 1,000.")
    assert translate_identity("token expired", "pt-BR") == "token expirado"
    assert translate_identity("x-user-email is too long", "pt-BR") == "x-user-email é longo demais"
    assert translate_identity("token expired", "en") == "token expired"
    assert translate_identity("something new", "pt-BR") == "something new"


# ---------------------------------------------------------------- formatters


def test_formatters_in_both_languages():
    moment = datetime(2026, 1, 5, 13, 4, tzinfo=UTC)
    assert [fmt_int(1_234_567, lang) for lang in LANGUAGES] == ["1.234.567", "1,234,567"]
    assert [fmt_signed(1000, lang) for lang in LANGUAGES] == ["+1.000", "+1,000"]
    assert [group_separator(lang) for lang in LANGUAGES] == [".", ","]  # how typed amounts are read
    assert fmt_signed(-5, "en") == "-5" and fmt_signed(0, "en") == "0"
    assert [fmt_pct(85.5, lang) for lang in LANGUAGES] == ["85,5%", "85.5%"]
    assert [fmt_number(12.5, lang) for lang in LANGUAGES] == ["12,5", "12.5"]
    assert fmt_number(120.0, "pt-BR") == "120" and fmt_number(99.999, "en") == "100"
    assert [fmt_dt(moment, lang) for lang in LANGUAGES] == ["05/01/2026 13:04 UTC", "2026-01-05 13:04 UTC"]
    assert [fmt_date(moment, lang) for lang in LANGUAGES] == ["05/01/2026", "2026-01-05"]
    assert [fmt_date_text(date(2026, 1, 5), lang) for lang in LANGUAGES] == ["05/01/2026", "January 5, 2026"]
    assert [fmt_day_month(moment, lang) for lang in LANGUAGES] == ["05/01", "01-05"]
    # Days and moments are UTC's, whatever the value's offset (São Paulo's evening is UTC's next day).
    evening = datetime(2026, 1, 5, 23, 30, tzinfo=timezone(timedelta(hours=-3)))
    assert (fmt_date(evening, "pt-BR"), fmt_dt(evening, "en")) == ("06/01/2026", "2026-01-06 02:30 UTC")
    assert [format_price(2990, "brl", lang) for lang in LANGUAGES] == ["R$ 29,90", "R$ 29.90"]
    assert format_price(1_299_000, "usd", "en") == "US$ 12,990.00"
    assert format_price(500, "jpy", "pt-BR") == "JPY 500"  # zero-decimal at Stripe
    assert fmt_int(None, "en") == fmt_pct(None, "en") == fmt_dt(None, "en") == fmt_value(None, "en") == "—"
    assert fmt_value(True, "pt-BR") == "true" and fmt_value(5000, "pt-BR") == "5.000"


# ---------------------------------------------------------------- reasons


def test_reasons_render_in_the_readers_language_and_fall_back_to_their_text():
    opened = reasons.account_opened()
    assert (opened.code, opened.text) == ("account_opened", "account opened")
    start, end = datetime(2026, 2, 28, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC)
    cycle = reasons.new_cycle(start, end, 1400)
    assert cycle.params == {"start": "2026-02-28", "end": "2026-03-31", "expired": 1400}
    assert cycle.text == "new cycle 2026-02-28 to 2026-03-31; 1,400 unused tokens expired"
    text, code, params = reasons.columns(cycle)
    assert (text, code, json.loads(params or "")) == (cycle.text, "new_cycle_expired", cycle.params)
    assert reasons.display(text, code, params, "pt-BR") == \
        "novo ciclo de 28/02/2026 a 31/03/2026; 1.400 tokens não usados expiraram"
    assert reasons.new_cycle(start, end, 0).code == "new_cycle"

    purchase = reasons.coded(reasons.PURCHASE, {"pack": "small", "amount": 2990, "currency": "brl",
                                                "session": "cs_1"}, "pt-BR")
    assert purchase.text == "Compra de créditos: pacote small, R$ 29,90 (Stripe cs_1)"
    assert reasons.display(purchase.text, purchase.code, purchase.params, "en") == \
        "Credit purchase: pack small, R$ 29.90 (Stripe cs_1)"
    refund = reasons.coded(reasons.REFUND, {"refunded": None, "amount": 2990, "currency": None,
                                            "payment": "pi_1"}, "en")
    assert refund.text == "Refund of ? of 2990 (Stripe pi_1)"  # what Stripe did not say stays visible

    # Admin-typed reasons, rows written before codes, codes this version does not know and
    # parameters that do not fit: the text as written.
    assert reasons.columns("bônus") == ("bônus", None, None)
    assert reasons.display("bônus", None, None, "en") == "bônus"
    assert reasons.display("account opened", None, None, "pt-BR") == "account opened"
    assert reasons.display("from the future", "refund_v9", "{}", "pt-BR") == "from the future"
    assert reasons.display("as written", "new_cycle", '{"start": "garbage"}', "pt-BR") == "as written"
    assert reasons.display(None, None, None, "en") == ""


async def entry_rows(pool: asyncpg.Pool, user: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT kind, reason, reason_code, reason_params FROM ledger_entries"
                            " WHERE user_id = $1 ORDER BY id", user)


async def test_the_ledger_stores_codes_and_pages_csv_and_api_show_them_translated(
        service: Service, settings: Settings, http: aiohttp.ClientSession, user: str):
    assert service.pool is not None
    # A cycle that rolls over in the past, so the account has an opening and a new-cycle entry.
    clock = Clock(datetime(2025, 1, 10, 12, tzinfo=UTC))
    ledger = Ledger(service.pool, settings, clock)
    assert (await ledger.admit(user, 0, f"x-{uuid.uuid4().hex}")).outcome == "ok"
    clock.now = datetime(2025, 2, 10, 12, tzinfo=UTC)
    assert (await ledger.admit(user, 0, f"x-{uuid.uuid4().hex}")).outcome == "ok"
    await ledger.grant(user, 500, actor="ana", reason="bônus de boas-vindas")
    rows = await entry_rows(service.pool, user)
    assert [(r["kind"], r["reason"], r["reason_code"]) for r in rows] == [
        ("cycle_reset", "account opened", "account_opened"),
        ("cycle_reset", "new cycle 2025-02-10 to 2025-03-10; 100,000 unused tokens expired", "new_cycle_expired"),
        ("grant", "bônus de boas-vindas", None)]
    assert json.loads(rows[1]["reason_params"]) == {"start": "2025-02-10", "end": "2025-03-10", "expired": 100_000}
    assert rows[2]["reason_params"] is None
    audit = await service.pool.fetchrow("SELECT reason, reason_code FROM audit_log WHERE target = $1", user)
    assert tuple(audit) == ("bônus de boas-vindas", None)

    # The deployment reads pt-BR: the API, the CSV and the /me page show Portuguese.
    headers = {"authorization": f"Bearer {mint_token(settings, user)}"}
    base = f"http://127.0.0.1:{service.http_port}"
    async with http.get(base + "/api/me/entries", headers=headers) as resp:
        shown = [e["reason"] for e in (await resp.json())["entries"]]
    expected = ["bônus de boas-vindas",
                "novo ciclo de 10/02/2025 a 10/03/2025; 100.000 tokens não usados expiraram", "conta aberta"]
    assert shown == expected
    async with http.get(base + "/api/me/statement.csv", headers=headers) as resp:
        table = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [r["reason"] for r in table] == expected and "reason_code" not in table[0]
    async with http.get(f"{base}/api/admin/users/{user}/entries",
                        headers={"authorization": f"Bearer {settings.admin_token}"}) as resp:
        assert [e["reason"] for e in (await resp.json())["entries"]] == expected

    # A reader in English sees English; an old row without a code is shown as written.
    english = WebContext.build(settings.replace(language="en"))
    found: list[dict[str, Any]] = [dict(r) for r in rows]
    assert [e["reason"] for e in english.readable(found)] == [
        "account opened", "new cycle 2025-02-10 to 2025-03-10; 100,000 unused tokens expired",
        "bônus de boas-vindas"]
    assert "reason_code" not in found[0]
    legacy = [{"reason": "account opened", "reason_code": None, "reason_params": None}]
    assert WebContext.build(settings).readable(legacy) == [{"reason": "account opened"}]


async def test_the_migration_codes_old_ledger_rows_and_rolls_back(make_database: Any):
    url = make_database()
    conn = await asyncpg.connect(url)
    try:
        # Back to just before the reason codes (the migrations after it first, each by its own
        # down section): rows written as before codes existed.
        for _ in [v for v in expected_versions() if v >= "20261129000002"]:
            dbmate(url, "rollback")
        assert not await conn.fetchval("SELECT count(*) FROM information_schema.columns"
                                       " WHERE table_name = 'ledger_entries' AND column_name = 'reason_code'")
        start = datetime(2025, 1, 10, tzinfo=UTC)
        await conn.execute(
            "INSERT INTO accounts (user_id, cycle_anchor_day, cycle_start, cycle_end) VALUES ('u', 10, $1, $2)",
            start, start + timedelta(days=31))
        for reason, actor in (("account opened", "system"), ("new cycle 2025-02-10 to 2025-03-10", "system"),
                              ("new cycle 2025-03-10 to 2025-04-10; 400 unused tokens expired", "system"),
                              ("new cycle by hand", "system"), ("account opened", "ana")):
            await conn.execute(
                "INSERT INTO ledger_entries (user_id, kind, tokens, allowance_delta, credits_delta, balance_after,"
                " actor, reason, cycle_start) VALUES ('u', 'cycle_reset', 0, 0, 0, 0, $1, $2, $3)",
                actor, reason, start)
        dbmate(url, "up")
        rows = await conn.fetch("SELECT reason, reason_code, reason_params FROM ledger_entries ORDER BY id")
        assert [(r["reason_code"], json.loads(r["reason_params"]) if r["reason_params"] else None)
                for r in rows] == [
            ("account_opened", {}),
            ("new_cycle", {"start": "2025-02-10", "end": "2025-03-10"}),
            ("new_cycle_expired", {"start": "2025-03-10", "end": "2025-04-10", "expired": 400}),
            (None, None), (None, None)]
        assert rows[1]["reason"] == "new cycle 2025-02-10 to 2025-03-10"  # the text is kept
        assert reasons.display(rows[2]["reason"], rows[2]["reason_code"], rows[2]["reason_params"], "pt-BR") == \
            "novo ciclo de 10/03/2025 a 10/04/2025; 400 tokens não usados expiraram"
        with pytest.raises(asyncpg.CheckViolationError):  # a code never goes without its parameters
            await conn.execute("UPDATE ledger_entries SET reason_code = 'x' WHERE reason_code IS NULL")
        assert dbmate(url, "rollback").returncode == 0
        assert await conn.fetchval("SELECT count(*) FROM ledger_entries") == 5
    finally:
        await conn.close()
