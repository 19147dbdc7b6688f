"""The `extproc` command: serve, migrate, dev, token, grant, balance,
reconcile, calibrate, plus plan, suspend, unsuspend, allowance, erase, worker, backup, restore."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import logs
from .identity import mint_token
from .ledger import Ledger, UnknownPlan, UnknownUser, create_pool
from .migrate import migrate
from .settings import Settings


def _reason_missing(reason: str) -> bool:
    """Audited writes need a reason: a blank one is refused (exit 2) before any connection."""
    if reason.strip():
        return False
    print("error: --reason must not be empty", file=sys.stderr)
    return True


def _with_ledger(settings: Settings, work: Callable[[Ledger], Awaitable[int]]) -> int:
    async def run() -> int:
        pool = await create_pool(settings, min_size=1, max_size=2)
        try:
            return await work(Ledger(pool, settings))
        finally:
            await pool.close()

    return asyncio.run(run())


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from .app import run

    run(settings, noop=args.noop)  # on GATE_EVENT_LOOP's loop
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from .alerts import worker_main

    return worker_main(settings, once=args.once, interval=args.interval)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    import asyncpg

    try:
        result = asyncio.run(migrate(settings, args.direction))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"error: migrate: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    # Imported here, not at the top: the embedded dev stack is a separate package (extproc_dev)
    # whose binaries come with the optional `dev` extra, absent from a production install.
    from extproc_dev.devstack import run_dev

    return run_dev(upstream=args.upstream, workdir=args.workdir)


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    try:
        token = mint_token(settings, args.user, email=args.email, admin=args.admin, ttl=args.ttl)
    except ValueError as exc:  # no GATE_JWT_SECRET, or --admin that no admin rule accepts
        print(f"error: cannot mint a token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_grant(settings: Settings, args: argparse.Namespace) -> int:
    if args.tokens == 0:
        print("error: TOKENS must not be zero", file=sys.stderr)
        return 2
    if _reason_missing(args.reason):
        return 2

    async def work(ledger: Ledger) -> int:
        try:
            account, applied = await ledger.grant(
                args.user, args.tokens, actor=f"cli:{args.actor}", reason=args.reason,
                kind="grant" if args.tokens > 0 else "adjustment",
                idempotency_key=args.idempotency_key)
        except UnknownUser:
            print(f"error: unknown user {args.user!r}", file=sys.stderr)
            return 1
        print(json.dumps({**account.as_json(), "applied": applied}))
        return 0

    return _with_ledger(settings, work)


def cmd_balance(settings: Settings, args: argparse.Namespace) -> int:
    async def work(ledger: Ledger) -> int:
        account = await ledger.account(args.user)
        if account is None:
            print(f"error: unknown user {args.user!r}", file=sys.stderr)
            return 1
        data = account.as_json()
        if args.json:
            print(json.dumps(data))
        else:
            # as_json carries personal_cap and effective_limit (what usage % is measured against)
            for key, value in data.items():
                print(f"{key:>18}: {value}")
        return 0

    return _with_ledger(settings, work)


def cmd_suspend(settings: Settings, args: argparse.Namespace) -> int:
    suspended = args.command == "suspend"

    async def work(ledger: Ledger) -> int:
        try:
            account = await ledger.set_suspended(
                args.user, suspended, actor=f"cli:{args.actor}", reason=args.reason)
        except UnknownUser:
            print(f"error: unknown user {args.user!r}", file=sys.stderr)
            return 1
        print(json.dumps(account.as_json()))
        return 0

    return _with_ledger(settings, work)


def cmd_allowance(settings: Settings, args: argparse.Namespace) -> int:
    """A per-user monthly allowance (or ``default``: the plan's again), from the next cycle."""
    if _reason_missing(args.reason):
        return 2
    tokens: int | None = None
    if args.tokens != "default":
        try:
            tokens = int(args.tokens)
        except ValueError:
            tokens = -1
        if tokens < 0:
            print("error: TOKENS must be a whole number >= 0 or 'default'", file=sys.stderr)
            return 2

    async def work(ledger: Ledger) -> int:
        try:
            account = await ledger.set_allowance(args.user, tokens, actor=f"cli:{args.actor}", reason=args.reason)
        except UnknownUser:
            print(f"error: unknown user {args.user!r}", file=sys.stderr)
            return 1
        except ValueError as exc:  # above the ledger's limit
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(account.as_json()))
        return 0

    return _with_ledger(settings, work)


def cmd_erase(settings: Settings, args: argparse.Namespace) -> int:
    """LGPD erasure, at once (no question: the operator typed the id and a reason); prints the
    pseudonym the account's ledger now lives under."""
    if _reason_missing(args.reason):
        return 2

    async def work(ledger: Ledger) -> int:
        try:
            pseudonym = await ledger.erase(args.user, actor=f"cli:{args.actor}", reason=args.reason)
        except UnknownUser:
            print(f"error: unknown or already erased user {args.user!r}", file=sys.stderr)
            return 1
        print(pseudonym)
        return 0

    return _with_ledger(settings, work)


def cmd_plan(settings: Settings, args: argparse.Namespace) -> int:
    async def work(ledger: Ledger) -> int:
        if args.plan_command == "list":
            for plan in await ledger.plans():
                print(json.dumps(plan.as_json()))
            return 0
        if args.plan_command == "create":
            plan = await ledger.upsert_plan(
                args.name, monthly_tokens=args.monthly_tokens, requests_per_minute=args.rpm,
                rollover=args.rollover, actor=f"cli:{args.actor}")
            print(json.dumps(plan.as_json()))
            return 0
        try:
            account = await ledger.set_plan(args.user, args.name, actor=f"cli:{args.actor}",
                                            reason=args.reason)
        except (UnknownUser, UnknownPlan) as exc:
            print(f"error: unknown {'user' if isinstance(exc, UnknownUser) else 'plan'} {exc}",
                  file=sys.stderr)
            return 1
        print(json.dumps(account.as_json()))
        return 0

    return _with_ledger(settings, work)


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return number


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    async def work(ledger: Ledger) -> int:
        drift = await ledger.reconcile()
        for row in drift:
            print(json.dumps(row, default=str))
        print(f"{len(drift)} account(s) with drift", file=sys.stderr)
        return 1 if drift else 0

    return _with_ledger(settings, work)


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    from . import backup

    try:
        major = asyncio.run(backup.server_major(settings.database_url))
        if args.command == "backup":
            backup.backup(settings.database_url, Path(args.file), major)
        else:
            backup.restore(settings.database_url, Path(args.file), major)
    except subprocess.CalledProcessError as exc:
        print(f"error: {args.command} failed: {exc.stderr.strip()}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as exc:
        print(f"error: {args.command}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.command}: {args.file}")
    return 0


def cmd_calibrate(settings: Settings, args: argparse.Namespace) -> int:
    async def work(ledger: Ledger) -> int:
        report = await ledger.calibration(days=args.days)
        print(json.dumps({"current_factor": settings.conversion_factor, "models": report},
                         default=str, indent=2))
        return 0

    return _with_ledger(settings, work)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extproc", description="Solaris token gate")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the ext_proc gRPC service and the HTTP side")
    s.add_argument("--noop", action="store_true", help="answer every phase, touch nothing")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("worker", help="deliver threshold alerts (e-mail, webhook) until stopped")
    s.add_argument("--once", action="store_true", help="deliver what is due now, then exit")
    s.add_argument("--interval", type=float, default=5.0, help="seconds between polls when idle")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("migrate", help="apply (or roll back) the ledger schema with dbmate")
    s.add_argument("direction", nargs="?", default="up", choices=["up", "rollback", "status"])
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("dev", help="the whole stack, embedded, in the foreground")
    s.add_argument("--upstream", help="an OpenAI-compatible URL instead of the mock LiteLLM")
    s.add_argument("--workdir", default=".devstack", help="data and logs of the dev stack")
    s.set_defaults(func=cmd_dev)

    s = sub.add_parser("token", help="print a JWT signed with GATE_JWT_SECRET")
    s.add_argument("user")
    s.add_argument("--email")
    s.add_argument("--admin", action="store_true")
    s.add_argument("--ttl", type=int, default=3600, help="seconds of validity")
    s.set_defaults(func=cmd_token)

    s = sub.add_parser("grant", help="add credits to a user (negative: claw back)")
    s.add_argument("user")
    s.add_argument("tokens", type=int)
    s.add_argument("--reason", required=True)
    s.add_argument("--actor", default="operator")
    s.add_argument("--idempotency-key")
    s.set_defaults(func=cmd_grant)

    s = sub.add_parser("balance", help="a user's balance")
    s.add_argument("user")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_balance)

    for verb in ("suspend", "unsuspend"):
        s = sub.add_parser(verb, help=f"{verb} a user")
        s.add_argument("user")
        s.add_argument("--reason", required=True)
        s.add_argument("--actor", default="operator")
        s.set_defaults(func=cmd_suspend)

    s = sub.add_parser("allowance", help="a user's own monthly allowance instead of the plan's (next cycle)")
    s.add_argument("user")
    s.add_argument("tokens", metavar="TOKENS|default", help="monthly tokens, or 'default' for the plan's")
    s.add_argument("--reason", required=True)
    s.add_argument("--actor", default="operator")
    s.set_defaults(func=cmd_allowance)

    s = sub.add_parser("erase", help="erase a user's personal data (LGPD), irreversibly; prints the pseudonym")
    s.add_argument("user")
    s.add_argument("--reason", required=True)
    s.add_argument("--actor", default="operator")
    s.set_defaults(func=cmd_erase)

    s = sub.add_parser("plan", help="create, list and assign plans")
    s.set_defaults(func=cmd_plan)
    plan_sub = s.add_subparsers(dest="plan_command", required=True)
    plan_sub.add_parser("list", help="all plans with their effective limits")
    c = plan_sub.add_parser("create", help="create or update a plan")
    c.add_argument("name")
    c.add_argument("--monthly-tokens", type=_non_negative,
                   help="monthly allowance (default: GATE_DEFAULT_MONTHLY_TOKENS)")
    c.add_argument("--rpm", type=_positive, help="requests per minute (default: GATE_RATE_LIMIT_PER_MINUTE)")
    c.add_argument("--rollover", action="store_true", help="unused allowance carries over")
    c.add_argument("--actor", default="operator")
    a = plan_sub.add_parser("assign", help="move a user to a plan (applies from the next cycle)")
    a.add_argument("user")
    a.add_argument("name")
    a.add_argument("--reason", required=True)
    a.add_argument("--actor", default="operator")

    s = sub.add_parser("reconcile", help="check balance == sum(entries) for every account")
    s.set_defaults(func=cmd_reconcile)

    s = sub.add_parser("backup", help="pg_dump the ledger database (custom format)")
    s.add_argument("file")
    s.set_defaults(func=cmd_backup)
    s = sub.add_parser("restore", help="pg_restore a backup over the ledger database")
    s.add_argument("file")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("calibrate", help="real/estimate ratio per model and a suggested factor")
    s.add_argument("--days", type=int, default=30)
    s.set_defaults(func=cmd_calibrate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level)
    result: Any = args.func(settings, args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
