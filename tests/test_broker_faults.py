"""The Kafka broker stopped and restarted mid-stream, on a private broker (the session's shared one
stays up for the other tests): producers keep every acknowledged event (a second copy only of a
send in flight at the stop); a consumer group pauses and resumes without a crash or a duplicate;
serving answers throughout, buffers its impressions up to the bound and delivers them after the
restart.

``LocalKafka.stop`` is a clean SIGTERM shutdown; ``start`` brings the broker back on the same
ports with the same data directory, so clients reconnect to the address they know.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import warnings

import pytest
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, TopicPartition

from feature_store.store import StreamingFeatureStore
from policies.synthetic_world import SyntheticWorld, WorldConfig
from serving.app import create_app
from serving.config import ServingSettings
from serving.service import RecommendationService
from serving.synthetic import build_synthetic_serving
from streaming.config import KafkaSettings
from streaming.events import Click, Event, Impression, decode_event
from streaming.kafka_io import DeliveryError, EventConsumer, EventProducer, ensure_topics
from streaming.local_broker import BrokerError, LocalKafka
from tests.waiting import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]
T0 = 1_767_225_600_000


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A broker of this module's own, to stop and restart."""
    try:
        local = LocalKafka(workdir=tmp_path_factory.mktemp("outage-kafka"), heap="512m").start()
    except BrokerError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the private Kafka broker could not be started: {exc}", pytrace=False)
        pytest.skip(f"no Kafka broker: {exc}")
    yield local
    local.remove()


@pytest.fixture
def kafka(broker) -> KafkaSettings:
    """Fresh topics on the private broker, which is up when each test starts."""
    if not broker.running:  # a previous test failed during its outage
        broker.start()
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix=f"o{uuid.uuid4().hex[:10]}.", partitions=3,
                             group_id=f"g{uuid.uuid4().hex[:10]}", bootstrap_timeout_ms=5_000, linger_ms=2,
                             retention_ms=-1)
    ensure_topics(settings)
    return settings


def click(n: int, prefix: str = "n") -> Click:
    return Click(event_id=f"{prefix}{n}", event_time=T0 + n, user_id=f"u{n % 11}", item_id=f"i{n % 5}")


def read_topic(kafka: KafkaSettings, suffix: str, timeout_s: float = 60, where: dict | None = None) -> list[Event]:
    """Every event on the topic, from the first offset to the end, duplicates included; ``where``, if
    given, gets each event_id's (partition, offset) copies."""
    consumer = KafkaConsumer(**kafka.client_options(), enable_auto_commit=False)
    try:
        topic = kafka.topic(suffix)
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        events: list[Event] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"read {len(events)} events of {sum(end.values())} on {topic}"
            for messages in consumer.poll(timeout_ms=500).values():
                for m in messages:
                    events.append(decode_event(m.value))
                    if where is not None:
                        where.setdefault(events[-1].event_id, []).append((m.partition, m.offset))
        return events
    finally:
        consumer.close()


class NumberedStream(threading.Thread):
    """Sends clicks n0, n1, ... at about ``rate`` per second through one producer, then closes it (which flushes)."""

    def __init__(self, kafka: KafkaSettings, n: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.kafka, self.n, self.rate = kafka, n, rate
        self.futures: list = []
        self.error: BaseException | None = None

    @property
    def acknowledged(self) -> int:
        return sum(1 for f in list(self.futures) if f.succeeded())

    def acknowledged_at(self, event_id: str) -> tuple[int, int] | None:
        """(partition, offset) the broker acknowledged for a numbered click."""
        future = self.futures[int(event_id[1:])]
        return (future.value.partition, future.value.offset) if future.succeeded() else None

    def run(self) -> None:
        try:
            with EventProducer(self.kafka) as producer:
                started = time.monotonic()
                for i in range(self.n):
                    self.futures.append(producer.send(click(i)))
                    ahead = started + (i + 1) / self.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)  # a paced stream, not one burst
                # the backlog of the outage: bounded by the delivery timeout, not close()'s 30 s
                producer.flush(timeout_s=None)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc


def test_producers_keep_every_acknowledged_event_across_a_broker_restart(broker, kafka):
    # A send is retried (idempotently: acks=all, enable_idempotence) until the broker acknowledges it or
    # the producer's delivery timeout passes: StreamRec's default is 120 s, and this outage lasts a few
    # seconds, so every send of the stream must be acknowledged after the restart.
    assert kafka.delivery_timeout_ms == 120_000
    assert kafka.producer_options()["enable_idempotence"] and kafka.producer_options()["acks"] == "all"
    # a second producer that gives up after 3 s shows the other outcome: a clear error its caller sees
    impatient = EventProducer(kafka, delivery_timeout_ms=3_000, request_timeout_ms=1_500)
    impatient.send(click(0, "early-"))
    impatient.flush()

    stream = NumberedStream(kafka, n=4_000, rate=1_000)
    stream.start()
    wait_for(lambda: stream.acknowledged >= 1_000 or stream.error, 60, "1000 acknowledged sends")
    outage_started = time.monotonic()
    broker.stop()
    sent_at_stop = len(stream.futures)
    # stop() returns once the broker has exited: every acknowledgement it will ever give has arrived
    acknowledged_at_stop = {i for i, f in enumerate(stream.futures[:sent_at_stop]) if f.succeeded()}
    assert sent_at_stop < stream.n, "the broker should go down mid-stream"

    for n in range(50):
        impatient.send(click(n, "late-"))
    with pytest.raises(DeliveryError, match=r"50 sends were not acknowledged") as failed:
        impatient.flush()
    assert "KafkaTimeoutError" in str(failed.value)
    wait_for(lambda: len(stream.futures) >= sent_at_stop + 500 or not stream.is_alive(), 60,
             "500 more sends while the broker is down")
    assert all(not f.is_done for f in stream.futures[sent_at_stop:]), "nothing is acknowledged while the broker is down"

    broker.start()
    outage_s = time.monotonic() - outage_started
    assert outage_s * 1000 < kafka.delivery_timeout_ms, "the outage must be shorter than the delivery timeout"
    stream.join(timeout=90)
    assert not stream.is_alive() and stream.error is None, f"the stream's producer failed: {stream.error!r}"
    assert all(f.is_done for f in stream.futures), "every send has an outcome"
    failed_sends = [f.exception for f in stream.futures if f.failed()]
    assert not failed_sends, f"{len(failed_sends)} sends failed, first: {failed_sends[0]!r}"

    impatient.send(click(1, "early-"))  # the same producer works again once the broker is back
    impatient.close()

    where: dict[str, list] = {}
    on_topic = [e.event_id for e in read_topic(kafka, "clicks", where=where)]
    numbered = [i for i in on_topic if i.startswith("n")]
    assert set(numbered) == {f"n{i}" for i in range(stream.n)}, "an acknowledged event is missing"
    # Idempotence removes the copies of retries while the broker is up. A send in flight as it shuts
    # down can be written and still answered NOT_LEADER_OR_FOLLOWER, and the restarted broker takes
    # its retry as new: that send, and only such a send, may be on the topic twice (consumers
    # de-duplicate by event_id). An event acknowledged before the stop, or sent after it, never is.
    twice = {i: (where[i], stream.acknowledged_at(i)) for i in set(numbered) if len(where[i]) > 1}
    in_flight_at_stop = {f"n{i}" for i in range(sent_at_stop) if i not in acknowledged_at_stop}
    assert set(twice) <= in_flight_at_stop, (
        f"events not in flight at the stop landed twice ((partition, offset) copies, acknowledged at): "
        f"{ {i: twice[i] for i in set(twice) - in_flight_at_stop} }")
    assert all(len(copies) == 2 for copies, _ in twice.values()), f"an event landed more than twice: {twice}"
    assert not [i for i in on_topic if i.startswith("late-")], "a send reported as failed landed anyway"
    assert sorted(i for i in on_topic if i.startswith("early-")) == ["early-0", "early-1"]


def test_a_consumer_group_pauses_during_a_broker_restart_and_resumes_without_loss_or_repeats(broker, kafka):
    kafka = kafka.model_copy(update={"max_poll_records": 50})
    with EventProducer(kafka) as producer:
        for i in range(3_000):
            producer.send(click(i))

    processed: list[tuple[int, int, str]] = []
    broker_down, handled_in_outage = threading.Event(), threading.Event()
    consumer = EventConsumer(kafka, ["clicks"])
    outcome: dict[str, object] = {}

    def handle(batch) -> None:  # the work: record each event; run() commits after it returns
        processed.extend((r.partition, r.offset, r.event.event_id) for r in batch)
        if len(processed) >= 750 and not handled_in_outage.is_set():
            broker_down.wait(60)  # this batch's commit, and the polls after it, meet the broker gone
            handled_in_outage.set()

    def run() -> None:
        try:
            outcome["stats"] = consumer.run(handle, install_signal_handlers=False)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        wait_for(lambda: len(processed) >= 750 or not worker.is_alive(), 60, "the consumer to be mid-stream")
        broker.stop()
        broker_down.set()
        wait_for(lambda: handled_in_outage.is_set() or not worker.is_alive(), 60, "the batch in hand to be processed")
        commits_in_outage = consumer.stats.commits  # its commit is waiting for the broker
        processed_in_outage = len(processed)
        broker.start()
        with EventProducer(kafka) as producer:  # new events after the restart: fetched from the restarted broker
            for i in range(3_000, 4_000):
                producer.send(click(i))
        wait_for(lambda: len(processed) >= 4_000 or not worker.is_alive(), 90, "every event processed")
    finally:
        consumer.stop()
        worker.join(timeout=60)
    assert "error" not in outcome, f"the consumer crashed: {outcome['error']!r}"
    assert processed_in_outage < 3_000 and consumer.stats.commits > commits_in_outage, "it resumed after the restart"

    ids = [event_id for _, _, event_id in processed]
    assert len(ids) == len(set(ids)) == 4_000, "an event was processed twice or never"
    assert set(ids) == {f"n{i}" for i in range(4_000)}
    # what the group committed is exactly what was processed: a restarted member would resume at the end
    checker = KafkaConsumer(**kafka.client_options(), group_id=kafka.group_id, enable_auto_commit=False)
    try:
        topic = kafka.topic("clicks")
        partitions = [TopicPartition(topic, p) for p in range(kafka.partitions)]
        end = checker.end_offsets(partitions)
        for tp in partitions:
            assert checker.committed(tp) == end[tp] == 1 + max(o for p, o, _ in processed if p == tp.partition)
    finally:
        checker.close()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    warnings.simplefilter("ignore")
    world = SyntheticWorld(WorldConfig(seed=8, n_users=30, n_items=40))
    return build_synthetic_serving(tmp_path_factory.mktemp("outage-shop"), world, n_requests=150)


def test_serving_answers_through_a_broker_restart_and_delivers_its_buffered_impressions(broker, kafka, shop):
    bound, k = 40, 4
    settings = ServingSettings(candidates=10, seed=0, impression_buffer=bound, impression_retry_s=0.2, default_k=k)
    service = RecommendationService(settings, registry=shop.registry, store=StreamingFeatureStore(shop.feature_store),
                                    kafka=kafka).start()
    logger = service.impressions
    responses: list[dict] = []

    def recommend(client: TestClient, n: int) -> None:
        for i in range(n):
            response = client.post("/recommend", json={"user_id": f"u{len(responses) % 30:04d}", "k": k})
            assert response.status_code == 200, response.text
            responses.append(response.json())

    try:
        with TestClient(create_app(service)) as client:
            recommend(client, 5)
            assert logger.wait_until_sent(30), "impressions are delivered while the broker is up"
            before = len(responses)

            broker.stop()
            started = time.perf_counter()
            recommend(client, 15)  # 60 impressions for a buffer of 40
            assert time.perf_counter() - started < 30, "requests do not wait for Kafka"
            dropped = 15 * k - bound
            assert logger.pending == bound and logger.dropped == dropped
            metrics = client.get("/metrics").text
            assert f"streamrec_impressions_dropped_total {float(dropped)}" in metrics
            assert f"streamrec_impressions_buffered {float(bound)}" in metrics
            assert logger.sent == before * k, "nothing is acknowledged while the broker is down"

            broker.start()
            assert logger.wait_until_sent(60), f"{logger.pending} impressions still waiting after the restart"
            recommend(client, 2)  # and new ones go straight through
            assert logger.wait_until_sent(30)
    finally:
        service.stop()

    shown = {(body["request_id"], item["item_id"]) for body in responses for item in body["items"]}
    assert len(shown) == len(responses) * k
    impressions = [e for e in read_topic(kafka, "impressions") if isinstance(e, Impression)]
    delivered = {(e.request_id, e.item_id) for e in impressions}
    assert delivered <= shown
    during_outage = [(body["request_id"], item["item_id"]) for body in responses[before:before + 15]
                     for item in body["items"]]
    # exactly the counted number of the outage's impressions were dropped; everything else reached the topic
    # (those waiting longest in the buffer go first; ones already handed to the producer are kept)
    missing = shown - delivered
    assert len(missing) == dropped and missing <= set(during_outage)
