"""Language: the one message catalogue and the formatters (Babel)."""

from __future__ import annotations

import json
import string
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

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
)
from extproc.i18n import CATALOGUE_FILE, LANGUAGES, Catalogue, catalogue


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
