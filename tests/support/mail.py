"""The one SMTP server the tests send to: a real aiosmtpd server on a free port that keeps
every accepted message, used through conftest's ``smtp`` fixture (or started by hand where a
test needs it late, on a given port, or with TLS and AUTH).
"""

from __future__ import annotations

import asyncio
import email
import re
import threading
import time
from email import policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from extproc.app import Service
from extproc.settings import Settings
from extproc_dev.devstack import free_port

LOGIN = (b"gate", b"p@ss:w/rd")  # the only credentials a server started with an authenticator accepts


class Mailbox:
    """aiosmtpd handler: keeps every accepted message; answers 550 to addresses in ``refuse``."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []
        self.refuse: set[str] = set()
        self.logins: list[tuple[bytes, bytes]] = []
        self.ciphers: list[Any] = []  # the TLS cipher of each message's connection (None: clear text)
        self._lock = threading.Lock()  # the server runs in its own thread

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.original_content or envelope.content, policy=policy.default)
        with self._lock:
            self.messages.append((list(envelope.rcpt_tos), msg))  # type: ignore[arg-type]
            self.ciphers.append(server.transport.get_extra_info("cipher"))
        return "250 Message accepted"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        self.logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=(auth_data.login, auth_data.password) == LOGIN)

    def to(self, address: str) -> list[EmailMessage]:
        """The messages delivered to ``address`` (an envelope recipient), oldest first."""
        with self._lock:
            return [m for rcpts, m in self.messages if address in rcpts]

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    async def wait_for(self, address: str, count: int = 1, within: float = 10.0) -> EmailMessage:
        """The ``count``-th message to ``address``, once it has arrived (mail is sent off the
        request's path)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = self.to(address)
            if len(found) >= count:
                return found[count - 1]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no e-mail #{count} to {address}")


class SmtpServer:
    """A real SMTP server in its own thread. ``kwargs`` go to aiosmtpd's Controller (TLS, AUTH);
    ``authenticator=True`` checks logins against ``LOGIN``."""

    def __init__(self, port: int | None = None, **kwargs: Any) -> None:
        self.mailbox = Mailbox()
        self.port = port or free_port()
        self.kwargs = kwargs
        self.controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def start(self) -> SmtpServer:
        if "authenticator" in self.kwargs:
            self.kwargs["authenticator"] = self.mailbox.authenticate
        self.controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port, **self.kwargs)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


def text_of(msg: EmailMessage) -> str:
    return msg.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]


def html_of(msg: EmailMessage) -> str:
    return msg.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]


def link_in(message: EmailMessage) -> str:
    """The /me sign-in link in a message's plain-text body."""
    body = message.get_body(("plain",))
    assert body is not None
    found = re.search(r"(https?://\S+/me/login\?token=\S+)", body.get_content())
    assert found, body.get_content()
    return found.group(1)


async def start_mail_service(settings: Settings, smtp: SmtpServer, language: str) -> Service:
    """A second processor whose links point at itself and whose mail goes to ``smtp``."""
    port = free_port()
    svc = Service(settings.replace(smtp_url=smtp.url, http_port=port,
                                   public_url=f"http://127.0.0.1:{port}", language=language))
    await svc.start()
    return svc
