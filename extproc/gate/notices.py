"""The in-chat notices (GATE_INLINE_NOTICES, docs/notices.md): when a notice is due, its
text, and where it goes in a streamed answer. Pure: the claim that makes a notice shown once
is the ledger's (``Ledger.claim_inline_notice``), where a schema's answer takes it is its
translator's (``notice_allowed``, ``append_notice``, ``notice_event``).

A notice is decided at admission from the account the admission returned (no database call
when none is due) and appended to that exchange's answer: the answer that crosses a
threshold cannot carry it, since its usage is only known once its bytes went out.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..formats import fmt_int
from ..i18n import catalogue

if TYPE_CHECKING:
    from ..ledger import Account

__all__ = ["MARKER", "THRESHOLDS", "due", "has_done", "insert", "insertion_point", "remaining", "text"]

MARKER = "[Solaris]"  # never translated: what tells a reader (and a test) the line is ours
THRESHOLDS = (80, 90)  # usage % of the effective limit; the highest due one is shown
# An account state says a threshold was crossed even when the usage % reads otherwise
# (measured at the crossing, before a later top-up moved the budget).
_STATE_THRESHOLD = {"warned_80": 80, "warned_90": 90}
# The stream's terminator, at the start of a line ("data:[DONE]" is as valid as "data: [DONE]").
_DONE = re.compile(rb"(?m)^data: ?\[DONE\][ \t]*\r?$")


def due(account: Account) -> int:
    """The threshold whose notice this account's next answer should carry, or 0: the highest
    one reached, unless it (or a higher one) was already shown this cycle."""
    pct = account.used_pct
    reached = max([t for t in THRESHOLDS if pct >= t], default=0)
    reached = max(reached, _STATE_THRESHOLD.get(account.state, 0))
    return reached if reached > account.inline_notice else 0


def remaining(account: Account, cost: int) -> int:
    """Tokens left under the effective limit once this answer's ``cost`` is debited (the
    account is as admission read it, before this exchange settled)."""
    return max(account.effective_limit - account.used_cycle - cost, 0)


def text(language: str, threshold: int, tokens_left: int, me_url: str) -> str:
    """The notice, marker first, in ``language``."""
    body = catalogue().text(language, f"inline.notice_{threshold}",
                            remaining=fmt_int(tokens_left, language), url=me_url)
    return f"{MARKER} {body}"


def insertion_point(chunk: bytes, end_of_stream: bool) -> int | None:
    """Where a stream's notice event goes in ``chunk``: before its ``data: [DONE]`` line, or
    at its end when the stream ends without one; None when the answer goes on after it."""
    found = _DONE.search(chunk)
    if found is not None:
        return found.start()
    return len(chunk) if end_of_stream else None


def has_done(data: bytes) -> bool:
    """Whether ``data`` holds a ``data: [DONE]`` line (one split across two chunks is found
    in the two joined)."""
    return _DONE.search(data) is not None


def insert(chunk: bytes, at: int, event: bytes) -> bytes:
    """``chunk`` with ``event`` (one whole SSE event, blank line included) at ``at``, after
    a blank line that ends the event before it."""
    before = chunk[:at]
    separator = b"" if not before or before.endswith(b"\n\n") else b"\n" if before.endswith(b"\n") else b"\n\n"
    return before + separator + event + chunk[at:]
