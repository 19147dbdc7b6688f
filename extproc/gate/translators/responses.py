"""/v1/responses: input items, instructions, server-side context; usage inside the response
object (``response.usage`` in the stream's ``response.completed`` event)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import billable
from ..billable import Count
from ..usage import Observed
from .base import Translator


class Responses(Translator):
    kind = "responses"
    paths = ("/v1/responses", "/responses")
    fields = billable.RESPONSES_FIELDS
    limit_key = "max_output_tokens"
    limit_keys = ("max_output_tokens",)

    def count(self, body: Mapping[str, object], server_context_tokens: int) -> Count:
        template = body.get("prompt")
        if not isinstance(template, Mapping):
            return billable.count_inputs(body, server_context_tokens)
        # A stored prompt template: its text is server-side, its variables are ours to see.
        count = billable.count_inputs(body, server_context_tokens, skip=frozenset({"prompt"}))
        count.tokens += server_context_tokens
        billable.walk(template.get("variables"), count, server_context_tokens)
        return count

    def usage_of(self, data: dict[str, Any], cap: int) -> Observed | None:
        if data.get("usage") is None and isinstance(data.get("response"), dict):
            data = data["response"]  # the stream's response.completed carries it there
        return super().usage_of(data, cap)

    def text_of(self, data: dict[str, Any]) -> str:
        delta = data.get("delta")
        if data.get("type") == "response.output_text.delta" and isinstance(delta, str):
            return delta
        return ""
