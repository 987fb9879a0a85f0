"""A local write-ahead spool for usage records that could not reach Redis.

Records are appended to `<dir>/usage.spool` as JSON lines and fsynced before
the append returns, so a record survives the process being killed the next
instant. A replay first renames the file (new records then start a fresh
one), writes its records to the ledger, and deletes it only once every
record is in: a crash mid-replay leaves the renamed file to be replayed
again, and the ledger's deduplication by request id makes that safe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from accounting.records import UsageRecord

log = logging.getLogger(__name__)

SPOOL_FILE = "usage.spool"
REPLAYING_SUFFIX = ".replaying"


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / SPOOL_FILE
        self._lock = threading.Lock()

    def append(self, record: UsageRecord) -> None:
        """Appends a record durably (written and fsynced) before returning."""
        line = json.dumps(dataclasses.asdict(record), sort_keys=True, separators=(",", ":")) + "\n"
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def take(self) -> list[Path]:
        """Moves the live spool aside for replay; returns every file waiting to be replayed."""
        with self._lock:
            if self.path.exists():
                taken = self.path.with_name(f"{SPOOL_FILE}.{os.getpid()}.{os.urandom(4).hex()}{REPLAYING_SUFFIX}")
                os.replace(self.path, taken)
            return sorted(self.directory.glob(f"{SPOOL_FILE}.*{REPLAYING_SUFFIX}")) if self.directory.exists() else []

    @property
    def has_pending(self) -> bool:
        return self.path.exists() or (self.directory.exists()
                                      and any(self.directory.glob(f"{SPOOL_FILE}.*{REPLAYING_SUFFIX}")))

    @staticmethod
    def read(path: Path) -> Iterator[UsageRecord]:
        """The records of a spool file. A torn last line (the writer was killed mid-append,
        before its fsync returned, so its caller never learned it was saved) is skipped."""
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    yield UsageRecord(**json.loads(line))
                except (json.JSONDecodeError, TypeError) as exc:
                    log.warning("skipping unreadable line %d of %s: %s", number, path, exc)
