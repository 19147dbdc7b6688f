"""The message catalogue: every text a user or an admin reads, in each language, from one file.

``extproc/templates/i18n.json`` holds ``{language: {key: text}}``; keys are dotted by where the
text appears, e.g. ``gate.*`` (the gate's errors in the chat), ``refusal.*`` (why a request
was refused), ``identity.*`` (why an identity was), ``billing.*`` (buying credits),
``reason.*`` (ledger reasons written by the system), and the console's and /me's sections
(``nav.*``, ``user.*``, ``me.*``...). Texts are ``str.format`` templates: ``{name}``
placeholders, filled with values already formatted by ``extproc.formats``.

Whole documents (the alert e-mails) are translated as documents, one template per language in
``templates/email``; they use the same formatters. Pure apart from reading the file once.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CATALOGUE_FILE", "DEFAULT_LANGUAGE", "FALLBACK_LANGUAGE", "LANGUAGES", "Catalogue", "catalogue",
           "supported"]

LANGUAGES = ("pt-BR", "en")  # what GATE_LANGUAGE may be
DEFAULT_LANGUAGE = "pt-BR"
FALLBACK_LANGUAGE = "en"  # a text missing in a language shows in English, never as its key
CATALOGUE_FILE = Path(__file__).resolve().parent / "templates" / "i18n.json"


def supported(language: str) -> str:
    """``language`` if the catalogue has it, else the default."""
    return language if language in LANGUAGES else DEFAULT_LANGUAGE


class Catalogue:
    def __init__(self, texts: Mapping[str, Mapping[str, str]]) -> None:
        missing = [lang for lang in LANGUAGES if lang not in texts]
        if missing:
            raise ValueError(f"message catalogue without {', '.join(missing)}")
        fallback = texts[FALLBACK_LANGUAGE]
        self._texts = {lang: {**fallback, **texts[lang]} for lang in LANGUAGES}

    @classmethod
    def load(cls, path: Path = CATALOGUE_FILE) -> Catalogue:
        with path.open(encoding="utf-8") as fh:
            return cls(json.load(fh))

    def texts(self, language: str) -> Mapping[str, str]:
        """Every text of ``language`` (an unknown language reads the default one)."""
        return self._texts[supported(language)]

    def section(self, language: str, prefix: str) -> dict[str, str]:
        """The texts under ``prefix.``, keyed without it: section("en", "billing")["buy"]."""
        start = prefix + "."
        return {k[len(start):]: v for k, v in self.texts(language).items() if k.startswith(start)}

    def has(self, key: str) -> bool:
        return key in self._texts[FALLBACK_LANGUAGE]

    def text(self, language: str, key: str, **params: Any) -> str:
        """The text of ``key`` with ``params`` filled in; the key itself if the catalogue lacks it."""
        text = self.texts(language).get(key, key)
        return text.format(**params) if params else text


@functools.cache
def catalogue() -> Catalogue:
    """The catalogue file, read once per process."""
    return Catalogue.load()
