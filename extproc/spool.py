"""A local durable spool for settles that could not reach the ledger.

One SQLite database (``spool.db``) per spool directory, from the standard library:

* WAL mode with ``synchronous=FULL``: ``append`` returns only after the row's commit is
  fsync'd, so a settle the processor has handed over survives a crash or a power cut.
* One row per exchange id (``INSERT OR IGNORE``): an exchange spooled twice is one row.
* ``busy_timeout`` and SQLite's own locking: several processes on one host may share the
  directory; a replay never rewrites anything another process could be appending to.
* Replay claims a batch of rows (a lease, so two replayers do not both work on them and a
  crashed one's rows come back), settles each through ``Ledger.settle`` and deletes a row
  only after its settle returned. Settle is exactly-once by exchange id, so a crash between
  the settle and the delete replays the row later as a harmless no-op.
* A row the ledger rejects for a reason of its own (bad data, a bug) is moved to the
  ``quarantine`` table with the error, so one poison row cannot stop the rows behind it.
  Only an unavailable (or momentarily overloaded) database stops a replay and keeps the row.

Every sqlite call runs in a worker thread (``asyncio.to_thread``): a busy lock or an fsync
must not stall the event loop that serves ext_proc streams. See docs/spool.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .ledger import Ledger, LedgerUnavailable, Usage

log = logging.getLogger(__name__)

DB_NAME = "spool.db"
# The previous format (append-only JSON lines) and the temporary file its replay renamed over
# it; both are imported on open so an upgrade loses nothing.
LEGACY_FILES = ("settles.jsonl", "settles.tmp")

# Long enough for another process's write transaction (they are single statements or a
# legacy import), short enough that a wedged peer surfaces as an error rather than a hang.
BUSY_TIMEOUT_MS = 30_000
# A replayer that crashed holding a claim gives its rows back after this long. Expiry only
# costs duplicate work: a second settle of the same exchange is a no-op.
CLAIM_SECONDS = 300.0
BATCH = 100

# SQLSTATE classes that describe the database's condition, not the row: connection loss (08),
# serialization failure or deadlock (40), out of resources (53), shutdown or cancel (57),
# system I/O error (58). Quarantining on these would sideline good rows during an incident;
# they stop the replay like LedgerUnavailable and the row is retried next round.
TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
TRANSIENT_STATES = frozenset({"25006", "55P03"})  # read-only (failover), lock not available

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    exchange_id   TEXT PRIMARY KEY,
    payload       TEXT NOT NULL,   -- Usage.to_json(), as JSON text
    spooled_at    REAL NOT NULL,   -- unix time
    claimed_by    TEXT,            -- the replay holding the row, NULL when free
    claimed_until REAL             -- unix time the claim lapses
);
CREATE TABLE IF NOT EXISTS quarantine (
    exchange_id    TEXT PRIMARY KEY,
    payload        TEXT NOT NULL,
    spooled_at     REAL,
    error          TEXT NOT NULL,
    quarantined_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class ReplayResult:
    replayed: int = 0     # rows settled into the ledger (or found already settled) and removed
    quarantined: int = 0  # poison rows moved to the quarantine table
    left: int = 0         # rows still spooled afterwards (all processes' rows in the directory)


class PoisonRow(Exception):
    """A spooled payload that cannot become a Usage."""


def _parse(payload: str) -> Usage:
    try:
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return Usage.from_json(data)
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise PoisonRow(f"unreadable spool row: {type(exc).__name__}: {exc}") from exc


def _retry_later(exc: BaseException) -> bool:
    """True when a settle failed because of the database's state, not the row's content."""
    if isinstance(exc, LedgerUnavailable):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return sqlstate[:2] in TRANSIENT_CLASSES or sqlstate in TRANSIENT_STATES


def _wal_mode(conn: sqlite3.Connection) -> str:
    """The spool's journal mode, switched to WAL if it is not yet (WAL persists in the file).

    Switching needs the database to itself, and SQLite answers "database is locked" at once
    instead of going through busy_timeout when another process holds it (seen with two
    appending processes and a replaying one): so the persistent mode is read first (a spool
    already in WAL never asks again), and a switch that finds the file busy is retried."""
    mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while mode.lower() != "wal":
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    return mode


def _fsync_dir(path: Path) -> None:
    """Make a created, renamed or removed directory entry durable (POSIX needs the
    directory itself fsync'd for that, not just the file)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: str | Path) -> None:
        # No I/O here: a Service is built (tests, noop mode) without ever needing a spool.
        self.dir = Path(directory)
        self.path = self.dir / DB_NAME
        # One connection per Spool for the life of the process, used from worker threads under
        # this lock. Per-call connections would make SQLite checkpoint and delete the WAL on
        # every close (and re-create it, with a directory fsync, on the next write).
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        # This process's last known row count, so pending() (synchronous, called on the
        # event loop for the gauge) need not touch SQLite. Refreshed by every append/replay.
        self._count: int | None = None

    # ------------------------------------------------------------ sqlite (worker threads)

    def _connect(self) -> sqlite3.Connection:
        """Open (first call) the database: create it private, set it up, import a legacy
        file. Caller holds self._lock."""
        if self._conn is not None:
            return self._conn
        created_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        # Created here with 0600 so SQLite, which gives its -wal/-shm files the database
        # file's mode, keeps every spooled user id private like the old JSONL file.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        # isolation_level=None: no implicit transactions; writes take BEGIN IMMEDIATE
        # themselves so waiting for another process goes through busy_timeout instead of
        # failing on a read-to-write lock upgrade. check_same_thread=False: to_thread may
        # use any worker; self._lock serializes them.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = _wal_mode(conn)
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"spool {self.path}: journal_mode is {mode}, not wal")
            # FULL: a commit fsyncs the WAL, so an acknowledged append survives power loss
            # (NORMAL, the WAL default, may lose the last commits).
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(SCHEMA)
        except BaseException:
            conn.close()
            raise
        # The database file's directory entry (and the spool directory's, if new) must
        # survive power loss too, or a durable WAL could sit beside a vanished database.
        _fsync_dir(self.dir)
        if created_dir:
            _fsync_dir(self.dir.parent)
        self._conn = conn
        self._import_legacy(conn)
        return conn

    def _import_legacy(self, conn: sqlite3.Connection) -> None:
        """Move the lines of a pre-SQLite spool into the table, then remove the files.

        Inside one IMMEDIATE transaction so two upgraded processes do not both import; a
        crash after the commit but before the unlink imports again later, which costs only
        no-op settles (exactly-once). A line that is not JSON with an exchange id is still
        imported, under a key derived from its bytes, so replay quarantines it visibly."""
        files = [self.dir / name for name in LEGACY_FILES if (self.dir / name).exists()]
        if not files:
            return
        now = time.time()
        imported = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for path in files:
                try:
                    raw_lines = path.read_bytes().splitlines()
                except FileNotFoundError:  # another process imported it first
                    continue
                for raw in raw_lines:
                    if not raw.strip():
                        continue
                    text = raw.decode("utf-8", "replace")
                    key = None
                    with contextlib.suppress(ValueError):
                        data = json.loads(text)
                        if isinstance(data, dict) and isinstance(data.get("exchange_id"), str):
                            key = data["exchange_id"]
                    if key is None:
                        key = "legacy:" + hashlib.sha256(raw).hexdigest()[:32]
                    imported += conn.execute(
                        "INSERT OR IGNORE INTO spool (exchange_id, payload, spooled_at)"
                        " VALUES (?, ?, ?)", (key, text, now)).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _fsync_dir(self.dir)
        log.warning("spool: imported %d settles from legacy %s", imported,
                    ", ".join(p.name for p in files))

    def _rows(self, conn: sqlite3.Connection) -> int:
        self._count = conn.execute("SELECT count(*) FROM spool").fetchone()[0]
        return self._count

    def _append(self, exchange_id: str, payload: str) -> None:
        with self._lock:
            conn = self._connect()
            # One statement in autocommit: its own transaction, fsync'd at commit (FULL).
            conn.execute("INSERT OR IGNORE INTO spool (exchange_id, payload, spooled_at)"
                         " VALUES (?, ?, ?)", (exchange_id, payload, time.time()))
            self._rows(conn)

    def _claim(self, owner: str, limit: int) -> list[tuple[str, str]]:
        with self._lock:
            conn = self._connect()
            self._import_legacy(conn)  # an old-version process may have written one since
            now = time.time()
            rows = conn.execute(
                "UPDATE spool SET claimed_by = ?, claimed_until = ?"
                " WHERE exchange_id IN (SELECT exchange_id FROM spool"
                "   WHERE claimed_until IS NULL OR claimed_until < ? ORDER BY rowid LIMIT ?)"
                " RETURNING rowid, exchange_id, payload",
                (owner, now + CLAIM_SECONDS, now, limit)).fetchall()
        # RETURNING order is unspecified; settle in spooling order.
        return [(xid, payload) for _rowid, xid, payload in sorted(rows)]

    def _delete(self, exchange_ids: Iterable[str]) -> None:
        ids = [(x,) for x in exchange_ids]
        with self._lock:
            conn = self._connect()
            if ids:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany("DELETE FROM spool WHERE exchange_id = ?", ids)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise

    def _quarantine(self, exchange_id: str, error: str) -> None:
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Copy then delete in one transaction: the row is in exactly one table.
                conn.execute(
                    "INSERT OR REPLACE INTO quarantine"
                    " (exchange_id, payload, spooled_at, error, quarantined_at)"
                    " SELECT exchange_id, payload, spooled_at, ?, ? FROM spool WHERE exchange_id = ?",
                    (error, time.time(), exchange_id))
                conn.execute("DELETE FROM spool WHERE exchange_id = ?", (exchange_id,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _release(self, owner: str) -> int:
        """Give back what a replay claimed but did not finish, and count what is left."""
        with self._lock:
            conn = self._connect()
            conn.execute("UPDATE spool SET claimed_by = NULL, claimed_until = NULL"
                         " WHERE claimed_by = ?", (owner,))
            return self._rows(conn)

    def _exists(self) -> bool:
        """Whether there is anything to open. A process that never spooled creates no
        database (and no directory) just to find it empty."""
        return self._conn is not None or self.path.exists() or any(
            (self.dir / name).exists() for name in LEGACY_FILES)

    def _pending(self) -> int:
        with self._lock:
            if not self._exists():
                return 0
            return self._rows(self._connect())

    def _quarantined(self) -> list[tuple[str, str]]:
        with self._lock:
            return self._connect().execute(
                "SELECT exchange_id, error FROM quarantine ORDER BY quarantined_at").fetchall()

    # ------------------------------------------------------------ public API

    async def append(self, usage: Usage) -> None:
        """Durably record a settle the ledger could not take. Returns after the fsync."""
        payload = json.dumps(usage.to_json(), separators=(",", ":"))
        await asyncio.to_thread(self._append, usage.exchange_id, payload)

    def pending(self) -> int:
        """Rows waiting in the spool, as this process last saw them (its own appends and
        replays refresh it; rows another process appends since show up at the next one).
        Only the very first call, before any append or replay, reads the database."""
        if self._count is None:
            return self._pending()
        return self._count

    async def quarantined(self) -> list[tuple[str, str]]:
        """(exchange_id, error) of every quarantined row, oldest first."""
        return await asyncio.to_thread(self._quarantined)

    async def replay(self, ledger: Ledger) -> ReplayResult:
        """Settle spooled rows until none are left or the ledger is unavailable.

        A row leaves the spool only after Ledger.settle returned for it, or into quarantine
        when settle (or parsing) fails for a reason that is not the database's condition."""
        if not await asyncio.to_thread(self._exists):
            self._count = 0
            return ReplayResult()
        owner = f"{os.getpid()}:{uuid.uuid4().hex}"
        replayed = quarantined = 0
        try:
            while batch := await asyncio.to_thread(self._claim, owner, BATCH):
                done: list[str] = []
                stopped = False
                try:
                    for exchange_id, payload in batch:
                        try:
                            await ledger.settle(_parse(payload))
                        except Exception as exc:  # sorted just below: retry later, or poison
                            if _retry_later(exc):
                                log.warning("spool replay stopped, ledger unavailable or busy: %s", exc)
                                stopped = True
                                break
                            error = f"{type(exc).__name__}: {exc}"
                            log.error("spool row %s quarantined: %s", exchange_id, error)
                            await asyncio.to_thread(self._quarantine, exchange_id, error)
                            quarantined += 1
                            continue
                        done.append(exchange_id)
                finally:
                    # Deleting per batch rather than per row saves an fsync per settle; rows
                    # settled but not yet deleted when a crash hits are replayed as no-ops.
                    await asyncio.to_thread(self._delete, done)
                    replayed += len(done)
                if stopped:
                    break
        finally:
            left = await asyncio.to_thread(self._release, owner)
        if replayed or quarantined:
            log.info("spool replay: %d settled, %d quarantined, %d left", replayed, quarantined, left)
        return ReplayResult(replayed, quarantined, left)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
