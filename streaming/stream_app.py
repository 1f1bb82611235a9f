"""The live stream processor: a Faust app whose agents run the joiner and the aggregates.

Thin shells around the pure core (``streaming.joiner``, ``streaming.aggregates``):

* ``join`` reads impressions, clicks and purchases (co-partitioned by user_id), runs the joiner
  with its state in the ``join-state`` and ``join-watermarks`` tables, sends settled examples to
  ``examples`` and late or undecodable events to ``dlq``, folds each event into the user's
  aggregates (``user-aggregates`` table), and re-keys it by item_id onto ``item-activity``.
* ``item_stats`` reads ``items`` and ``item-activity`` (co-partitioned by item_id) into the
  ``item-aggregates`` table.
* Both send their feature updates to ``feature-updates``; ``push_features`` takes them in batches
  and hands each batch to the feature sink (Feast) before the batch's offsets are committed.
* Windows close when the watermark passes them, and the join agent looks for that after its
  messages. When a partition goes quiet before it has looked with every input caught up (the end
  of a replay, a restart with nothing new to read), a timer sends a tick onto ``join-ticks``
  (co-partitioned with the inputs, so the tick reaches the worker that owns the partition): the
  agent sweeps on it. Tables can only change inside an agent, hence a message and not a callback.

Tables live in memory and in changelog topics, so a restarted worker rebuilds its state from
Kafka. Delivery is at-least-once: sends are buffered (``send_soon``) and Faust flushes its
producer before it commits source offsets; examples carry deterministic event ids, so a
consumer de-duplicates what a crash makes the worker send twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import faust
from faust.types import TP

from streaming.aggregates import DEFAULT_CONFIG, AggregateConfig, update_item, update_user
from streaming.config import KafkaSettings, hide_in_client_logs
from streaming.events import (
    EVENT_TYPES, Click, DeadLetter, DecodeError, Event, Impression, Item, Purchase, decode_event, encode_event,
)
from streaming.features import FeatureUpdate
from streaming.joiner import SOURCES, JoinerConfig, LabelJoiner

log = logging.getLogger(__name__)
FeatureSink = Callable[[list[FeatureUpdate]], None]
# A restarted worker (memory store) replays its tables' changelogs from the start, and the broker
# compacts only closed segments: with Kafka's defaults (1 GiB or 7-day segments) recovery replays
# every write ever made. Small segments and an eager cleaner keep it near one record per key.
CHANGELOG_CONFIG = {"segment.ms": str(10 * 60_000), "segment.bytes": str(64 * 2**20), "min.cleanable.dirty.ratio": "0.2"}
FLUSH_AT_STOP_S = 30.0  # how long a flush waits for deliveries once the producer is stopping
_SOURCE_TOPICS = {"impression": "impressions", "click": "clicks", "purchase": "purchases"}


def broker_credentials(kafka: KafkaSettings):
    """Faust's form of the same SASL/SSL settings every kafka-python client gets."""
    hide_in_client_logs(kafka.sasl_plain_password, kafka.ssl_password)
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=kafka.ssl_cafile)
        context.check_hostname = kafka.ssl_check_hostname
        if kafka.ssl_certfile:
            # "" rather than None: an encrypted key without its password fails here instead of prompting
            password = kafka.ssl_password.get_secret_value() if kafka.ssl_password else ""
            context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile, password)
    if kafka.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=kafka.sasl_plain_username,
            password=kafka.sasl_plain_password.get_secret_value() if kafka.sasl_plain_password else None,
            mechanism=kafka.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def encode_feature_update(update: FeatureUpdate) -> bytes:
    # vars, not dataclasses.asdict: asdict deep-copies every value, a fifth of the join agent's time
    return json.dumps(vars(update), separators=(",", ":")).encode()


def decode_feature_update(data: bytes) -> FeatureUpdate:
    return FeatureUpdate(**json.loads(data))


class ProducerSendError(RuntimeError):
    """A buffered send failed: committing input offsets past it would lose what it carried."""


def complete_flushes(buffer) -> None:
    """Make the producer buffer's ``flush`` wait until every message put before it is delivered.

    Faust flushes its producer and then commits the input offsets, and that order is the whole of
    at-least-once: the table changelog writes and the examples an event caused must be in Kafka
    before its offset is committed. faust-streaming 0.15's ``ProducerBuffer.flush`` returns as soon
    as 0.1 s pass without a message leaving the buffer, and never waits for the message being
    handed to the client. On a busy machine it returned with writes still queued, Faust committed
    past them, and a worker killed at that moment lost them: after its restart a click that had
    been read was neither in the restored join state nor re-read, and its impression came out
    unclicked. So each message put is tracked until its delivery is confirmed, and a flush waits
    for those put before it began (the agents go on sending meanwhile; waiting for those too would
    never end under load). A send that failed makes every later flush raise, so nothing is
    committed past a lost write (the worker stops, and a restart re-reads from the last commit).
    """
    outstanding: set[asyncio.Future] = set()
    failed: list[str] = []
    put = buffer.put

    def settled(future: asyncio.Future) -> None:
        outstanding.discard(future)
        error = "cancelled" if future.cancelled() else future.exception()
        if error is not None:
            failed.append(f"{future.message.channel.get_topic_name()}: {error}")

    def put_tracked(future) -> None:
        outstanding.add(future)
        future.add_done_callback(settled)
        put(future)

    async def flush() -> None:
        waiting = set(outstanding)
        stopped_at = None
        while waiting and not failed:
            if buffer.state != "running":  # shutting down: the client may never answer what is left
                if buffer.size:
                    raise RuntimeError("cannot flush: the producer buffer stopped with messages queued")
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > FLUSH_AT_STOP_S:
                    raise RuntimeError(f"cannot flush: {len(waiting)} send(s) unconfirmed after the producer stopped")
            _, waiting = await asyncio.wait(waiting, timeout=1.0)
        if failed:
            raise ProducerSendError(f"{len(failed)} send(s) failed, the first {failed[0]}; not committing past them")

    buffer.put = put_tracked
    buffer.flush = flush


class _FlushCounter(faust.Sensor):
    """Counts offset commits that happened, each preceded by a producer flush, into ``joiner.generation``.

    Faust flushes its producer and then commits; the committed offsets change only when that
    happened, so a commit that moved them marks every message queued before its flush as durable.
    """

    def __init__(self, joiner: LabelJoiner) -> None:
        super().__init__()
        self.joiner = joiner

    def on_commit_initiated(self, consumer):
        return dict(getattr(consumer, "_committed_offset", {}))

    def on_commit_completed(self, consumer, state) -> None:
        if dict(getattr(consumer, "_committed_offset", {})) != state:
            self.joiner.generation += 1


class StreamWorker:
    """Builds the Faust app; ``app`` is what ``faust.Worker`` runs."""

    def __init__(
        self,
        kafka: KafkaSettings,
        joiner: JoinerConfig | None = None,
        aggregates: AggregateConfig = DEFAULT_CONFIG,
        feature_sink: FeatureSink | None = None,
        app_id: str = "streamrec-stream",
        data_dir: str = "streamrec-data/faust",
        sweep_interval_s: float = 1.0,
        feature_batch: int = 1000,
        instance_id: str | None = None,
        idle_after_s: float = 3.0,
    ) -> None:
        self.kafka = kafka
        self.aggregate_config = aggregates
        self.feature_sink = feature_sink
        self.sweep_interval_s = sweep_interval_s
        self.idle_after_s = idle_after_s
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.app = faust.App(
            app_id,
            broker=[f"kafka://{s.strip()}" for s in kafka.bootstrap_servers.split(",")],
            broker_credentials=broker_credentials(kafka),
            store="memory://",
            datadir=data_dir,
            topic_partitions=kafka.partitions,
            topic_replication_factor=kafka.replication_factor,
            consumer_auto_offset_reset="earliest",
            consumer_group_instance_id=instance_id,
            broker_session_timeout=kafka.session_timeout_ms / 1000,
            producer_acks=-1,
            processing_guarantee="at_least_once",
            producer_linger_ms=5,
            producer_compression_type="lz4",
            web_enabled=False,
            table_cleanup_interval=3600.0,
        )
        raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        internal = dict(raw, internal=True, partitions=kafka.partitions, replicas=kafka.replication_factor)
        self.ticks = self.app.topic(kafka.topic("join-ticks"), **internal)
        self.sources = self.app.topic(*(kafka.topic(_SOURCE_TOPICS[s]) for s in SOURCES), self.ticks.get_topic_name(),
                                      **raw)
        self.items = self.app.topic(kafka.topic("items"), **raw)
        self.item_activity = self.app.topic(kafka.topic("item-activity"), **internal)
        self.feature_updates = self.app.topic(kafka.topic("feature-updates"), **internal)
        self.examples = self.app.topic(kafka.topic("examples"), **raw)
        self.dead_letters = self.app.topic(kafka.topic("dlq"), **raw)

        # keys and values as JSON, Faust's default; changelogs compacted as they grow (see CHANGELOG_CONFIG)
        table = dict(default=None, partitions=kafka.partitions, extra_topic_configs=CHANGELOG_CONFIG)
        self.join_state = self.app.Table("join-state", **table)
        self.join_watermarks = self.app.Table("join-watermarks", **table)
        self.user_aggregates = self.app.Table("user-aggregates", **table)
        self.item_aggregates = self.app.Table("item-aggregates", **table)
        # the outbox: a closed window's example stays in its user's state record until a producer
        # flush has carried it to Kafka, so a crash between the two cannot lose it
        self.joiner = LabelJoiner(joiner, states=self.join_state, watermarks=self.join_watermarks, outbox=True,
                                  committed=self._committed_offset)
        self.app.sensors.add(_FlushCounter(self.joiner))
        # tables are (re)filled from their changelogs at every rebalance: users that come back with open
        # windows and no new events must still be swept
        self.app.on_rebalance_complete.connect(self._on_tables_recovered)

        self._source_of = {kafka.topic(_SOURCE_TOPICS[s]): s for s in SOURCES}
        self._processed: dict[TP, int] = {}
        self._last_sweep: dict[int, float] = {}
        self._last_message: dict[int, float] = {}
        self._active_at: dict[TP, float] = {}  # input partition -> when it last had something to read
        self._swept_caught_up: dict[int, bool] = {}  # partition -> whether its last sweep saw every input read
        self.app.agent(self.sources, name="join")(self._join)
        self.app.timer(sweep_interval_s, name="join-ticks")(self._tick_quiet_partitions)
        self.app.agent(self.items, name="item-catalog")(self._item_stats)
        self.app.agent(self.item_activity, name="item-stats")(self._item_stats)
        if feature_sink is not None:
            self._feature_batch = feature_batch
            self.app.agent(self.feature_updates, name="push-features")(self._push_features)

    # -- agents ----------------------------------------------------------------------------------
    async def _join(self, stream) -> None:
        async for message in stream.events():
            record = message.message
            if record.topic not in self._source_of:  # a tick: only look for windows to close
                self._sweep(record.partition, self._idle_sources(record.partition), force=True)
                continue
            self._last_message[record.partition] = self._active_at[TP(record.topic, record.partition)] = time.monotonic()
            self._swept_caught_up[record.partition] = False  # until a sweep sees every input read again
            self._processed[TP(record.topic, record.partition)] = record.offset
            idle = self._idle_sources(record.partition)
            event = self._decode(message, EVENT_TYPES[self._source_of[record.topic]])
            if event is not None:
                self._join_one(message, event, record.partition, idle)
            self._sweep(record.partition, idle)  # after every message, bad ones too: the last may be bad

    def _join_one(self, message, event: Event, partition: int, idle: tuple[str, ...]) -> None:
        result = self.joiner.process(event, partition, idle, offset=message.message.offset)
        for example in result.examples:
            self.examples.send_soon(key=example.user_id.encode(), value=encode_event(example))
        for _, reason in result.late:
            self._dead_letter(message, reason)
        if result.late:
            return  # a late event changes no feature either
        # a repeat the joiner already saw still goes on: after a crash the join state's changelog may
        # hold an event whose aggregate update was lost; the aggregates de-duplicate by event_id
        user_id = event.user_id  # type: ignore[attr-defined]
        state, update = update_user(self.user_aggregates.get(user_id), event, self.aggregate_config)
        self.user_aggregates[user_id] = state
        self._send_features(update)
        self.item_activity.send_soon(key=event.item_id.encode(), value=message.value)  # type: ignore[attr-defined]

    async def _item_stats(self, stream) -> None:
        async for message in stream.events():
            expected = Item if message.message.topic == self.items.get_topic_name() else None
            event = self._decode(message, expected)
            if event is None:
                continue
            if not isinstance(event, (Impression, Click, Purchase, Item)):
                self._dead_letter(message, f"{event.type} does not belong on {message.message.topic}")  # type: ignore[attr-defined]
                continue
            state, update = update_item(self.item_aggregates.get(event.item_id), event, self.aggregate_config)
            self.item_aggregates[event.item_id] = state
            self._send_features(update)

    async def _push_features(self, stream) -> None:
        loop = asyncio.get_running_loop()
        async for batch in stream.take(self._feature_batch, within=0.5):
            updates = [decode_feature_update(value) for value in batch]
            # Feast's client blocks: run it off the event loop; offsets commit after it returns
            await loop.run_in_executor(None, self.feature_sink, updates)

    async def _on_tables_recovered(self, app, **kwargs) -> None:
        self.joiner.reindex()
        self._swept_caught_up.clear()  # restored state may hold windows its watermark has passed

    async def _tick_quiet_partitions(self) -> None:
        """Tick each owned partition that went quiet before a sweep saw all its inputs read."""
        now = time.monotonic()
        owned = {tp.partition for tp in self.app.consumer.assignment()
                 if tp.topic == self.kafka.topic("impressions")}
        for partition in sorted(owned):
            quiet = now - self._last_message.get(partition, 0.0) >= self.sweep_interval_s
            if quiet and not self._swept_caught_up.get(partition, False):
                await self.ticks.send(key=b"tick", value=b"", partition=partition)

    # -- helpers -----------------------------------------------------------------------------------
    def _committed_offset(self, source: str, partition: str) -> int | None:
        """The group's committed next offset of ``source``'s partition (known once it is assigned)."""
        committed = getattr(self.app.consumer, "_committed_offset", {})
        return committed.get(TP(self.kafka.topic(_SOURCE_TOPICS[source]), int(partition)))

    def _idle_sources(self, partition: int) -> tuple[str, ...]:
        """Inputs of this partition with nothing left to read for ``idle_after_s``: they must not
        hold the watermark back.

        Caught up is not enough. A producer sends each topic's partition in its own batch, so one
        input can be read to its end while the records that follow it in event time are still on
        their way and another input's have already arrived; at replay speed that skew is minutes of
        event time, and the late input's events would be taken for late data. So an input counts
        as idle only after it has stayed caught up for a while (Flink's ``withIdleness``).
        """
        # where this worker resumed each input after (re)start: Faust's committed "next offset"
        resumed = getattr(self.app.consumer, "_committed_offset", {})
        now = time.monotonic()
        idle = []
        for source in SOURCES:
            tp = TP(self.kafka.topic(_SOURCE_TOPICS[source]), partition)
            highwater = self.app.consumer.highwater(tp)
            if highwater is None:
                continue  # not fetched yet: it may hold older events
            processed = self._processed.get(tp)
            next_offset = processed + 1 if processed is not None else (resumed.get(tp) or 0)
            if next_offset < highwater:
                self._active_at[tp] = now
            elif now - self._active_at.setdefault(tp, now) >= self.idle_after_s:
                idle.append(source)
        return tuple(idle)

    def _sweep(self, partition: int, idle: tuple[str, ...], force: bool = False) -> None:
        """Close the windows the watermark has passed for quiet users, now and then and when caught up."""
        now = time.monotonic()
        caught_up = len(idle) == len(SOURCES)
        if not (caught_up or force) and now - self._last_sweep.get(partition, 0.0) < self.sweep_interval_s:
            return
        self._last_sweep[partition] = now
        self._swept_caught_up[partition] = caught_up
        for example in self.joiner.close_expired(partition, idle):
            self.examples.send_soon(key=example.user_id.encode(), value=encode_event(example))

    def _decode(self, message, expected: type[Event] | None) -> Event | None:
        try:
            if message.value is None:
                raise DecodeError("empty message (null value)")
            return decode_event(message.value, expected)
        except DecodeError as exc:
            self._dead_letter(message, exc.reason)
            return None

    def _dead_letter(self, message, reason: str) -> None:
        record = message.message
        letter = DeadLetter(
            event_time=int((record.timestamp or time.time()) * 1000), topic=record.topic, partition=record.partition,
            offset=record.offset, original_key=message.key, original_value=message.value, error=reason,
        )
        self.dead_letters.send_soon(key=message.key, value=encode_event(letter))
        log.warning("dead-lettered %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason)

    def _send_features(self, update: FeatureUpdate | None) -> None:
        if update is not None:
            self.feature_updates.send_soon(key=update.key.encode(), value=encode_feature_update(update))

    def prepare_producer(self) -> None:
        """Tune and guard Faust's producer; call once the event loop the app will run on is current."""
        buffer = self.app.producer.buffer
        # Faust pauses the stream to drain its send buffer whenever it passes 100 messages, one
        # message at a time; each event here sends ~7 (changelogs, features, re-keyed activity)
        buffer.max_messages = 5000
        complete_flushes(buffer)

    def run(self, loglevel: str = "warning") -> None:
        """Run the worker in this process until SIGTERM/SIGINT."""
        worker = faust.Worker(self.app, loglevel=loglevel, quiet=True)
        self.prepare_producer()
        worker.execute_from_commandline()
