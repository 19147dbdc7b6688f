"""/v1/embeddings: input only; no completion is produced, none is reserved."""

from __future__ import annotations

from .. import billable
from .base import Translator


class Embeddings(Translator):
    kind = "embeddings"
    paths = ("/v1/embeddings", "/embeddings")
    fields = billable.EMBEDDINGS_FIELDS
    produces_completions = False
