"""Numbers, percentages, dates and money as readers see them, in pt-BR or en: the one set of
formatters used by the pages and exports (``web``), the alert e-mails (``alerts.render``),
the gate's errors (``errors``), ledger reasons (``reasons``) and billing (``purchases``).

Built on Babel's CLDR data (digits, grouping and decimal symbols, percent sign, month
names), never on the OS locale: containers rarely have pt_BR installed. Where this project
chose a form CLDR does not give, the pattern is written here and says why. Pure: no I/O,
no settings; the caller passes the language (``i18n.LANGUAGES``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from babel import Locale
from babel.dates import format_date, format_datetime
from babel.numbers import format_decimal, format_percent, get_group_symbol

from .i18n import LANGUAGES, supported

__all__ = ["MISSING", "fmt_date", "fmt_date_text", "fmt_day_month", "fmt_dt", "fmt_int", "fmt_number", "fmt_pct",
           "fmt_signed", "fmt_value", "format_price", "group_separator", "minor_unit_digits"]

MISSING = "—"  # what an absent value reads as
LOCALES = {lang: Locale.parse(lang, sep="-") for lang in LANGUAGES}

# Dates in tables and statements: day first in pt-BR (CLDR's short date), ISO in en (an
# international team reads 2026-01-05 one way only; en-US's 1/5/26 is read two ways).
DATE = {"pt-BR": "dd/MM/yyyy", "en": "yyyy-MM-dd"}
DAY_MONTH = {"pt-BR": "dd/MM", "en": "MM-dd"}  # a chart's axis: the year is the chart's
DATETIME = {"pt-BR": "dd/MM/yyyy HH:mm 'UTC'", "en": "yyyy-MM-dd HH:mm 'UTC'"}
# Dates in running text (e-mails): CLDR's long date in en ("January 5, 2026"); the short
# one in pt-BR, as Brazilian notices write it ("05/01/2026").
DATE_TEXT = {"pt-BR": "short", "en": "long"}

# Stripe counts these currencies in whole units (no cents): its rule for minor units, which
# is not always CLDR's (ISK and HUF are two-decimal at Stripe).
ZERO_DECIMAL = frozenset({"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx",
                          "vnd", "vuv", "xaf", "xof", "xpf"})
# A price's symbol is one a Brazilian reader cannot misread, in both languages ("US$", never
# a bare "$", which is also the real's sign in speech); other currencies show their ISO code.
SYMBOLS = {"brl": "R$", "usd": "US$", "eur": "€", "gbp": "£"}


def _locale(lang: str) -> Locale:
    return LOCALES[supported(lang)]


def fmt_int(value: int | Decimal | None, lang: str) -> str:
    """100000 -> "100.000" (pt-BR) / "100,000" (en)."""
    if value is None:
        return MISSING
    return format_decimal(int(value), format="#,##0", locale=_locale(lang))


def group_separator(lang: str) -> str:
    """What groups thousands in ``lang``: "." (pt-BR), "," (en); for reading typed numbers."""
    return get_group_symbol(_locale(lang))


def fmt_signed(value: int | None, lang: str) -> str:
    """A change of balance: "+1.000", "-500", "0"."""
    if value is None:
        return MISSING
    return ("+" if value > 0 else "") + fmt_int(value, lang)


def fmt_number(value: float | Decimal, lang: str, decimals: int = 2) -> str:
    """Up to ``decimals`` decimals, none when whole: 12.5 -> "12,5" (pt-BR), 120.0 -> "120"."""
    pattern = "#,##0." + "#" * decimals if decimals else "#,##0"
    return format_decimal(Decimal(str(float(value))), format=pattern, locale=_locale(lang))


def fmt_pct(value: float | Decimal | None, lang: str) -> str:
    """A percentage given in percent, one decimal: 85.5 -> "85,5%" (pt-BR) / "85.5%" (en)."""
    if value is None:
        return MISSING
    return format_percent(Decimal(str(float(value))) / 100, format="#,##0.0%", locale=_locale(lang))


def fmt_dt(value: datetime | None, lang: str) -> str:
    """A moment, in UTC: "05/01/2026 13:04 UTC" (pt-BR) / "2026-01-05 13:04 UTC" (en)."""
    if value is None:
        return MISSING
    return format_datetime(value.astimezone(UTC), DATETIME[supported(lang)], tzinfo=UTC, locale=_locale(lang))


def _day(value: datetime | date) -> date:
    return value.astimezone(UTC).date() if isinstance(value, datetime) else value


def fmt_date(value: datetime | date | None, lang: str) -> str:
    """A day (UTC) in a table: "05/01/2026" (pt-BR) / "2026-01-05" (en)."""
    if value is None:
        return MISSING
    return format_date(_day(value), DATE[supported(lang)], locale=_locale(lang))


def fmt_day_month(value: datetime | date, lang: str) -> str:
    """A day (UTC) on a chart's axis: "05/01" (pt-BR) / "01-05" (en)."""
    return format_date(_day(value), DAY_MONTH[supported(lang)], locale=_locale(lang))


def fmt_date_text(value: datetime | date, lang: str) -> str:
    """A day (UTC) in a sentence: "05/01/2026" (pt-BR) / "January 5, 2026" (en)."""
    return format_date(_day(value), DATE_TEXT[supported(lang)], locale=_locale(lang))


def fmt_value(value: Any, lang: str) -> str:
    """Any JSON value of an audit row's before/after, for display."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return fmt_int(value, lang)
    return str(value)


def minor_unit_digits(currency: str) -> int:
    """How many decimals Stripe's minor units of ``currency`` have (2990 brl = 29.90)."""
    return 0 if currency.lower() in ZERO_DECIMAL else 2


def format_price(amount: int, currency: str, lang: str) -> str:
    """An amount in minor units, as Stripe counts it: 2990, "brl" -> "R$ 29,90" (pt-BR) /
    "R$ 29.90" (en)."""
    digits = minor_unit_digits(currency)
    number = format_decimal(Decimal(amount).scaleb(-digits), format="#,##0." + "0" * digits if digits else "#,##0",
                            locale=_locale(lang))
    return f"{SYMBOLS.get(currency.lower(), currency.upper())} {number}"
