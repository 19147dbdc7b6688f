"""What an alert says: its e-mails (user and admins) and its webhook payload: the user's
e-mail in the user's language (``accounts.language``) when they chose one, everything else in
the gate's (GATE_LANGUAGE). Nothing here sends anything (``mail``, ``alerts.webhook``) or touches the database.

Templates are Jinja2 files in extproc/templates/email, one per message, language and part:
``<message>.<language>.txt`` (its ``subject`` is a ``{% set %}`` block) and ``.html``
(autoescaped: a user's name is data, never markup); ``webhook.<language>.txt`` is the
payload's one-line ``text``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from ..formats import fmt_date_text, fmt_int, fmt_number
from ..settings import Settings

__all__ = ["Alert", "AlertTemplates", "event_id"]

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates" / "email"


@dataclass(frozen=True)
class Alert:
    """One threshold crossing, as the outbox row recorded it."""

    outbox_id: int
    user_id: str
    email: str | None
    name: str | None
    threshold: int
    used_pct: float
    used: int
    budget: int
    remaining: int
    cycle_start: datetime
    cycle_end: datetime
    created_at: datetime
    language: str | None = None  # the account's own (accounts.language); None: the deployment's
    # The user's personal cap now; the alert was measured against it when its budget equals it
    # (the effective limit is the lower of the cycle's budget and the cap).
    personal_cap: int | None = None

    @property
    def capped(self) -> bool:
        return self.personal_cap is not None and self.budget == self.personal_cap

    @property
    def blocked(self) -> bool:
        return self.threshold >= 100


class AlertTemplates:
    """Renders alerts for one deployment (its language, public URL and admins)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.language = settings.language
        base = settings.public_url.rstrip("/")
        self.me_url = base + "/me"
        self.admin_url = base + "/admin"
        self.admins = settings.admin_email_list()
        self._envs: dict[str, Environment] = {}
        self.env = self._env(self.language)

    def _env(self, lang: str) -> Environment:
        """The templates with number and date filters of one language (one per language)."""
        env = self._envs.get(lang)
        if env is None:
            env = Environment(
                loader=FileSystemLoader(TEMPLATE_DIR),
                autoescape=select_autoescape(["html"], default_for_string=False, default=False),
                undefined=StrictUndefined,  # a typo in a template fails the attempt, visibly
                trim_blocks=True,
                lstrip_blocks=True,
                keep_trailing_newline=True,
            )
            env.filters.update(num=lambda v: fmt_int(v, lang), pct=lambda v: fmt_number(v, lang),
                               date=lambda v: fmt_date_text(v, lang))
            self._envs[lang] = env
        return env

    def language_for(self, alert: Alert, audience: str) -> str:
        """The user's e-mail speaks the user's language when they chose one; the admins' e-mail
        and the webhook speak the deployment's."""
        return alert.language if audience == "user" and alert.language else self.language

    def context(self, alert: Alert, language: str | None = None) -> dict[str, Any]:
        return {
            "lang": language or self.language,
            "user_id": alert.user_id,
            "name": alert.name or "",
            "email": alert.email or "",
            "threshold": alert.threshold,
            "used_pct": alert.used_pct,
            "used": alert.used,
            "budget": alert.budget,
            "remaining": max(alert.remaining, 0),  # overspend shows as 0, not a negative balance
            "cycle_start": alert.cycle_start,
            "cycle_end": alert.cycle_end,
            "blocked": alert.blocked,
            "capped": alert.capped,
            "me_url": self.me_url,
            "admin_url": self.admin_url,
            "admin_contacts": self.admins,
            "billing": bool(self.settings.stripe_secret_key),
        }

    def render(self, message: str, alert: Alert, language: str | None = None) -> tuple[str, str, str]:
        """(subject, text, html) of ``message`` ("user_alert" or "admin_alert") in ``language``
        (default: the deployment's)."""
        lang = language or self.language
        env = self._env(lang)
        ctx = self.context(alert, lang)
        module = env.get_template(f"{message}.{lang}.txt").make_module(ctx)
        subject = " ".join(str(module.subject).split())  # one line: it becomes a header
        html = env.get_template(f"{message}.{lang}.html").render(ctx, subject=subject)
        return subject, str(module), html

    def email(self, alert: Alert, audience: str, recipient: str, *, delivery_id: int,
              now: datetime) -> EmailMessage:
        """The e-mail of one delivery: ``audience`` "user" (the account's owner) or "admin"."""
        language = self.language_for(alert, audience)
        subject, text, html = self.render("user_alert" if audience == "user" else "admin_alert", alert, language)
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = self.settings.mail_from
        msg["To"] = recipient
        if audience == "user" and self.admins:
            msg["Reply-To"] = ", ".join(self.admins)  # "contact the admin" is a reply away
        msg["Date"] = format_datetime(now.astimezone(UTC))
        domain = parseaddr(self.settings.mail_from)[1].rpartition("@")[2] or "localhost"
        # Stable across retries: a duplicate after a crash mid-send can be recognised.
        msg["Message-ID"] = f"<solaris-alert-{alert.outbox_id}.{delivery_id}@{domain}>"
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies
        msg.set_content(text)
        msg.add_alternative(html, subtype="html")
        msg["Content-Language"] = language  # after the body: set_content drops Content-* headers
        return msg

    def webhook_payload(self, alert: Alert) -> dict[str, Any]:
        text = self.env.get_template(f"webhook.{self.language}.txt").render(self.context(alert)).strip()
        return {
            "id": event_id(alert),
            "type": "quota.threshold_crossed",
            "text": text,
            "threshold": alert.threshold,
            "blocked": alert.blocked,
            "user": {"id": alert.user_id, "email": alert.email, "name": alert.name},
            "used": alert.used,
            "budget": alert.budget,
            "remaining": alert.remaining,
            "used_pct": alert.used_pct,
            "cycle_start": alert.cycle_start.isoformat(),
            "cycle_end": alert.cycle_end.isoformat(),
            "created_at": alert.created_at.isoformat(),
            "admin_url": self.admin_url,
        }

    def webhook_body(self, alert: Alert) -> bytes:
        """The payload as the bytes that are signed and posted."""
        return json.dumps(self.webhook_payload(alert), ensure_ascii=False, separators=(",", ":")).encode()


def event_id(alert: Alert) -> str:
    """The alert's id for receivers, the same on every attempt (they drop duplicates by it)."""
    return f"alert-{alert.outbox_id}"
