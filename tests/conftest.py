"""Shared fixtures: one real Kafka broker per test session, and isolated topics per test.

``KAFKA_BOOTSTRAP_SERVERS`` points the tests at a running cluster; otherwise the session starts a
single KRaft node from Apache Kafka's jars (``streaming.local_broker``). Under ``CI=true`` a broker
that cannot be started fails the run; elsewhere the Kafka tests are skipped with the reason.
"""

from __future__ import annotations

import os
import uuid

import pytest

from streaming.config import KafkaSettings
from streaming.kafka_io import ensure_topics
from streaming.local_broker import BrokerError, LocalKafka


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory):
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    try:
        broker = LocalKafka(workdir=tmp_path_factory.mktemp("kafka")).start()
    except BrokerError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the Kafka broker the tests need could not be started: {exc}", pytrace=False)
        pytest.skip(f"no Kafka broker: {exc}")
    yield broker.bootstrap
    broker.remove()


@pytest.fixture
def kafka(kafka_bootstrap) -> KafkaSettings:
    """Settings for a fresh set of StreamRec topics (3 partitions each) that no other test uses."""
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        partitions=3,
        group_id=f"g{uuid.uuid4().hex[:10]}",
        bootstrap_timeout_ms=15_000,
        linger_ms=2,
        # the synthetic events carry 2026-01 event times, stamped on their records: with time-based
        # retention the broker would delete them minutes after they are written
        retention_ms=-1,
    )
    ensure_topics(settings)
    return settings
