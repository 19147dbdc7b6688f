"""Errors users read: OpenAI-shaped, in the gate's language, with nothing left in English."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from extproc.errors import REFUSALS, Messages


@pytest.mark.parametrize("detail,shown", [
    ("token expired", "token expirado"),
    ("X-User-Id is an unexpanded placeholder", "X-User-Id é um marcador não substituído"),
    ("email contains control characters", "email contém caracteres de controle"),
    ("something new", "something new"),
])
def test_identity_refusals_are_shown_in_the_gate_language(detail: str, shown: str) -> None:
    assert f"({shown})" in Messages("pt-BR").unauthorized(detail).message
    assert f"({detail})" in Messages("en").unauthorized(detail).message


def test_every_refusal_the_code_raises_has_both_languages() -> None:
    source = "".join(p.read_text() for p in (Path(__file__).parent.parent / "extproc").rglob("*.py"))
    raised = set(re.findall(r'Refusal\("([a-z_]+)"', source)) | set(re.findall(r'refused\("([a-z_]+)"', source))
    assert raised and raised <= set(REFUSALS["pt-BR"]) == set(REFUSALS["en"])


def test_refusal_and_internal_error_bodies() -> None:
    error = Messages("pt-BR").refused("model_list", "a,b")
    body = json.loads(error.body())["error"]
    assert (error.status, body["type"], body["code"]) == (400, "invalid_request_error", "model_list")
    assert body["message"].startswith("Requisição inválida: uma lista de modelos ('a,b')")
    internal = json.loads(Messages("pt-BR").internal().body())["error"]
    assert internal["code"] == "internal_error" and "Nada foi cobrado" in internal["message"]
    assert "Nothing was charged" in Messages("en").internal().message


def test_the_renewal_day_is_written_the_readers_way() -> None:
    from datetime import UTC, datetime

    end = datetime(2026, 2, 1, tzinfo=UTC)
    assert "O saldo renova em 01/02/2026." in Messages("pt-BR").quota_exceeded(0, 10, end).message
    assert "renews on February 1, 2026." in Messages("en").quota_exceeded(0, 10, end).message
