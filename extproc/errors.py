"""OpenAI-shaped error bodies, in the user's language, that LibreChat shows in the chat."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date

from .formats import fmt_date_text, fmt_int
from .i18n import FALLBACK_LANGUAGE, LANGUAGES, catalogue, supported


@dataclass(frozen=True)
class GateError:
    status: int
    type: str
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        # backslashreplace: a lone surrogate a client put in a field we quote becomes its JSON
        # escape (\udXXX, valid JSON) instead of failing the error reply itself.
        return json.dumps(
            {"error": {"message": self.message, "type": self.type, "code": self.code}},
            ensure_ascii=False,
        ).encode("utf-8", "backslashreplace")


# The texts live in the message catalogue (extproc/templates/i18n.json): ``gate.*`` for the
# errors themselves, ``refusal.*`` for why a request was refused before reaching the upstream
# (400 invalid_request: the codes of the gate's body checks, with the offending field; and the
# whole messages of the user's own refusals, ``personal_cap_reached`` and ``account_erased``),
# and ``identity.*`` for why an identity was refused (401).
MESSAGES: dict[str, dict[str, str]] = {lang: catalogue().section(lang, "gate") for lang in LANGUAGES}
REFUSALS: dict[str, dict[str, str]] = {lang: catalogue().section(lang, "refusal") for lang in LANGUAGES}

# identity.IdentityError's texts stay English in logs; the user reads them in the gate's
# language. (English text, text in the language) pairs; ``{what}`` is a header or claim name.
_IDENTITY: dict[str, list[tuple[str, str]]] = {
    lang: [(english, catalogue().text(lang, f"identity.{key}"))
           for key, english in catalogue().section(FALLBACK_LANGUAGE, "identity").items()]
    for lang in LANGUAGES
}


def translate_identity(detail: str, language: str) -> str:
    pairs = _IDENTITY[supported(language)]
    for english, text in pairs:
        if detail == english:
            return text
    for english, text in pairs:
        suffix = english.removeprefix("{what}")
        if suffix != english and detail.endswith(suffix):
            return text.format(what=detail[: -len(suffix)])
    return detail


class Messages:
    """Builds the gate's errors in one language."""

    def __init__(self, language: str, purchase_url: str | None = None) -> None:
        self.language = language
        self.text = MESSAGES[language]
        self.purchase_url = purchase_url

    def unauthorized(self, detail: str) -> GateError:
        return GateError(401, "invalid_request_error", "invalid_token",
                         self.text["invalid_token"].format(
                             detail=translate_identity(detail, self.language)),
                         (("www-authenticate", "Bearer"),))

    def quota_exceeded(self, available: int, estimate: int, cycle_end: date | str) -> GateError:
        """``cycle_end``: the renewal day, written the reader's way (a text is used as is)."""
        renews = cycle_end if isinstance(cycle_end, str) else fmt_date_text(cycle_end, self.language)
        message = self.text["quota_exceeded"].format(
            available=fmt_int(max(available, 0), self.language),
            estimate=fmt_int(estimate, self.language), cycle_end=renews)
        if self.purchase_url:
            message += self.text["quota_exceeded_buy"].format(url=self.purchase_url)
        else:
            message += self.text["quota_exceeded_admin"]
        return GateError(402, "insufficient_quota", "quota_exceeded", message)

    def personal_cap(self, cap: int, used: int, estimate: int, cycle_end: date | str,
                     me_url: str) -> GateError:
        """402 for a request that would pass the limit the user set for themselves: it names
        the cap, and the page where the user changes it."""
        renews = cycle_end if isinstance(cycle_end, str) else fmt_date_text(cycle_end, self.language)
        message = REFUSALS[self.language]["personal_cap_reached"].format(
            cap=fmt_int(cap, self.language), used=fmt_int(used, self.language),
            estimate=fmt_int(estimate, self.language), cycle_end=renews, url=me_url)
        return GateError(402, "insufficient_quota", "personal_cap_reached", message)

    def erased(self) -> GateError:
        """403 for an id whose data was erased at the user's request (LGPD): never re-created."""
        return GateError(403, "permission_denied", "account_erased",
                         REFUSALS[self.language]["account_erased"])

    def suspended(self) -> GateError:
        return GateError(403, "permission_denied", "account_suspended",
                         self.text["account_suspended"])

    def rate_limited(self, limit: int, retry_after: int,
                     headers: tuple[tuple[str, str], ...] = ()) -> GateError:
        return GateError(429, "rate_limit_error", "rate_limit_exceeded",
                         self.text["rate_limit_exceeded"].format(limit=limit, retry=retry_after),
                         (("retry-after", str(retry_after)), *headers))

    def unavailable(self) -> GateError:
        return GateError(503, "api_error", "ledger_unavailable",
                         self.text["ledger_unavailable"], (("retry-after", "5"),))

    def refused(self, code: str, detail: str = "") -> GateError:
        """400 for a request refused before the upstream; ``code`` is a key of REFUSALS."""
        if not detail.isprintable():  # the client's own bytes: shown escaped, never raw
            detail = detail.encode("unicode_escape").decode("ascii")
        reason = REFUSALS[self.language][code].format(detail=detail)
        return GateError(400, "invalid_request_error", code,
                         self.text["invalid_request"].format(detail=reason))

    def internal(self) -> GateError:
        return GateError(500, "api_error", "internal_error", self.text["internal_error"])

    def too_large(self, size: int, limit: int) -> GateError:
        return GateError(413, "invalid_request_error", "request_too_large",
                         self.text["body_too_large"].format(size=size, limit=limit))

    def not_found(self) -> GateError:
        return GateError(404, "invalid_request_error", "not_found", self.text["not_found"])

    def user_mismatch(self) -> GateError:
        return GateError(401, "invalid_request_error", "invalid_token",
                         self.text["user_mismatch"])
