"""At-least-once delivery with real processes: SIGKILL before commit re-delivers; SIGTERM commits."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from streaming.events import Click
from streaming.kafka_io import EventProducer

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_767_225_600_000


def start_consumer(kafka, ledger: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "apps" / "ledger_consumer.py"), "--bootstrap", kafka.bootstrap_servers,
         "--prefix", kafka.topic_prefix, "--group", kafka.group_id, "--ledger", str(ledger), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def ledger_counts(path: Path) -> tuple[int, int]:
    """(distinct events applied, messages delivered) as the consumer process recorded them."""
    if not path.exists():
        return 0, 0
    with sqlite3.connect(path) as conn:
        try:
            seen = conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
            delivered = conn.execute("SELECT COALESCE(SUM(n), 0) FROM deliveries").fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            return 0, 0
    return seen, delivered


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def produce_clicks(kafka, n: int) -> list[Click]:
    clicks = [Click(event_time=T0 + i, user_id=f"u{i % 50}", item_id=f"i{i % 30}") for i in range(n)]
    with EventProducer(kafka) as producer:
        for click in clicks:
            producer.send(click)
    return clicks


def committed_total(kafka) -> int:
    """Sum over the clicks partitions of the offsets the consumer group has committed."""
    consumer = KafkaConsumer(**kafka.client_options(), group_id=kafka.group_id, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(kafka.topic("clicks"))
        return sum(consumer.committed(TopicPartition(kafka.topic("clicks"), p)) or 0 for p in partitions)
    finally:
        consumer.close()


def test_sigkill_after_work_before_commit_redelivers_and_dedup_is_exact(kafka, tmp_path):
    produce_clicks(kafka, 5000)
    ledger = tmp_path / "ledger.sqlite"

    crashed = start_consumer(kafka, ledger, "--crash-after-batch", "3")
    out, _ = crashed.communicate(timeout=120)
    assert crashed.returncode == -signal.SIGKILL, out
    with sqlite3.connect(ledger) as conn:
        uncommitted = conn.execute("SELECT n FROM deliveries WHERE batch = 3").fetchone()[0]
    assert uncommitted > 0

    restarted = start_consumer(kafka, ledger)
    try:
        wait_for(lambda: ledger_counts(ledger)[0] == 5000, 120, "all 5000 clicks applied after the restart")
        wait_for(lambda: committed_total(kafka) == 5000, 60, "offsets committed up to the end")
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.communicate(timeout=60)
    seen, delivered = ledger_counts(ledger)
    assert seen == 5000  # nothing lost, nothing applied twice
    assert delivered == 5000 + uncommitted  # exactly the batch that was not committed came again


def test_sigterm_finishes_the_batch_commits_and_exits_cleanly(kafka, tmp_path):
    produce_clicks(kafka, 3000)
    ledger = tmp_path / "ledger.sqlite"
    consumer = start_consumer(kafka, ledger)
    wait_for(lambda: ledger_counts(ledger)[0] == 3000, 120, "all clicks applied")
    consumer.send_signal(signal.SIGTERM)
    out, _ = consumer.communicate(timeout=60)
    assert consumer.returncode == 0, out
    assert "stopped after" in out
    assert committed_total(kafka) == 3000
    seen, delivered = ledger_counts(ledger)
    assert seen == delivered == 3000  # a graceful stop re-delivers nothing
