"""What every API schema's translator does, and the defaults most schemas share.

A translator owns everything one OpenAI API schema knows: where its billable inputs are
and how many completions a request asks for (the estimate), the body mutations the gate
makes (``include_usage`` on streams, a completion limit), and where the answer keeps its
usage and its visible text (JSON and SSE alike). The money decisions are not here: they
are made in ``gate.decisions`` on the plain values a translator returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import billable
from ..billable import Count, Estimate
from ..usage import Observed, read_usage


@dataclass(frozen=True)
class Limits:
    """The deployment's estimate settings a translator needs."""

    default_completion: int
    max_completion: int
    server_context_tokens: int
    extra_fields: frozenset[str] = frozenset()  # GATE_EXTRA_BODY_FIELDS


class Translator:
    kind: ClassVar[str]
    paths: ClassVar[tuple[str, ...]]
    # The top-level request fields of this schema; any other key is refused (billable).
    fields: ClassVar[frozenset[str]]
    # False for schemas that produce no completion (embeddings): no allowance is reserved, and
    # their usage has a prompt count alone (the others' have both counts: usage.read_usage).
    produces_completions: ClassVar[bool] = True
    # Streams of this schema report usage only when asked (stream_options.include_usage).
    asks_for_stream_usage: ClassVar[bool] = False
    # The field a completion limit is written to when GATE_ENFORCE_MAX_TOKENS adds one.
    limit_key: ClassVar[str] = "max_tokens"
    # The fields of this schema that really bound an answer's length upstream (another schema's
    # field is dropped by LiteLLM, drop_params): what makes a stream "bounded" (gate.handoff).
    limit_keys: ClassVar[tuple[str, ...]] = ("max_tokens",)

    # ------------------------------------------------------------ request

    def estimate(self, body: Mapping[str, object], limits: Limits) -> Estimate:
        """The estimate of a parsed request body; raises ``billable.Refusal`` for what cannot
        be accounted for."""
        billable.check_fan_out(body)
        billable.check_fields(body, self.fields, limits.extra_fields)
        allowance = billable.completion_allowance(body, limits.default_completion, limits.max_completion)
        count = self.count(body, limits.server_context_tokens)
        if not self.produces_completions:
            return Estimate(count.chars, count.tokens, 0, 1)
        return Estimate(count.chars, count.tokens, allowance, self.completions(body))

    def count(self, body: Mapping[str, object], server_context_tokens: int) -> Count:
        return billable.count_inputs(body, server_context_tokens)

    def completions(self, body: Mapping[str, object]) -> int:
        """How many completions one request produces and the provider bills."""
        return 1

    def mutate(self, body: dict[str, Any], *, stream: bool, enforce_limit: bool,
               default_completion: int) -> bool:
        """Rewrite ``body`` in place for the upstream; True when it changed."""
        changed = False
        if stream and self.asks_for_stream_usage:
            options = body.get("stream_options")
            if not isinstance(options, dict):
                options = {}
            if options.get("include_usage") is not True:
                body["stream_options"] = {**options, "include_usage": True}
                changed = True
        if enforce_limit and self.produces_completions:
            if all(body.get(k) is None for k in billable.MAX_TOKEN_KEYS):
                body[self.limit_key] = default_completion
                changed = True
        return changed

    # ------------------------------------------------------------ response (a Reader)

    def usage_of(self, data: dict[str, Any], cap: int) -> Observed | None:
        """The usage in one JSON body or SSE event, or None."""
        usage = data.get("usage")
        return None if usage is None else read_usage(usage, cap, pair=self.produces_completions)

    def text_of(self, data: dict[str, Any]) -> str:
        """The visible output in one JSON body or SSE event."""
        return ""

    # ------------------------------------------------------------ in-chat notices

    def notice_allowed(self, body: Mapping[str, object]) -> bool:
        """Whether an answer to this request may carry an in-chat notice (docs/notices.md):
        only a schema that shows plain text in a chat says yes."""
        return False

    def append_notice(self, data: dict[str, Any], notice: str) -> bool:
        """Append ``notice`` to a buffered JSON answer in place; False (``data`` untouched)
        when the answer is not one plain-text reply."""
        return False

    def notice_event(self, events: list[dict[str, Any]], notice: str) -> dict[str, Any] | None:
        """One more event of this stream (``events``: its decoded ``data:`` events) carrying
        ``notice``; None when the stream is not one plain-text reply."""
        return None


def choice_texts(data: dict[str, Any], *fields: str) -> str:
    """Text of the ``choices`` of a chat or completions body or chunk: ``fields`` are the
    holders (``delta``, ``message``) whose ``content`` counts, or ``text`` itself."""
    parts: list[str] = []
    choices = data.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            for name in fields:
                value = choice.get(name)
                if name == "text" and isinstance(value, str):
                    parts.append(value)
                elif isinstance(value, dict) and isinstance(value.get("content"), str):
                    parts.append(value["content"])
    return "".join(parts)
