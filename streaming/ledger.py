"""A durable ledger of processed event ids: downstream de-duplication for at-least-once delivery.

Kafka may deliver a message again after a crash between a consumer's work and its commit. A
consumer that records each batch's event ids here, in the same SQLite transaction as its own
effects, applies every event exactly once:

>>> ledger = EventLedger(":memory:")
>>> ledger.add_new(["a", "b"])
['a', 'b']
>>> ledger.add_new(["b", "c"])
['c']
>>> len(ledger)
3
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path


class EventLedger:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.connection = sqlite3.connect(self.path, isolation_level="DEFERRED", check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=FULL")  # a committed batch survives a crash
        with self.connection:
            self.connection.execute("CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY)")

    def add_new(
        self,
        event_ids: Iterable[str],
        effect: Callable[[sqlite3.Connection, list[str]], None] | None = None,
    ) -> list[str]:
        """Record ids not seen before and return them, in order; ``effect`` runs in the same transaction."""
        with self.connection:
            new = []
            for event_id in event_ids:
                cursor = self.connection.execute("INSERT OR IGNORE INTO seen (event_id) VALUES (?)", (event_id,))
                if cursor.rowcount == 1:
                    new.append(event_id)
            if effect is not None:
                effect(self.connection, new)
        return new

    def __contains__(self, event_id: str) -> bool:
        return self.connection.execute("SELECT 1 FROM seen WHERE event_id = ?", (event_id,)).fetchone() is not None

    def __len__(self) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM seen").fetchone()[0]

    def close(self) -> None:
        self.connection.close()
