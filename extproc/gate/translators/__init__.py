"""One translator per OpenAI API schema, found by the request's path."""

from __future__ import annotations

from .base import Limits, Translator
from .chat import Chat
from .completions import Completions
from .embeddings import Embeddings
from .responses import Responses

TRANSLATORS: tuple[Translator, ...] = (Chat(), Completions(), Embeddings(), Responses())
# Metered endpoints, with and without /v1: path -> its schema's translator.
BY_PATH: dict[str, Translator] = {path: t for t in TRANSLATORS for path in t.paths}

__all__ = ["BY_PATH", "TRANSLATORS", "Limits", "Translator"]
