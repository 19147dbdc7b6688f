"""A local durable spool for settles that could not reach the ledger.

Append-only JSON lines, fsync'd before the processor forgets an exchange. Replay settles
each line through Ledger.settle, which is exactly-once by exchange id, so a crash during
replay (lines replayed but the file not yet truncated) cannot double-debit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from .ledger import Ledger, LedgerUnavailable, Usage

log = logging.getLogger(__name__)


class Spool:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "settles.jsonl"
        self._lock = asyncio.Lock()

    def _append(self, line: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def append(self, usage: Usage) -> None:
        line = (json.dumps(usage.to_json(), separators=(",", ":")) + "\n").encode()
        async with self._lock:
            await asyncio.to_thread(self._append, line)

    def pending(self) -> int:
        try:
            with self.path.open("rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    async def replay(self, ledger: Ledger) -> int:
        """Settle every spooled line; returns how many were replayed. Stops (keeping the
        file) at the first line the ledger still cannot take."""
        async with self._lock:
            if not self.path.exists():
                return 0
            lines = self.path.read_bytes().splitlines()
            done = 0
            for raw in lines:
                if not raw.strip():
                    done += 1
                    continue
                try:
                    usage = Usage.from_json(json.loads(raw))
                except (ValueError, TypeError) as exc:
                    log.error("unreadable spool line kept aside: %s", exc)
                    (self.dir / "settles.rejected").open("ab").write(raw + b"\n")
                    done += 1
                    continue
                try:
                    await ledger.settle(usage)
                except LedgerUnavailable:
                    break
                done += 1
            rest = lines[done:]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(b"".join(line + b"\n" for line in rest))
            os.replace(tmp, self.path)
            replayed = done
            log.info("spool replay: %d settled, %d left", replayed, len(rest))
            return replayed
