"""A consumer process for the delivery tests: applies clicks to a SQLite ledger, then commits.

``--crash-after-batch N`` SIGKILLs the process after batch N is durable in the ledger but before
its offsets are committed: the worst moment for at-least-once delivery.
"""

from __future__ import annotations

import argparse
import os
import signal

from streaming.config import KafkaSettings
from streaming.kafka_io import EventConsumer
from streaming.ledger import EventLedger


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--max-poll-records", type=int, default=500)
    parser.add_argument("--crash-after-batch", type=int, default=0)
    args = parser.parse_args()

    kafka = KafkaSettings(bootstrap_servers=args.bootstrap, topic_prefix=args.prefix, group_id=args.group,
                          max_poll_records=args.max_poll_records, group_instance_id="ledger-consumer-0")
    ledger = EventLedger(args.ledger)
    with ledger.connection:
        ledger.connection.execute("CREATE TABLE IF NOT EXISTS deliveries (batch INTEGER, pid INTEGER, n INTEGER)")
    consumer = EventConsumer(kafka, ["clicks"])
    batches = 0

    def handle(batch):
        nonlocal batches
        batches += 1

        def count_delivery(conn, new_ids):
            conn.execute("INSERT INTO deliveries VALUES (?, ?, ?)", (batches, os.getpid(), len(batch)))

        ledger.add_new([r.event.event_id for r in batch], effect=count_delivery)
        if batches == args.crash_after_batch:
            os.kill(os.getpid(), signal.SIGKILL)  # durable, not committed

    print("ready", flush=True)
    consumer.run(handle)  # until SIGTERM: finishes the batch in hand, commits, closes
    print(f"stopped after {batches} batches", flush=True)


if __name__ == "__main__":
    main()
