"""/v1/completions (legacy): a prompt or a list of prompts, ``n`` and ``best_of`` each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import billable
from .base import Translator, choice_texts


class Completions(Translator):
    kind = "completions"
    paths = ("/v1/completions", "/completions")
    fields = billable.COMPLETIONS_FIELDS
    asks_for_stream_usage = True

    def completions(self, body: Mapping[str, object]) -> int:
        n = billable.count_field(body, "n", 1, billable.MAX_CHOICES) or 1
        # best_of completions are generated server-side (and billed); n of them returned
        best_of = billable.count_field(body, "best_of", 1, billable.MAX_BEST_OF) or 1
        prompts = body.get("prompt")
        count = 1
        if isinstance(prompts, list) and prompts and not billable.is_token_ids(prompts):
            count = len(prompts)  # a list of prompts: each gets its own completions
        return max(n, best_of) * count

    def text_of(self, data: dict[str, Any]) -> str:
        return choice_texts(data, "text")
