"""The Faust worker as a real process on the real broker: examples, features, dead letters, recovery.

Each test replays a synthetic shop's log into Kafka, runs `streamrec stream worker` as a
subprocess, and compares what it produced (the `examples` topic, Feast's online store, `dlq`)
with the in-process path over the same events.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource

from feature_store.config import FeatureStoreSettings
from feature_store.store import StreamingFeatureStore
from policies.synthetic_world import SyntheticWorld, WorldConfig
from streaming.events import Click, Impression, Purchase
from streaming.kafka_io import EventConsumer, EventProducer, ensure_topics
from streaming.config import INTERNAL_TOPICS, TOPICS
from streaming.replay import replay_to_kafka
from streaming.stream_app import CHANGELOG_CONFIG, ProducerSendError, StreamWorker
from streaming.joiner import JoinerConfig
from streaming.stream_processor import StreamProcessor
from streamrec.chaos import clock_events, recent_start_ms

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3_600_000


def shop_log(seed: int = 2, requests: int = 240, gap_ms: float = 2000.0) -> list:
    world = SyntheticWorld(WorldConfig(seed=seed, n_users=40, n_items=30, mean_request_gap_ms=gap_ms,
                                       start_time_ms=recent_start_ms()))
    log = world.item_events() + world.generate_log(requests)
    return log + clock_events(3, max(e.event_time for e in log) + 26 * HOUR)


def in_process(events: list, config: JoinerConfig | None = None):
    """The reference: the same core over the same events in the same order, and the last feature rows."""
    processor = StreamProcessor(config)
    examples, features = {}, {}
    for out in processor.run(events, finish=False):
        examples.update({e.event_id: e for e in out.examples})
        for update in out.features:
            features[(update.view, update.key)] = update.values
    return examples, features


class Worker:
    def __init__(self, kafka, tmp_path: Path, app_id: str, **settings: str) -> None:
        self.env = {
            **settings,
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "STREAMREC_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
            "STREAMREC_KAFKA__PARTITIONS": str(kafka.partitions),
            "STREAMREC_STREAM__APP_ID": app_id,
            # a killed member's partitions move on when its session times out: keep that short here
            "STREAMREC_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "STREAMREC_STREAM__SWEEP_INTERVAL_S": "0.2",
            "STREAMREC_DATA_DIR": str(tmp_path / "data"),
            "STREAMREC_FEATURE_STORE__DATA_DIR": str(tmp_path / "features"),
        }
        self.log = tmp_path / f"worker-{app_id}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Worker":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamrec", "stream", "worker", "--loglevel", "info"],
            env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
        )
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def collect(kafka, topic: str, done, timeout_s: float, worker: Worker) -> list:
    """Every record on ``topic`` (from the start) until ``done(records)``; fail with the worker's log."""
    records = []
    with EventConsumer(kafka, [topic], group_id=f"check-{uuid.uuid4().hex[:8]}") as consumer:
        deadline = time.monotonic() + timeout_s
        while not done(records):
            assert worker.process.poll() is None, f"the worker exited:\n{worker.tail()}"
            assert time.monotonic() < deadline, f"waited {timeout_s}s for {topic}, got {len(records)}:\n{worker.tail()}"
            records += [r.event for r in consumer.poll(timeout_ms=500)]
    return records


def wait_for_features(tmp_path: Path, expected: dict, timeout_s: float, worker: Worker) -> dict:
    store = StreamingFeatureStore(FeatureStoreSettings(data_dir=tmp_path / "features"))
    users = sorted({key for view, key in expected if view == "user_activity"})
    items = sorted({key for view, key in expected if view != "user_activity"})
    deadline = time.monotonic() + timeout_s
    while True:
        online = store.online_features(user_ids=users, item_ids=items)
        got = {}
        for entity, ids, views in (("user", users, ("user_activity",)), ("item", items, ("item_stats", "item_catalog"))):
            columns = online.get(entity, {})
            for row, key in enumerate(ids):
                for view in views:
                    if (view, key) in expected:
                        got[(view, key)] = {name: columns[name][row] for name in expected[(view, key)]}
        if got == expected or time.monotonic() > deadline:
            return got
        assert worker.process.poll() is None, f"the worker exited:\n{worker.tail()}"
        time.sleep(0.5)


def wait_for_committed_inputs(kafka, group: str, timeout_s: float, worker: Worker) -> dict:
    """Poll the worker's committed offsets until every input partition's reaches its end offset."""
    inputs = [TopicPartition(kafka.topic(t), p) for t in ("impressions", "clicks", "purchases", "items")
              for p in range(kafka.partitions)]
    consumer = KafkaConsumer(**kafka.client_options(), group_id=group, enable_auto_commit=False)
    try:
        ends = consumer.end_offsets(inputs)
        deadline = time.monotonic() + timeout_s
        while True:
            lag = {f"{tp.topic}[{tp.partition}]": (consumer.committed(tp), end) for tp, end in ends.items()
                   if end and (consumer.committed(tp) or 0) < end}
            if not lag or time.monotonic() > deadline:
                return lag
            assert worker.process.poll() is None, f"the worker exited:\n{worker.tail()}"
            time.sleep(0.5)
    finally:
        consumer.close()


def topic_size(kafka, topic: str) -> int:
    consumer = KafkaConsumer(**kafka.client_options())
    try:
        partitions = consumer.partitions_for_topic(kafka.topic(topic)) or set()
        return sum(consumer.end_offsets([TopicPartition(kafka.topic(topic), p) for p in partitions]).values())
    finally:
        consumer.close()


@pytest.fixture
def topics(kafka):
    ensure_topics(kafka, [*TOPICS, *INTERNAL_TOPICS])
    return kafka


def test_live_worker_gives_the_in_process_examples_features_and_dead_letters(topics, tmp_path):
    kafka = topics
    log = shop_log()
    # a crawler: a burst of impressions that would outgrow one changelog record (bound lowered here)
    bound = 100_000
    start = min(e.event_time for e in log)
    log += [Impression(event_id=f"bot-{i}", event_time=start + 10 * i, request_id=f"bot-{i}",
                       user_id="bot-0", item_id=f"i{i % 30:04d}", position=0, slate_size=1, propensity=1.0,
                       model_version=None, policy_version=None) for i in range(400)]
    log = sorted(log, key=lambda e: e.event_time)
    late = Click(event_id="late-click", event_time=log[0].event_time + 1, user_id="clock-0", item_id="i0001")
    expected_examples, expected_features = in_process(log + [late], JoinerConfig(max_user_state_bytes=bound))
    impressions = [e for e in log if isinstance(e, Impression) and not e.user_id.startswith("clock-")]
    over_bound = {e.event_id for e in impressions} - set(expected_examples)
    assert over_bound and over_bound < {f"bot-{i}" for i in range(400)}
    impressions = [e for e in impressions if e.event_id not in over_bound]
    assert len(expected_examples) == len(impressions)
    malformed = b'{"type": "click", "user_id": "u0001"}'

    with EventProducer(kafka) as producer:
        replay_to_kafka(log, producer, progress=False)
        producer.send_raw(kafka.topic("clicks"), b"u0001", malformed)
    app_id = f"w{uuid.uuid4().hex[:8]}"
    worker = Worker(kafka, tmp_path, app_id, STREAMREC_JOINER__MAX_USER_STATE_BYTES=str(bound)).start()
    try:
        examples = collect(kafka, "examples", lambda r: len(r) >= len(impressions), 180, worker)
        with EventProducer(kafka) as producer:  # now every watermark is a day past it: surely late
            producer.send(late)
        letters = collect(kafka, "dlq", lambda r: len(r) >= 2 + len(over_bound), 120, worker)
        features = wait_for_features(tmp_path, expected_features, 120, worker)
    finally:
        assert worker.stop() == 0, worker.tail()

    assert len(examples) == len(impressions)  # each impression exactly once
    assert {e.event_id: e for e in examples} == expected_examples
    assert sum(e.clicked for e in examples) == sum(isinstance(e, Click) and not e.user_id.startswith("clock-") for e in log)
    bad = next(d for d in letters if d.original_value == malformed)
    assert "item_id: Field required" in bad.error and bad.topic == kafka.topic("clicks")
    assert any(b"late-click" in (d.original_value or b"") and d.error.startswith("late click") for d in letters)
    refused = {json.loads(d.original_value)["event_id"] for d in letters if "max_user_state_bytes" in d.error}
    assert refused == over_bound  # dead-lettered with the reason, the same ones the in-process path refuses
    assert features == expected_features
    # the tables' changelogs are compacted as they go, so a restart replays state, not history
    admin = KafkaAdminClient(**kafka.client_options())
    try:
        described = admin.describe_configs([ConfigResource("TOPIC", f"{app_id}-join-state-changelog")])
    finally:
        admin.close()
    config = {key: entry["value"] for key, entry in next(iter(described["topic"].values())).items()}
    assert {key: config.get(key) for key in CHANGELOG_CONFIG} == CHANGELOG_CONFIG
    assert config.get("cleanup.policy") == "compact"


def test_worker_killed_mid_stream_recovers_its_state_from_the_changelogs(topics, tmp_path):
    kafka = topics
    log = sorted(shop_log(seed=3, gap_ms=30_000), key=lambda e: e.event_time)  # 2 h: windows close mid-stream
    expected_examples, expected_features = in_process(log)
    half = len(log) // 2
    app_id = f"w{uuid.uuid4().hex[:8]}"

    with EventProducer(kafka) as producer:
        replay_to_kafka(log[:half], producer, progress=False)
    worker = Worker(kafka, tmp_path, app_id).start()
    try:
        first = collect(kafka, "examples", lambda r: len(r) >= 100, 240, worker)
        worker.kill()
        assert worker.process.returncode == -signal.SIGKILL

        with EventProducer(kafka) as producer:
            replay_to_kafka(log[half:], producer, progress=False)
        worker.start()
        examples = collect(kafka, "examples", lambda r: len({e.event_id for e in r}) >= len(expected_examples), 240, worker)
        features = wait_for_features(tmp_path, expected_features, 180, worker)
        # the inputs' offsets are committed once their examples, state and features are out
        uncommitted = wait_for_committed_inputs(kafka, app_id, 30, worker)
    finally:
        worker.stop()

    by_id = {e.event_id: e for e in examples}
    assert by_id == expected_examples  # nothing lost, labels as if never interrupted
    duplicates = len(examples) - len(by_id)
    print(f"{len(first)} examples before the kill; {duplicates} re-sent after it (de-duplicated by event_id)")
    assert features == expected_features
    assert uncommitted == {}, f"input offsets left uncommitted (committed, end): {uncommitted}"
    # what the restart re-read since the last commit is recognised as repeats, not dead-lettered as late
    assert topic_size(kafka, "dlq") == 0


def slow_sends(producer, delay_s: float, fail: bool = False):
    """Each send reaches the client ``delay_s`` late (a busy loop, a full client buffer), or fails."""
    send = producer.send

    async def delayed(*args, **kwargs):
        await asyncio.sleep(delay_s)
        if fail:
            broken = asyncio.get_running_loop().create_future()
            broken.set_exception(ConnectionError("broker unreachable"))
            return broken
        return await send(*args, **kwargs)

    producer.send = delayed


def test_the_flush_before_each_commit_waits_for_every_queued_send(topics, tmp_path):
    """Faust flushes its producer, then commits the input offsets: a flush that returned with table
    or example writes still queued would commit past them, and a crash would lose them."""
    async def scenario():
        worker = StreamWorker(topics, app_id=f"w{uuid.uuid4().hex[:8]}", data_dir=str(tmp_path / "faust"))
        worker.prepare_producer()
        producer = worker.app.producer
        slow_sends(producer, 0.15)  # Faust's own flush gives up after 0.1 s without a send
        await producer.start()

        async def agents_go_on_sending():
            for _ in range(100):
                worker.examples.send_soon(key=b"u", value=b"later")
                await asyncio.sleep(0.05)

        try:
            queued = [worker.examples.send_soon(key=b"u", value=b"%d" % i) for i in range(4)]
            later = asyncio.ensure_future(agents_go_on_sending())
            await producer.flush()
            flushed_while_sending = not later.done()
            later.cancel()
            return [f.done() and f.exception() is None for f in queued], flushed_while_sending
        finally:
            await producer.stop()

    delivered, flushed_while_sending = asyncio.run(scenario())
    assert delivered == [True] * 4  # each one delivered, acknowledged by the broker
    assert flushed_while_sending  # the flush waits for what came before it, not for a busy stream to pause


def test_a_failed_send_stops_every_later_commit(topics, tmp_path):
    async def scenario():
        worker = StreamWorker(topics, app_id=f"w{uuid.uuid4().hex[:8]}", data_dir=str(tmp_path / "faust"))
        worker.prepare_producer()
        producer = worker.app.producer
        slow_sends(producer, 0.0, fail=True)
        await producer.start()
        try:
            worker.examples.send_soon(key=b"u", value=b"lost")
            errors = []
            for _ in range(2):
                try:
                    await producer.flush()
                except ProducerSendError as exc:
                    errors.append(str(exc))
            return errors
        finally:
            await producer.stop()

    errors = asyncio.run(scenario())
    assert len(errors) == 2, errors
    assert topics.topic("examples") in errors[0] and "broker unreachable" in errors[0]
