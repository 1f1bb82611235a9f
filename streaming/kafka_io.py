"""Kafka I/O with kafka-python: topics, the one producer, the one consumer, the dead-letter path.

Delivery is at-least-once: :class:`EventConsumer` commits offsets only when its caller says the
work for a batch is durable (``commit`` after the work, or :meth:`EventConsumer.run`), and
downstream de-duplicates by ``event_id``. A message that does not decode or validate goes to the
``dlq`` topic with its topic, partition, offset, original bytes and the reason; the consumer
carries on and commits past it only once the dead letter is acknowledged by the broker.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from streaming.config import TOPICS, KafkaSettings
from streaming.events import DeadLetter, DecodeError, Event, EVENT_TYPES, decode_event, encode_event

log = logging.getLogger(__name__)
STALL_AFTER_S = 10.0  # empty polls with records to read before a partition is taken for stalled


class KafkaUnavailable(RuntimeError):
    """No broker answered; the message says where we looked and what to do."""


class TopicMissing(RuntimeError):
    pass


class DeliveryError(RuntimeError):
    """The broker did not acknowledge some sends after all retries."""


def _unavailable(kafka: KafkaSettings, exc: Exception) -> KafkaUnavailable:
    secured = ""
    if kafka.security_protocol != "PLAINTEXT":  # kafka-python reports a refused login or handshake as no answer
        secured = (f" with security_protocol={kafka.security_protocol}; if a broker runs there, check that its listener "
                   "speaks that protocol and the SASL username and password and SSL files (ssl_cafile, ssl_certfile, "
                   "ssl_keyfile, ssl_password)")
    return KafkaUnavailable(
        f"no Kafka broker answered at {kafka.bootstrap_servers} ({exc.__class__.__name__}){secured}; start one with "
        "`streamrec dev kafka` or point STREAMREC_KAFKA__BOOTSTRAP_SERVERS at your cluster"
    )


def ensure_topics(kafka: KafkaSettings, suffixes: Iterable[str] | None = None, timeout_s: float = 30.0) -> list[str]:
    """Create StreamRec's topics that do not exist yet; return the names that were created."""
    wanted = [kafka.topic(s) for s in (suffixes if suffixes is not None else TOPICS)]
    try:
        admin = KafkaAdminClient(**kafka.client_options(), request_timeout_ms=int(timeout_s * 1000))
    except KafkaTimeoutError as exc:
        raise _unavailable(kafka, exc) from None
    try:
        missing = sorted(set(wanted) - set(admin.list_topics()))
        if missing:
            configs = {"retention.ms": str(kafka.retention_ms)}
            new = [NewTopic(n, kafka.partitions, kafka.replication_factor, topic_configs=configs) for n in missing]
            try:
                admin.create_topics(new, timeout_ms=int(timeout_s * 1000), wait_for_metadata=True)
            except TopicAlreadyExistsError:
                pass  # another process created them between our list and create
        _wait_for_leaders(kafka, wanted, timeout_s)
        return missing
    finally:
        admin.close()


def _wait_for_leaders(kafka: KafkaSettings, topics: list[str], timeout_s: float) -> None:
    consumer = KafkaConsumer(**kafka.client_options())
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            consumer._client.cluster.request_update()  # metadata may lag topic creation
            known = consumer.topics()
            if all(t in known and consumer.partitions_for_topic(t) for t in topics):
                return
            if time.monotonic() > deadline:
                raise TopicMissing(f"topics {sorted(set(topics) - known)} have no leader after {timeout_s}s")
            time.sleep(0.1)
    finally:
        consumer.close()


_KEY_FIELD = {event_type: key_field for event_type, key_field in TOPICS.values()}


def event_key(event: Event) -> bytes | None:
    """The partitioning key DESIGN.md gives each topic: user_id, item_id, kind or the original key."""
    if isinstance(event, DeadLetter):
        return event.original_key
    return getattr(event, _KEY_FIELD[event.type]).encode("utf-8")  # type: ignore[attr-defined]


class EventProducer:
    """The one place that opens a Kafka producer: acks=all, idempotent, retries, compression."""

    def __init__(self, kafka: KafkaSettings, **overrides) -> None:
        self.kafka = kafka
        try:
            self._producer = KafkaProducer(**{**kafka.producer_options(), **overrides})
        except KafkaTimeoutError as exc:
            raise _unavailable(kafka, exc) from None
        self._lock = threading.Lock()
        self._failures: list[str] = []
        self._topic_of_type = {event_type: kafka.topic(suffix) for suffix, (event_type, _) in TOPICS.items()}
        self.sent = 0

    def send(self, event: Event, topic: str | None = None):
        """Send one event to its topic, keyed and timestamped (Kafka timestamp = event time)."""
        return self.send_raw(
            topic or self._topic_of_type[event.type],  # type: ignore[attr-defined]
            event_key(event),
            encode_event(event),
            event.event_time,
        )

    def send_raw(self, topic: str, key: bytes | None, value: bytes | None, timestamp_ms: int | None = None):
        future = self._producer.send(topic, value=value, key=key, timestamp_ms=timestamp_ms)
        future.add_errback(self._record_failure, topic)
        self.sent += 1
        return future

    def _record_failure(self, topic: str, exc: BaseException) -> None:
        with self._lock:
            self._failures.append(f"{topic}: {exc!r}")

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every send so far is acknowledged; raise if any was not."""
        self._producer.flush(timeout=timeout_s)
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            raise DeliveryError(
                f"{len(failures)} sends were not acknowledged by Kafka at {self.kafka.bootstrap_servers} within the "
                f"producer's delivery timeout (retried until then); the caller must resend them; first: {failures[0]}"
            )

    def close(self, timeout_s: float | None = 30.0) -> None:
        if self._producer._closed:
            return
        try:
            self.flush(timeout_s)
        finally:
            self._producer.close(timeout=timeout_s)

    def __enter__(self) -> "EventProducer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Record:
    """A decoded event with where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    event: Event


@dataclass
class ConsumerStats:
    records: int = 0
    dead_letters: int = 0
    batches: int = 0
    commits: int = 0
    reseeks: int = 0  # stalled partitions re-sought (see EventConsumer._watch_for_stalls)
    reopens: int = 0  # clients replaced because a re-seek did not unstick them
    by_topic: dict[str, int] = field(default_factory=dict)


class _ForgetRevoked(ConsumerRebalanceListener):
    """Partitions taken away in a rebalance: their polled-but-uncommitted offsets are not ours to commit.

    Their new owner starts from the last committed offset, so the records are redelivered (at-least-once).
    """

    def __init__(self, consumer: "EventConsumer") -> None:
        self.consumer = consumer

    def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self.consumer._uncommitted.pop(tp, None)

    def on_partitions_assigned(self, assigned) -> None:
        log.info("assigned %d partitions: %s", len(assigned),
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)) or "none")


class EventConsumer:
    """Consumer-group reader of StreamRec topics with batch polls, manual commits and a DLQ.

    ``poll`` decodes a batch; bad messages are routed to ``dlq`` and left out of it. ``commit``
    marks everything polled so far as done. ``run`` loops poll -> handler -> commit until
    :meth:`stop` is called or the process gets SIGTERM/SIGINT, then commits and closes.
    While the broker is unreachable, ``poll`` returns empty batches and ``commit`` waits for it to
    answer, so a broker restart pauses the consumer instead of crashing it.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Iterable[str],
        group_id: str | None = None,
        dead_letters: EventProducer | None = None,
        **overrides,
    ) -> None:
        self.kafka = kafka
        self.topics = [t if t.startswith(kafka.topic_prefix) else kafka.topic(t) for t in topics]
        try:
            self._options = {**kafka.consumer_options(group_id), **overrides}
            self._consumer = KafkaConsumer(**self._options)
        except KafkaTimeoutError as exc:
            raise _unavailable(kafka, exc) from None
        missing = set(self.topics) - self._consumer.topics()
        if missing:
            self._consumer.close()
            raise TopicMissing(
                f"topic {', '.join(sorted(missing))} does not exist on {kafka.bootstrap_servers}; "
                "run `streamrec topics create`"
            )
        self._consumer.subscribe(self.topics, listener=_ForgetRevoked(self))
        self._dead_letters = dead_letters
        self._owns_dead_letters = dead_letters is None
        self._expected = {kafka.topic(s): EVENT_TYPES[t] for s, (t, _) in TOPICS.items()}
        self._uncommitted: dict[TopicPartition, int] = {}
        self._stop = threading.Event()
        self._closed = False
        self._outage_since: float | None = None
        self._stall_checked_at = time.monotonic()
        self._stalled_at: dict[TopicPartition, int | None] = {}  # position at the last check, if behind
        self._reseeked: set[TopicPartition] = set()  # re-sought at the last check
        self._polled_since_check = False  # whether any poll returned records since the last check
        self.stats = ConsumerStats()

    # -- reading -------------------------------------------------------------------------------
    def poll(self, timeout_ms: int | None = None, max_records: int | None = None) -> list[Record]:
        """The next batch of decoded records; an empty batch while the broker is unreachable."""
        timeout_ms = self.kafka.poll_timeout_ms if timeout_ms is None else timeout_ms
        try:
            raw = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            if not exc.retriable:
                raise
            # a broker restart or a network blip: nothing was consumed, so the caller just polls again
            self._note_outage("poll", exc)
            self._stop.wait(max(timeout_ms, 100) / 1000)
            return []
        self._note_recovery("poll")
        self._polled_since_check = self._polled_since_check or bool(raw)
        self._watch_for_stalls()
        records: list[Record] = []
        for tp, messages in raw.items():
            expected = self._expected.get(tp.topic)
            for m in messages:
                try:
                    if m.value is None:
                        raise DecodeError("empty message (null value)")
                    event = decode_event(m.value, expected)
                except DecodeError as exc:
                    self._dead_letter(m, exc.reason)
                    continue
                records.append(Record(m.topic, m.partition, m.offset, m.key, event))
                self.stats.by_topic[m.topic] = self.stats.by_topic.get(m.topic, 0) + 1
            if messages:
                self._uncommitted[tp] = messages[-1].offset + 1
        self.stats.records += len(records)
        self.stats.batches += 1 if raw else 0
        return records

    def _watch_for_stalls(self) -> None:
        """Every ``STALL_AFTER_S`` in which poll returned nothing: re-seek an assigned partition that
        had records to read at the last check and has not moved since.

        kafka-python 3.x can leave a partition unfetched after a rebalance or a metadata change
        while the others flow (dpkp/kafka-python#3106, #3131): its position never moves and poll
        keeps coming back empty. Seeking to the same position resets its fetch state; nothing is
        skipped or read twice, since the position is the next record the caller has not seen. Where
        that does not help either (seen in CI: the client's fetch pipeline stuck, not one partition),
        the client is replaced; the new one resumes from the committed offsets (at-least-once, as
        after a rebalance).
        """
        now = time.monotonic()
        if now - self._stall_checked_at < STALL_AFTER_S or self._outage_since is not None:
            return
        self._stall_checked_at = now
        if self._polled_since_check:
            # records flowed: a partition that waits its turn behind a backlog is not stalled
            self._polled_since_check = False
            self._stalled_at.clear()
            self._reseeked.clear()
            return
        try:
            assigned = sorted(self._consumer.assignment() - self._consumer.paused())
            if not assigned:
                return
            ends = self._consumer.end_offsets(assigned, timeout_ms=5_000)
            stalled = []
            for tp in assigned:
                position = self._consumer.position(tp, timeout_ms=5_000)
                behind = ends.get(tp, 0) - position if position is not None else 0
                if behind > 0 and self._stalled_at.get(tp) == position:
                    stalled.append((tp, position, behind))
                self._stalled_at[tp] = position if behind > 0 else None
            if not stalled:
                self._reseeked.clear()
                return
            if any(tp in self._reseeked for tp, _, _ in stalled):
                # re-seeking did not help: the client's fetch pipeline itself is stuck
                log.warning("%s still stalled after a re-seek: reopening the consumer (records polled but not "
                            "committed come again)", ", ".join(f"{tp.topic}[{tp.partition}]" for tp, _, _ in stalled))
                self._reopen()
                return
            for tp, position, behind in stalled:
                log.warning("%s[%d] has %d records to read but has not moved from %d for %.0f s: re-seeking it",
                            tp.topic, tp.partition, behind, position, STALL_AFTER_S)
                self._consumer.seek(tp, position)
                self._reseeked.add(tp)
                self.stats.reseeks += 1
        except KafkaError as exc:  # the broker is away: the outage handling in poll covers it
            log.debug("stall check skipped: %r", exc)

    def _reopen(self) -> None:
        """A new client in place of a stuck one; it resumes from the group's committed offsets."""
        old, self._consumer = self._consumer, None
        try:
            old.close(autocommit=False)
        except Exception as exc:  # noqa: BLE001 - a stuck client may not close cleanly; it is dropped either way
            log.debug("closing the stuck consumer: %r", exc)
        self._uncommitted.clear()  # not ours to commit: the new client reads them again
        self._stalled_at.clear()
        self._reseeked.clear()
        try:
            self._consumer = KafkaConsumer(**self._options)
        except KafkaTimeoutError as exc:
            raise _unavailable(self.kafka, exc) from None
        self._consumer.subscribe(self.topics, listener=_ForgetRevoked(self))
        self.stats.reopens += 1

    def _dead_letter(self, message, reason: str) -> None:
        if self._dead_letters is None:
            self._dead_letters = EventProducer(self.kafka)
        letter = DeadLetter(
            event_time=message.timestamp if message.timestamp and message.timestamp >= 0 else int(time.time() * 1000),
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            original_key=message.key,
            original_value=message.value,
            error=reason,
        )
        self._dead_letters.send(letter, topic=self.kafka.topic("dlq"))
        self.stats.dead_letters += 1
        log.warning("dead-lettered %s[%d]@%d: %s", message.topic, message.partition, message.offset, reason)

    # -- committing ----------------------------------------------------------------------------
    def commit(self, timeout_s: float | None = None) -> None:
        """Commit everything polled so far: call only once the caller's work for it is durable.

        While the broker is unreachable (a restart, a network blip) the commit is retried until it
        answers. ``timeout_s``, or :meth:`stop`, ends the wait with :class:`KafkaUnavailable`; the
        records since the last commit are then redelivered to the group (at-least-once).
        """
        if not self._uncommitted:
            return
        if self._dead_letters is not None:
            self._dead_letters.flush()  # a dead letter must be durable before we commit past it
        offsets = {tp: OffsetAndMetadata(off, "", -1) for tp, off in self._uncommitted.items()}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        backoff_s = 0.1
        while True:
            try:
                self._consumer.commit(offsets)
                break
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                self._note_outage("commit", exc)
                if self._stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                    raise KafkaUnavailable(
                        f"could not commit offsets: no Kafka broker answered at {self.kafka.bootstrap_servers} "
                        f"({exc.__class__.__name__}); the records since the last commit will be delivered again"
                    ) from None
                self._stop.wait(backoff_s if deadline is None else max(0.0, min(backoff_s, deadline - time.monotonic())))
                backoff_s = min(2 * backoff_s, 2.0)
        self._note_recovery("commit")
        self._uncommitted.clear()
        self.stats.commits += 1

    def _note_outage(self, what: str, exc: Exception) -> None:
        if self._outage_since is None:  # once per outage, not once per retry
            self._outage_since = time.monotonic()
            log.warning("consumer %s failed (%r): Kafka at %s is unreachable; retrying until it answers",
                        what, exc, self.kafka.bootstrap_servers)

    def _note_recovery(self, what: str) -> None:
        if self._outage_since is not None:
            log.warning("consumer %s works again after %.1fs without Kafka", what, time.monotonic() - self._outage_since)
            self._outage_since = None

    def committed(self, topic: str, partition: int) -> int | None:
        return self._consumer.committed(TopicPartition(topic, partition))

    def assignment(self) -> set[TopicPartition]:
        return self._consumer.assignment()

    # -- the loop ------------------------------------------------------------------------------
    def run(
        self,
        handle: Callable[[list[Record]], None],
        until: Callable[[], bool] | None = None,
        install_signal_handlers: bool = True,
    ) -> ConsumerStats:
        """poll -> ``handle(batch)`` (must make its effects durable) -> commit, until stopped."""
        previous = self._install_signals() if install_signal_handlers else {}
        try:
            while not self._stop.is_set() and not (until and until()):
                batch = self.poll()
                if batch:
                    handle(batch)
                self.commit()
            return self.stats
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: self.stop())
        return previous

    def stop(self) -> None:
        """Ask ``run`` to finish the batch in hand, commit it and return."""
        self._stop.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._dead_letters is not None and self._owns_dead_letters:
                self._dead_letters.close()
        except KafkaError as exc:  # pragma: no cover - the broker went away during shutdown
            log.error("closing the dead-letter producer failed: %s", exc)
        finally:
            self._consumer.close(autocommit=False)

    def __enter__(self) -> "EventConsumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
