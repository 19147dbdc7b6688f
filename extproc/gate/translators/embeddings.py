"""/v1/embeddings: input only; no completion is produced, none is reserved."""

from __future__ import annotations

from .base import Translator


class Embeddings(Translator):
    kind = "embeddings"
    paths = ("/v1/embeddings", "/embeddings")
    produces_completions = False
