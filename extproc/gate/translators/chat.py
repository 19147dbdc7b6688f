"""/v1/chat/completions: messages in, ``n`` choices out, usage on request in streams."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import billable
from .base import Translator, choice_texts

# What a notice's extra stream chunk copies from the stream's own chunks, so a client that
# checks them (one id per answer) reads it as part of the same answer.
_CHUNK_IDENTITY = ("id", "object", "created", "model", "system_fingerprint")


class Chat(Translator):
    kind = "chat"
    paths = ("/v1/chat/completions", "/chat/completions")
    fields = billable.CHAT_FIELDS
    asks_for_stream_usage = True
    limit_keys = ("max_tokens", "max_completion_tokens")

    def completions(self, body: Mapping[str, object]) -> int:
        return billable.count_field(body, "n", 1, billable.MAX_CHOICES) or 1

    def text_of(self, data: dict[str, Any]) -> str:
        return choice_texts(data, "delta", "message")

    # ------------------------------------------------------------ in-chat notices

    def notice_allowed(self, body: Mapping[str, object]) -> bool:
        # One choice only (n > 1 is skipped: which of the answers would say it?), and text
        # only: a JSON answer (response_format json_object / json_schema) must stay parseable.
        # Tools are allowed here; the answer decides (a tool call never gets one).
        if body.get("n") not in (None, 1):
            return False
        fmt = body.get("response_format")
        return fmt is None or (isinstance(fmt, Mapping) and fmt.get("type") == "text")

    def append_notice(self, data: dict[str, Any], notice: str) -> bool:
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            return False
        message = choices[0].get("message")
        if not isinstance(message, dict) or message.get("tool_calls") or message.get("function_call"):
            return False
        content = message.get("content")
        if not isinstance(content, str) or not content:
            return False
        message["content"] = f"{content}\n\n{notice}"
        return True

    def notice_event(self, events: list[dict[str, Any]], notice: str) -> dict[str, Any] | None:
        template: dict[str, Any] | None = None
        text_seen = False
        for event in events:
            if "error" in event:
                return None
            choices = event.get("choices")
            if not isinstance(choices, list):
                continue
            for choice in choices:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    return None
                delta = choice.get("delta")
                if not isinstance(delta, dict):
                    continue
                if delta.get("tool_calls") or delta.get("function_call"):
                    return None
                text_seen = text_seen or bool(isinstance(delta.get("content"), str) and delta["content"])
            if choices and template is None:
                template = event
        if template is None or not text_seen:
            return None
        chunk = {k: template[k] for k in _CHUNK_IDENTITY if k in template}
        chunk["choices"] = [{"index": 0, "delta": {"content": f"\n\n{notice}"}, "finish_reason": None}]
        return chunk
