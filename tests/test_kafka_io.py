"""Kafka I/O against the real broker: round trips, keys and partitions, the dead-letter path."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from streaming.config import KafkaSettings
from streaming.events import (
    Click, DeadLetter, Example, Impression, Item, ModelUpdate, Purchase, encode_event,
)
from streaming.kafka_io import EventConsumer, EventProducer, KafkaUnavailable, TopicMissing, ensure_topics
from streaming.ledger import EventLedger
from streaming.local_broker import free_port

T0 = 1_767_225_600_000


def consume_until(consumer: EventConsumer, done, timeout_s: float = 60.0, on_batch=None) -> None:
    """Poll and commit until ``done()``; fail (not hang) if that does not happen in time."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"consumer stalled: {consumer.stats}"
        batch = consumer.poll(timeout_ms=500)
        if on_batch and batch:
            on_batch(batch)
        consumer.commit()


def sample_events(n_users: int = 20) -> list:
    events = []
    for u in range(n_users):
        user = f"user-{u}"
        imp = Impression(event_time=T0 + u, request_id=f"r{u}", user_id=user, item_id=f"i{u % 7}", position=u % 4,
                         slate_size=4, propensity=0.25, model_version="m1", policy_version="p1",
                         context={"device": "ios"}, features={"user_ctr_1h": 0.1 * (u % 3)})
        events += [
            imp,
            Click(event_time=T0 + 1000 + u, user_id=user, item_id=imp.item_id, request_id=imp.request_id),
            Purchase(event_time=T0 + 5000 + u, user_id=user, item_id=imp.item_id, request_id=imp.request_id,
                     quantity=2, revenue=19.9),
            Example(event_id=imp.event_id, event_time=T0 + 9000 + u, impression=imp, clicked=True, purchased=True,
                    click_time=T0 + 1000 + u, purchase_time=T0 + 5000 + u),
        ]
    for i in range(7):
        events.append(Item(event_time=T0, item_id=f"i{i}", title=f"Trail shoe {i}", description="light", category="shoes", price=80.0 + i))
    events.append(ModelUpdate(event_time=T0, kind="model", version="v1", artifact_uri="file:///r/v1", manifest_digest="0" * 64))
    events.append(ModelUpdate(event_time=T0, kind="policy", version="p1", artifact_uri="file:///r/p1", manifest_digest="1" * 64))
    events.append(DeadLetter(event_time=T0, topic="x", partition=0, offset=3, original_key=b"user-1", original_value=b"\x00", error="bad"))
    return events


def test_every_event_type_round_trips_keyed_and_co_partitioned(kafka: KafkaSettings):
    events = sample_events()
    with EventProducer(kafka) as producer:
        metadata = [(event, producer.send(event)) for event in events]
        producer.flush()
    placed = {event.event_id + event.type: future.get(timeout=10) for event, future in metadata}

    got = {}
    with EventConsumer(kafka, ["impressions", "clicks", "purchases", "items", "examples", "model-updates", "dlq"]) as consumer:
        consume_until(consumer, lambda: len(got) == len(events),
                      on_batch=lambda batch: got.update({(r.event.event_id + r.event.type): r for r in batch}))

    assert {k: r.event for k, r in got.items()} == {e.event_id + e.type: e for e in events}
    for key, record in got.items():
        event = record.event
        if event.type in ("impression", "click", "purchase"):
            expected_key = event.user_id
        elif event.type == "example":
            expected_key = event.impression.user_id
        elif event.type == "item":
            expected_key = event.item_id
        elif event.type == "model_update":
            expected_key = event.kind
        else:
            expected_key = event.original_key.decode()
        assert record.key == expected_key.encode()
        assert record.topic == kafka.topic_for(event)
        assert record.partition == placed[key].partition
    # impressions, clicks, purchases and examples of one user share a partition number: a local join
    partitions_of_user = {}
    for record in got.values():
        if record.event.type in ("impression", "click", "purchase", "example"):
            partitions_of_user.setdefault(record.key, set()).add(record.partition)
    assert len(partitions_of_user) == 20
    assert all(len(p) == 1 for p in partitions_of_user.values())
    assert len({next(iter(p)) for p in partitions_of_user.values()}) > 1  # users do spread over partitions


# -- malformed input: 10,000 hypothesis-generated bad messages among 10,000 good ones ----------------

def _valid_click_dict() -> dict:
    return json.loads(encode_event(Click(event_time=T0, user_id="u1", item_id="i1", request_id="r1")))


def _without(field: str) -> bytes:
    d = _valid_click_dict()
    d.pop(field)
    return json.dumps(d).encode()


def _with(field: str, value) -> bytes:
    d = _valid_click_dict()
    d[field] = value
    return json.dumps(d).encode()


_bad_values = {
    "event_time": st.sampled_from([-1, "yesterday", None, True, 1.5e30, [], {}]),
    "user_id": st.sampled_from(["", " padded", 5, None, [], "x" * 300]),
    "item_id": st.sampled_from(["", 7.5, None, {}]),
    "action": st.text(max_size=8).filter(lambda a: a not in ("click", "cart", "fav")),
    "schema_version": st.integers().filter(lambda v: v != 1),
    "type": st.sampled_from(["purchase", "impression", "CLICK", "", None]),
}
malformed = st.one_of(
    st.binary(max_size=64).map(lambda b: b"\xff" + b),  # not UTF-8
    st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=10), st.none())
    .map(lambda v: json.dumps(v).encode()),  # JSON, but not an object
    st.sampled_from(["user_id", "item_id", "event_time"]).map(_without),
    st.sampled_from(sorted(_bad_values)).flatmap(lambda f: _bad_values[f].map(lambda v: _with(f, v))),
    st.integers(1, 60).map(lambda k: encode_event(Click(event_time=T0, user_id="u", item_id="i"))[:-k]),  # truncated
    st.text(min_size=1, max_size=6).map(lambda k: _with("unexpected_" + k, 1)),
    st.just(encode_event(Purchase(event_time=T0, user_id="u", item_id="i"))),  # valid event, wrong topic
    st.just(b""),
)


def generate_malformed(n: int) -> list[bytes]:
    collected: list[bytes] = []

    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(malformed)
    def collect(message: bytes) -> None:
        collected.append(message)

    while len(collected) < n:  # hypothesis may end a run early once it has seen enough variety
        collect()
    return collected[:n]


def test_malformed_messages_go_to_the_dead_letter_topic_and_valid_ones_are_processed_once(kafka, tmp_path):
    bad = generate_malformed(10_000)
    good = [Click(event_time=T0 + i, user_id=f"u{i % 97}", item_id=f"i{i % 13}") for i in range(10_000)]
    resent = random.Random(7).sample(good, 500)  # producer-side retries: the same event twice
    messages = [("bad", m) for m in bad] + [("good", e) for e in good + resent]
    random.Random(11).shuffle(messages)

    bad_positions = Counter()
    with EventProducer(kafka) as producer:
        futures = []
        for kind, message in messages:
            if kind == "bad":
                futures.append(producer.send_raw(kafka.topic("clicks"), b"u-bad", message))
            else:
                producer.send(message)
        producer.flush()
    for future in futures:
        meta = future.get(timeout=10)
        bad_positions[(meta.topic, meta.partition, meta.offset)] += 1

    ledger = EventLedger(tmp_path / "ledger.sqlite")
    processed = Counter()

    def apply(batch):
        new = ledger.add_new([r.event.event_id for r in batch])
        processed.update(new)

    with EventConsumer(kafka, ["clicks"]) as consumer:
        consume_until(consumer, lambda: consumer.stats.records + consumer.stats.dead_letters == len(messages),
                      on_batch=apply, timeout_s=180)
        assert consumer.stats.dead_letters == len(bad)
        assert consumer.stats.records == len(good) + len(resent)

    assert len(processed) == len(good) and set(processed) == {e.event_id for e in good}
    assert max(processed.values()) == 1  # de-duplicated: each valid event applied exactly once

    letters = []
    with EventConsumer(kafka, ["dlq"], group_id=kafka.group_id + "-dlq") as dlq:
        consume_until(dlq, lambda: len(letters) >= len(bad), on_batch=lambda b: letters.extend(r.event for r in b))
    assert len(letters) == len(bad)
    assert Counter((d.topic, d.partition, d.offset) for d in letters) == bad_positions
    assert Counter(d.original_value or b"" for d in letters) == Counter(bad)
    assert all(d.error and d.original_key == b"u-bad" for d in letters)


def test_a_missing_topic_is_a_clear_error(kafka):
    with pytest.raises(TopicMissing, match=r"does not exist on .*; run `streamrec topics create`"):
        EventConsumer(kafka.model_copy(update={"topic_prefix": "nowhere."}), ["clicks"])


def test_an_unreachable_broker_is_a_clear_error():
    kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", bootstrap_timeout_ms=1500)
    with pytest.raises(KafkaUnavailable, match="no Kafka broker answered at 127.0.0.1"):
        EventProducer(kafka)
    with pytest.raises(KafkaUnavailable, match="streamrec dev kafka"):
        ensure_topics(kafka, timeout_s=2)


def test_ensure_topics_is_idempotent_and_uses_the_settings(kafka):
    assert ensure_topics(kafka) == []  # the fixture created them already
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(**kafka.client_options())
    try:
        for name in kafka.all_topics():
            assert len(consumer.partitions_for_topic(name)) == kafka.partitions
    finally:
        consumer.close()


def test_a_consumer_whose_fetching_gets_stuck_unsticks_itself_and_loses_nothing(kafka, monkeypatch):
    # kafka-python 3.x can stop fetching while partitions have records (seen in CI: positions frozen
    # at 0 with records to read). The stall is simulated inside the client: its one broker is left
    # marked as having a fetch in flight, so it never sends another; no re-seek can undo that.
    import streaming.kafka_io as kafka_io

    monkeypatch.setattr(kafka_io, "STALL_AFTER_S", 0.5)
    clicks = [Click(event_time=T0 + n, user_id=f"u{n % 9}", item_id=f"i{n % 4}") for n in range(300)]
    with EventProducer(kafka) as producer:
        for event in clicks[:100]:
            producer.send(event)
    consumer = EventConsumer(kafka, ["clicks"])
    seen: list[str] = []
    try:
        consume_until(consumer, lambda: len(set(seen)) >= 100, on_batch=lambda b: seen.extend(r.event.event_id for r in b))
        fetcher = consumer._consumer._fetcher
        monkeypatch.setattr(fetcher, "_clear_pending_fetch_request", lambda node_id, _: None)  # responses never clear it
        consumer.poll(timeout_ms=500)  # a fetch goes out, and its node stays "pending" for good
        with EventProducer(kafka) as producer:
            for event in clicks[100:]:
                producer.send(event)
        consume_until(consumer, lambda: len(set(seen)) >= 300, on_batch=lambda b: seen.extend(r.event.event_id for r in b))
    finally:
        consumer.close()
    assert set(seen) == {c.event_id for c in clicks}, "a record was skipped"
    assert consumer.stats.reseeks >= 1 and consumer.stats.reopens >= 1, consumer.stats
