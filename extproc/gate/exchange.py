"""What the gate knows about one HTTP exchange (one ext_proc stream), phase after phase."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..identity import Identity
from ..ledger import Account
from ..ratelimit import RateDecision
from .translators import Translator
from .usage import StreamTap


@dataclass
class Exchange:
    # The exactly-once key of the exchange's debit: minted here, never taken from a client.
    exchange_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    translator: Translator | None = None  # None: not a metered path
    identity: Identity | None = None
    request_id: str | None = None
    model: str | None = None
    stream: bool = False
    estimate: int = 0          # tokens the request may cost (billable.Estimate.tokens)
    prompt_estimate: int = 0   # of which the prompt
    prompt_chars: int = 0      # billable text characters (for `extproc calibrate`)
    reserve: int = 0           # what admission asks the ledger to hold: estimate x weight
    admitted: bool = False
    reserved: int = 0
    status: int = 0
    tap: StreamTap | None = None
    # True for an SSE answer whose chunks only pass through (no notice to add): the adapter's
    # fast path, one attribute test per chunk.
    plain_stream: bool = False
    # The in-chat notice's threshold this exchange's answer should carry (0: none), decided
    # at admission (gate.notices.due) and dropped once shown or found not to fit the answer.
    notice: int = 0
    body: bytearray = field(default_factory=bytearray)
    rate: RateDecision | None = None
    account: Account | None = None  # the account as admission left it (after this reservation)
    closed: bool = False
    # Its answer may be handed to Envoy (gate.handoff.candidate, decided at admission); once it
    # is, ``closed`` says this stream settles nothing (Envoy's access log does).
    candidate: bool = False
