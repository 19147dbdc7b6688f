"""Reasons the system writes on ledger entries and audit rows: a code with parameters, shown
in the reader's language.

A row the gate writes itself (an account opened, a new cycle, a purchase, a refund or dispute
clawback) stores three columns (migrations/20261129000002_reason_codes.sql):

- ``reason_code``: a key of the catalogue's ``reason.*`` section (the constants below);
- ``reason_params``: its parameters as raw JSON values: ISO dates, token counts, amounts in
  minor units with their currency, Stripe ids, never formatted text;
- ``reason``: the text as written (English for the ledger's own entries, the deployment's
  language for purchases, as before codes existed). It is what psql, backups and an older
  version of the gate read, so none of them ever shows a bare code.

Pages, exports and the API show ``display(...)``: the code rendered in the reader's language.
A row without a code (reasons an admin typed, rows written before codes) or with a code this
version does not know shows its text as it is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from .formats import fmt_date, fmt_int, format_price
from .i18n import catalogue

__all__ = ["ACCOUNT_OPENED", "DISPUTE", "DISPUTE_RELEASED", "NEW_CYCLE", "NEW_CYCLE_EXPIRED", "PURCHASE", "REFUND",
           "Reason", "account_opened", "coded", "columns", "display", "new_cycle", "render"]

log = logging.getLogger(__name__)

ACCOUNT_OPENED = "account_opened"  # {}
NEW_CYCLE = "new_cycle"  # {start, end}
NEW_CYCLE_EXPIRED = "new_cycle_expired"  # {start, end, expired}: the old allowance did not roll over
PURCHASE = "purchase"  # {pack, amount, currency, session}
REFUND = "refund"  # {refunded, amount, currency, payment}
DISPUTE = "dispute"  # {amount, currency, dispute, payment}
DISPUTE_RELEASED = "dispute_released"  # {status, dispute, payment}

SYSTEM_LANGUAGE = "en"  # the text the ledger writes beside its own codes

# How a parameter is shown, by its name; any other parameter is shown as it is (ids, names).
DATES = frozenset({"start", "end"})  # ISO dates
COUNTS = frozenset({"expired"})  # tokens
AMOUNTS = frozenset({"amount", "refunded"})  # minor units of params["currency"]
UNKNOWN_AMOUNT = "?"  # a Stripe object that did not say how much


@dataclass(frozen=True)
class Reason:
    """A coded reason, with the text written beside it."""

    code: str
    params: Mapping[str, Any] = field(default_factory=dict)
    text: str = ""


def _shown(name: str, value: Any, params: Mapping[str, Any], language: str) -> str:
    if name in DATES:
        return fmt_date(date.fromisoformat(value), language)
    if name in COUNTS:
        return fmt_int(value, language)
    if name in AMOUNTS:
        if value is None:
            return UNKNOWN_AMOUNT
        currency = params.get("currency")
        return format_price(value, currency, language) if currency else str(value)
    return str(value)


def render(code: str, params: Mapping[str, Any], language: str) -> str:
    """The text of ``code`` in ``language``; KeyError/ValueError/TypeError if the parameters
    do not fit it."""
    shown = {name: _shown(name, value, params, language) for name, value in params.items()}
    return catalogue().texts(language)[f"reason.{code}"].format(**shown)


def coded(code: str, params: Mapping[str, Any], language: str) -> Reason:
    """The reason ``code`` with its text written in ``language``."""
    return Reason(code, dict(params), render(code, params, language))


def _day(value: datetime) -> str:
    return value.astimezone(UTC).date().isoformat()


def account_opened() -> Reason:
    return coded(ACCOUNT_OPENED, {}, SYSTEM_LANGUAGE)


def new_cycle(start: datetime, end: datetime, expired: int) -> Reason:
    """A cycle's opening entry; ``expired``: unused allowance of the last cycle that lapsed."""
    if expired:
        return coded(NEW_CYCLE_EXPIRED, {"start": _day(start), "end": _day(end), "expired": expired},
                     SYSTEM_LANGUAGE)
    return coded(NEW_CYCLE, {"start": _day(start), "end": _day(end)}, SYSTEM_LANGUAGE)


def columns(reason: str | Reason | None) -> tuple[str | None, str | None, str | None]:
    """(reason, reason_code, reason_params as JSON text) of a row; a plain string (an admin's
    reason) has no code."""
    if isinstance(reason, Reason):
        return reason.text, reason.code, json.dumps(dict(reason.params), sort_keys=True, ensure_ascii=False)
    return reason, None, None


def display(text: str | None, code: str | None, params: Mapping[str, Any] | str | None, language: str) -> str:
    """What a reader sees of a row's reason (the rule is in the module docstring)."""
    if code and catalogue().has(f"reason.{code}"):
        try:
            values = json.loads(params) if isinstance(params, str) else params
            return render(code, values or {}, language)
        except (KeyError, ValueError, TypeError, AttributeError):
            log.warning("reason %s with unexpected parameters: its text is shown", code)
    return text or ""
