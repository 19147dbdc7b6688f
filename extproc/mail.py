"""Sending e-mail over SMTP: the alert worker's e-mails and /me's sign-in links.

What a message says is decided by its sender (``alerts.render``, ``web.me``); this module only
parses GATE_SMTP_URL and hands a finished ``EmailMessage`` to the server.

SMTP URL (GATE_SMTP_URL)
------------------------
``smtps://user:pass@host:port`` is TLS from the first byte (default port 465).
``smtp://user:pass@host:port`` (default port 25) uses STARTTLS: required with ``?starttls=1``
or on port 587, never with ``?starttls=0``, otherwise opportunistic (upgraded when the server
offers it). User and password are percent-decoded and, when present, used to log in.
``?verify=0`` skips certificate verification (an internal relay with a self-signed
certificate); ``?timeout=SECONDS`` bounds each SMTP operation (default 30).

Failures
--------
``Undeliverable`` means retrying cannot help: every recipient was refused with a 5xx (the
mailbox said "never"). Anything else raised (4xx greylisting, a refused connection, a
timeout) is worth another attempt; the caller decides whether and when.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import aiosmtplib

__all__ = ["MailSender", "SmtpConfig", "SmtpSender", "Undeliverable", "parse_smtp_url", "smtp_sender",
           "usable_address"]

DEFAULT_TIMEOUT = 30.0  # seconds per SMTP operation, unless ?timeout= says otherwise
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Undeliverable(Exception):
    """A permanent failure: retrying cannot help (no address, a mailbox refused with 5xx)."""


@dataclass(frozen=True)
class SmtpConfig:
    hostname: str
    port: int
    username: str | None = None
    password: str | None = None
    use_tls: bool = False           # implicit TLS (smtps://)
    start_tls: bool | None = None   # True: required, False: never, None: if offered
    validate_certs: bool = True
    timeout: float = DEFAULT_TIMEOUT


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"GATE_SMTP_URL: {name}={raw!r} is not a boolean")


def parse_smtp_url(url: str) -> SmtpConfig:
    """GATE_SMTP_URL → connection parameters (the rule is in the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError(f"GATE_SMTP_URL must start with smtp:// or smtps://, not {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("GATE_SMTP_URL has no host")
    query = {k.lower(): v for k, v in parse_qsl(parts.query, keep_blank_values=True)}
    implicit = parts.scheme == "smtps"
    port = parts.port or (465 if implicit else 25)
    start_tls: bool | None
    if implicit:
        start_tls = False  # already encrypted; STARTTLS inside TLS is an error
    elif "starttls" in query:
        start_tls = _flag("starttls", query["starttls"])
    elif port == 587:
        start_tls = True  # the submission port: STARTTLS is the norm, refuse to send in clear
    else:
        start_tls = None
    try:
        timeout = float(query.get("timeout", str(DEFAULT_TIMEOUT)))
    except ValueError:
        raise ValueError(f"GATE_SMTP_URL: timeout={query['timeout']!r} is not a number") from None
    return SmtpConfig(
        hostname=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        use_tls=implicit,
        start_tls=start_tls,
        validate_certs=_flag("verify", query["verify"]) if "verify" in query else True,
        timeout=timeout,
    )


class MailSender(Protocol):
    async def send(self, message: EmailMessage) -> None:
        """Deliver one message to its To: recipients; raise Undeliverable when a retry cannot help."""


class SmtpSender:
    """One SMTP connection per message: alerts and sign-in links are rare, and a connection
    that is not kept cannot go stale while the server restarts."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config

    async def send(self, message: EmailMessage) -> None:
        c = self.config
        try:
            await aiosmtplib.send(
                message, hostname=c.hostname, port=c.port, username=c.username,
                password=c.password, use_tls=c.use_tls, start_tls=c.start_tls,
                validate_certs=c.validate_certs, timeout=c.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            # A 5xx to RCPT is the mailbox saying "never"; a 4xx (greylisting, full) is retried.
            if exc.recipients and all(500 <= r.code < 600 for r in exc.recipients):
                raise Undeliverable("; ".join(f"{r.code} {r.message}" for r in exc.recipients)) from exc
            raise
        except aiosmtplib.SMTPRecipientRefused as exc:
            if 500 <= exc.code < 600:
                raise Undeliverable(f"{exc.code} {exc.message}") from exc
            raise


def smtp_sender(url: str | None) -> SmtpSender | None:
    """The sender of GATE_SMTP_URL, or None when it is unset (e-mail is off);
    ValueError when it is malformed."""
    return SmtpSender(parse_smtp_url(url)) if url else None


def usable_address(raw: str | None) -> str | None:
    """The bare address when ``raw`` is a usable one ("Ana <ana@x.org>" → "ana@x.org"), else None."""
    if not raw:
        return None
    address = parseaddr(raw)[1].strip()
    if not address or "@" not in address or any(c.isspace() for c in address):
        return None
    local, _, domain = address.rpartition("@")
    return address if local and "." in domain.strip(".") else None
