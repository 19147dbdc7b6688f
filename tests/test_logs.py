"""Logs: one JSON object per line with the request's facts, and never a secret."""

from __future__ import annotations

import json
import logging

from support.gate import settled
from support.stack import ADMIN_TOKEN, GATE_KEY, JWT_SECRET

from extproc.identity import mint_token
from extproc.logs import JsonFormatter


async def test_decisions_are_logged_as_json_without_secrets(http, envoy, service, settings, user, caplog):
    token = mint_token(settings, user, email="secret-person@example.com")
    bad = token[:-3] + "xyz"
    caplog.set_level(logging.INFO)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a private question"}]}
    for headers in ({"authorization": f"Bearer {token}", "x-request-id": "req-log-1"},
                    {"authorization": f"Bearer {bad}"},
                    {"authorization": f"Bearer {GATE_KEY}", "x-user-id": user},
                    {"authorization": "Bearer wrong-gate-key", "x-user-id": user}):
        async with http.post(envoy.url + "/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.read()
    await settled(service)  # an admitted exchange's line is written when it settles
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    parsed = [json.loads(line) for line in lines]
    decisions = [p for p in parsed if p["msg"] == "decision"]
    allowed = [p for p in decisions if p.get("request_id") == "req-log-1"]
    assert allowed and allowed[0]["decision"] == "allowed" and allowed[0]["user_id"] == user
    assert allowed[0]["latency_ms"] >= 0 and allowed[0]["estimate"] > 0
    assert {"401"} <= {p["decision"] for p in decisions}
    text = "\n".join(lines)
    for secret in (token, bad, GATE_KEY, JWT_SECRET, ADMIN_TOKEN, "wrong-gate-key", "a private question"):
        assert secret not in text
