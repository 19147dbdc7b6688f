"""/v1/chat/completions: messages in, ``n`` choices out, usage on request in streams."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import billable
from .base import Translator, choice_texts


class Chat(Translator):
    kind = "chat"
    paths = ("/v1/chat/completions", "/chat/completions")
    asks_for_stream_usage = True

    def completions(self, body: Mapping[str, object]) -> int:
        return billable.count_field(body, "n", 1, billable.MAX_CHOICES) or 1

    def text_of(self, data: dict[str, Any]) -> str:
        return choice_texts(data, "delta", "message")
