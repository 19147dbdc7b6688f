"""Backup and restore of the ledger database with pg_dump / pg_restore (custom format).

pg_dump refuses a server newer than itself, so the tool is picked by version: the system's
client tools when they are new enough, else the ones the pgserver wheel ships.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import asyncpg


def _candidates(name: str) -> list[str]:
    found: list[str] = []
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name
        if bundled.exists():
            found.append(str(bundled))
    system = shutil.which(name)
    if system:
        found.append(system)
    return found


def _major(binary: str) -> int:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else 0


def pg_tool(name: str, server_major: int) -> str:
    """The installed ``name`` whose major version is closest to, and not below, the server's."""
    usable = [(m, b) for b in _candidates(name) if (m := _major(b)) >= server_major]
    if not usable:
        raise RuntimeError(f"no {name} of version >= {server_major} found (install postgresql-client)")
    return min(usable)[1]


async def server_major(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


def backup(database_url: str, path: Path, major: int) -> None:
    subprocess.run([pg_tool("pg_dump", major), "--format=custom", "--no-owner", "--file", str(path),
                    "--dbname", database_url], check=True, capture_output=True, text=True)


def restore(database_url: str, path: Path, major: int) -> None:
    """Replace the database's objects with the backup's (--clean --if-exists), in one
    transaction so a failed restore leaves the database as it was."""
    subprocess.run([pg_tool("pg_restore", major), "--clean", "--if-exists", "--no-owner",
                    "--single-transaction", "--exit-on-error", "--dbname", database_url, str(path)],
                   check=True, capture_output=True, text=True)
