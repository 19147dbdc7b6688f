"""The `extproc` command: the verbs of the README's command table, run in-process and as a real
console script, against the test database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import jwt
import pytest
from support.stack import JWT_SECRET

from extproc import cli


@pytest.fixture
def env(settings, monkeypatch) -> dict[str, str]:
    values = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
              "GATE_JWT_SECRET": JWT_SECRET, "GATE_DEFAULT_MONTHLY_TOKENS": "100000"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_token_is_a_verifiable_librechat_shaped_jwt(env, capsys, monkeypatch):
    # --admin mints what the configured admin rule accepts (none is configured by default)
    monkeypatch.setenv("GATE_ADMIN_CLAIM", "role")
    monkeypatch.setenv("GATE_ADMIN_CLAIM_VALUE", "admin")
    code, out, _ = run(capsys, "token", "ana", "--email", "ana@example.com", "--admin")
    assert code == 0
    claims = jwt.decode(out.strip(), JWT_SECRET, algorithms=["HS256"])
    assert (claims["id"], claims["email"], claims["role"]) == ("ana", "ana@example.com", "admin")


def test_token_admin_without_a_rule_exits_2(env, capsys, monkeypatch):
    for key in ("GATE_ADMIN_USERS", "GATE_ADMIN_CLAIM", "GATE_ADMIN_CLAIM_VALUE"):
        monkeypatch.delenv(key, raising=False)
    code, out, err = run(capsys, "token", "ana", "--admin")
    assert (code, out) == (2, "")
    assert err.startswith("error: cannot mint a token: ") and "GATE_ADMIN_USERS" in err
    assert "Traceback" not in err
    # a user listed in GATE_ADMIN_USERS gets a token (admin by its id, no claim needed)
    monkeypatch.setenv("GATE_ADMIN_USERS", "ops, ana")
    code, out, _ = run(capsys, "token", "ana", "--admin")
    assert code == 0 and jwt.decode(out.strip(), JWT_SECRET, algorithms=["HS256"])["id"] == "ana"


def test_token_without_a_secret_exits_2(env, capsys, monkeypatch):
    monkeypatch.delenv("GATE_JWT_SECRET")
    code, out, err = run(capsys, "token", "ana")
    assert (code, out) == (2, "") and "GATE_JWT_SECRET" in err


def test_grant_balance_suspend_plan_reconcile(env, capsys, service):
    user = f"cli-{uuid.uuid4().hex[:8]}"
    code, _, err = run(capsys, "grant", user, "100", "--reason", "welcome")
    assert code == 1 and "unknown user" in err
    # the account exists once the user made a request; open it the way a request would
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from extproc.ledger import Ledger, create_pool
    from extproc.settings import Settings

    async def open_account() -> None:
        pool = await create_pool(Settings.from_env(), min_size=1, max_size=1)
        await Ledger(pool, Settings.from_env()).admit(user, 0, uuid.uuid4().hex)
        await pool.close()

    with ThreadPoolExecutor(1) as ex:
        ex.submit(asyncio.run, open_account()).result()

    code, out, _ = run(capsys, "grant", user, "2500", "--reason", "welcome", "--idempotency-key", "k1")
    assert code == 0 and json.loads(out)["credits"] == 2500 and json.loads(out)["applied"]
    code, out, _ = run(capsys, "grant", user, "2500", "--reason", "welcome", "--idempotency-key", "k1")
    assert json.loads(out)["applied"] is False
    code, _, err = run(capsys, "grant", user, "10", "--reason", "  ")
    assert code == 2 and "reason" in err

    code, out, _ = run(capsys, "balance", user, "--json")
    data = json.loads(out)
    assert code == 0
    assert {k: data[k] for k in ("user_id", "available", "allowance", "credits", "reserved", "state")} == {
        "user_id": user, "available": 102_500, "allowance": 100_000, "credits": 2500, "reserved": 0,
        "state": "active"}
    assert data["used_pct"] == 0.0
    code, out, _ = run(capsys, "balance", user)
    assert "available: 102500" in out

    assert json.loads(run(capsys, "suspend", user, "--reason", "abuse")[1])["state"] == "suspended"
    assert json.loads(run(capsys, "unsuspend", user, "--reason", "ok")[1])["state"] == "active"

    code, out, _ = run(capsys, "plan", "create", "pro", "--monthly-tokens", "5000000", "--rpm", "300")
    assert json.loads(out) == {"name": "pro", "monthly_tokens": 5_000_000, "requests_per_minute": 300,
                               "rollover": False}
    code, out, _ = run(capsys, "plan", "list")
    assert "pro" in {json.loads(line)["name"] for line in out.splitlines()}
    code, out, _ = run(capsys, "plan", "assign", user, "pro", "--reason", "upgrade")
    assert code == 0 and json.loads(out)["plan"] == "pro"
    code, _, err = run(capsys, "plan", "assign", user, "nope", "--reason", "x")
    assert code == 1 and "unknown plan" in err

    code, _, err = run(capsys, "reconcile")
    assert code == 0 and "0 account(s) with drift" in err
    code, out, _ = run(capsys, "calibrate", "--days", "7")
    assert code == 0 and json.loads(out)["current_factor"] == 0.376


def test_allowance_erase_and_balance_show_the_user_side(env, capsys):
    """`extproc allowance USER TOKENS|default`, `extproc erase USER` (prints the pseudonym) and
    `extproc balance` showing the personal cap and the effective limit."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from extproc.ledger import Ledger, create_pool
    from extproc.settings import Settings

    user = f"cli-{uuid.uuid4().hex[:8]}"

    async def open_capped() -> None:
        pool = await create_pool(Settings.from_env(), min_size=1, max_size=1)
        ledger = Ledger(pool, Settings.from_env())
        await ledger.admit(user, 0, uuid.uuid4().hex, email=f"{user}@example.com", name="Ana")
        await ledger.set_settings(user, personal_cap=30_000, actor=f"user:{user}")
        await pool.close()

    code, _, err = run(capsys, "allowance", user, "5000", "--reason", "lead")
    assert code == 1 and "unknown user" in err
    with ThreadPoolExecutor(1) as ex:
        ex.submit(asyncio.run, open_capped()).result()

    data = json.loads(run(capsys, "balance", user, "--json")[1])
    assert (data["budget"], data["personal_cap"], data["effective_limit"]) == (100_000, 30_000, 30_000)
    code, out, _ = run(capsys, "balance", user)
    assert "personal_cap: 30000" in out and "effective_limit: 30000" in out

    code, out, _ = run(capsys, "allowance", user, "250000", "--reason", "team lead")
    assert code == 0 and json.loads(out)["allowance_override"] == 250_000
    assert json.loads(out)["allowance"] == 100_000  # from the next cycle, like a plan change
    code, out, _ = run(capsys, "allowance", user, "default", "--reason", "back to the plan")
    assert code == 0 and json.loads(out)["allowance_override"] is None
    for bad in ("-5", "lots", "1.5"):
        code, out, err = run(capsys, "allowance", user, bad, "--reason", "x")
        assert (code, out) == (2, "") and "TOKENS" in err
    code, _, err = run(capsys, "allowance", user, "5", "--reason", " ")
    assert code == 2 and "reason" in err

    code, _, err = run(capsys, "erase", user, "--reason", "")
    assert code == 2 and "reason" in err
    code, out, err = run(capsys, "erase", user, "--reason", "LGPD request")
    pseudonym = out.strip()
    assert code == 0 and pseudonym.startswith("erased-") and err == ""
    assert run(capsys, "balance", user)[0] == 1
    data = json.loads(run(capsys, "balance", pseudonym, "--json")[1])
    assert (data["email"], data["name"], data["allowance"]) == (None, None, 100_000) and data["erased_at"]
    code, _, err = run(capsys, "erase", user, "--reason", "again")
    assert code == 1 and "already erased" in err
    code, _, err = run(capsys, "reconcile")
    assert code == 0


def test_reconcile_reports_drift(env, capsys, make_database, monkeypatch):
    database = make_database()
    monkeypatch.setenv("DATABASE_URL", database)
    import asyncio

    import asyncpg

    async def corrupt() -> None:
        conn = await asyncpg.connect(database)
        await conn.execute(
            "INSERT INTO accounts (user_id, cycle_anchor_day, cycle_start, cycle_end, allowance)"
            " VALUES ('drifter', 1, now(), now() + interval '1 month', 500)")
        await conn.close()

    asyncio.run(corrupt())
    code, out, err = run(capsys, "reconcile")
    assert code == 1 and "drifter" in out and "1 account(s) with drift" in err


def test_bad_configuration_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("GATE_FAIL_MODE", "sometimes")
    code, _, err = run(capsys, "reconcile")
    assert code == 2 and "GATE_FAIL_MODE" in err


def test_console_script_and_migrate_status(env):
    """The installed `extproc` entry point runs as operators call it."""
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "extproc"), "migrate", "status"],
                            capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "[X] 20261125000001_ledger.sql" in result.stdout
