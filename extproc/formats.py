"""Numbers, percentages, dates and prices as readers see them, in pt-BR or en.

One copy for the web pages (as Jinja filters, see ``web.kit.WebContext``) and the purchase
texts (``purchases``). Pure: no I/O, no settings; the caller passes the language.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

__all__ = ["fmt_date", "fmt_dt", "fmt_int", "fmt_pct", "fmt_signed", "fmt_value", "format_price"]

MISSING = "—"
# Currencies Stripe counts in whole units (no cents).
ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx",
                          "vnd", "vuv", "xaf", "xof", "xpf"})
SYMBOLS = {"brl": "R$", "usd": "US$", "eur": "€", "gbp": "£"}


def _swap_separators(text: str, lang: str) -> str:
    """Python's "1,234.5" the pt-BR way ("1.234,5")."""
    return text.translate(str.maketrans({",": ".", ".": ","})) if lang == "pt-BR" else text


def fmt_int(value: int | Decimal | None, lang: str) -> str:
    """100000 -> "100.000" (pt-BR) / "100,000" (en)."""
    if value is None:
        return MISSING
    return _swap_separators(f"{int(value):,}", lang)


def fmt_signed(value: int | None, lang: str) -> str:
    if value is None:
        return MISSING
    return ("+" if value > 0 else "") + fmt_int(value, lang)


def fmt_pct(value: float | Decimal | None, lang: str) -> str:
    if value is None:
        return MISSING
    return _swap_separators(f"{float(value):,.1f}", lang) + "%"


def fmt_dt(value: datetime | None, lang: str) -> str:
    if value is None:
        return MISSING
    value = value.astimezone(UTC)
    return value.strftime("%d/%m/%Y %H:%M UTC" if lang == "pt-BR" else "%Y-%m-%d %H:%M UTC")


def fmt_date(value: datetime | date | None, lang: str) -> str:
    if value is None:
        return MISSING
    if isinstance(value, datetime):
        value = value.astimezone(UTC).date()
    return value.strftime("%d/%m/%Y" if lang == "pt-BR" else "%Y-%m-%d")


def fmt_value(value: Any, lang: str) -> str:
    """Any JSON value of an audit row's before/after, for display."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return fmt_int(value, lang)
    return str(value)


def format_price(amount: int, currency: str, lang: str) -> str:
    """An amount in minor units, as Stripe counts it: 2990, "brl" -> "R$ 29,90" (pt-BR) /
    "R$ 29.90" (en)."""
    digits = 0 if currency in ZERO_DECIMAL else 2
    text = _swap_separators(f"{amount / 10**digits:,.{digits}f}", lang)
    return f"{SYMBOLS.get(currency, currency.upper())} {text}"
