"""Replay logged events in event-time order, in-process or into Kafka, at a chosen speed.

``speed`` is event-time seconds per wall-clock second: 1 replays in real time, 60 replays an hour
a minute, 0 replays as fast as the sink takes them. Pacing only delays delivery; the events and
their event times are never changed, so every downstream result is the same at any speed.

>>> from streaming.events import Click
>>> events = [Click(event_id=str(t), event_time=t, user_id="u", item_id="i") for t in (30, 10, 20)]
>>> [e.event_time for e in replay_in_process(events)]
[10, 20, 30]
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition

from streaming.config import TOPICS, KafkaSettings
from streaming.events import DecodeError, Event, EVENT_TYPES, decode_event
from streaming.kafka_io import EventProducer


@dataclass
class ReplayStats:
    events: int = 0
    by_type: Counter = field(default_factory=Counter)
    first_event_time: int | None = None
    last_event_time: int | None = None
    wall_seconds: float = 0.0

    def count(self, event: Event) -> None:
        self.events += 1
        self.by_type[event.type] += 1  # type: ignore[attr-defined]
        if self.first_event_time is None:
            self.first_event_time = event.event_time
        self.last_event_time = event.event_time

    @property
    def event_span_seconds(self) -> float:
        if self.first_event_time is None or self.last_event_time is None:
            return 0.0
        return (self.last_event_time - self.first_event_time) / 1000

    @property
    def achieved_speed(self) -> float:
        """Event time covered per wall second (what ``speed`` asked for, as measured)."""
        return self.event_span_seconds / self.wall_seconds if self.wall_seconds > 0 else float("inf")


def in_event_time_order(events: Iterable[Event]) -> list[Event]:
    """Stable sort by event time: events with equal times keep their log order."""
    return sorted(events, key=lambda e: e.event_time)


def paced(
    events: Iterable[Event],
    speed: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Event]:
    """Yield each event no earlier than its event-time offset from the first one, divided by speed."""
    if speed < 0:
        raise ValueError(f"speed must be >= 0 (0 = as fast as possible), got {speed}")
    start_event = start_wall = None
    for event in events:
        if speed > 0:
            if start_event is None:
                start_event, start_wall = event.event_time, clock()
            due = start_wall + (event.event_time - start_event) / 1000 / speed
            delay = due - clock()
            if delay > 0:
                sleep(delay)
        yield event


def replay_in_process(events: Iterable[Event], speed: float = 0.0, stats: ReplayStats | None = None) -> Iterator[Event]:
    """Events in event-time order, paced; ``stats`` (if given) is filled as they pass."""
    started = time.monotonic()
    for event in paced(in_event_time_order(events), speed):
        if stats is not None:
            stats.count(event)
            stats.wall_seconds = time.monotonic() - started
        yield event


def replay_to_kafka(
    events: Iterable[Event],
    producer: EventProducer,
    speed: float = 0.0,
    progress: bool = True,
    topic_prefix: str | None = None,
) -> ReplayStats:
    """Publish events in event-time order to their topics (or under another prefix), then flush."""
    ordered = in_event_time_order(events)
    stats = ReplayStats()
    kafka = producer.kafka
    prefix = kafka.topic_prefix if topic_prefix is None else topic_prefix
    suffix_of = {t: s for s, (t, _) in TOPICS.items()}

    def publish(event: Event) -> None:
        producer.send(event, topic=prefix + suffix_of[event.type])  # type: ignore[attr-defined]

    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task("replay", total=len(ordered), rate="")
            for event in replay_in_process(ordered, speed, stats):
                publish(event)
                if stats.events % 1000 == 0 or stats.events == len(ordered):
                    bar.update(task, completed=stats.events, rate=f"{stats.events / max(stats.wall_seconds, 1e-9):,.0f} ev/s")
    else:
        for event in replay_in_process(ordered, speed, stats):
            publish(event)
    started = time.monotonic() - stats.wall_seconds
    producer.flush()
    stats.wall_seconds = time.monotonic() - started
    return stats


def read_kafka_range(
    kafka: KafkaSettings,
    topics: Iterable[str],
    start_ms: int,
    end_ms: int,
    skipped: Counter | None = None,
    timeout_s: float = 300.0,
) -> list[Event]:
    """Every event on ``topics`` whose Kafka timestamp lies in [start_ms, end_ms), in event-time order.

    StreamRec's producer stamps each record with its event time, so the broker's time index
    (``offsets_for_times``) finds a period's first and last offsets per partition without a scan.
    Messages that do not decode are counted in ``skipped`` (they went to the dead-letter topic
    when they were first consumed) rather than replayed.
    """
    if end_ms <= start_ms:
        raise ValueError(f"empty time range: start {start_ms} is not before end {end_ms}")
    names = [t if t.startswith(kafka.topic_prefix) else kafka.topic(t) for t in topics]
    expected = {kafka.topic(s): EVENT_TYPES[t] for s, (t, _) in TOPICS.items()}
    consumer = KafkaConsumer(**{**kafka.client_options(), "enable_auto_commit": False})
    try:
        partitions = []
        for name in names:
            ids = consumer.partitions_for_topic(name)
            if not ids:
                raise ValueError(f"topic {name} does not exist on {kafka.bootstrap_servers}")
            partitions += [TopicPartition(name, p) for p in sorted(ids)]
        consumer.assign(partitions)
        starts = consumer.offsets_for_times({tp: start_ms for tp in partitions})
        ends = consumer.offsets_for_times({tp: end_ms for tp in partitions})
        log_ends = consumer.end_offsets(partitions)
        bounds = {}
        for tp in partitions:
            if starts[tp] is None:
                continue  # nothing at or after start_ms in this partition
            end = ends[tp].offset if ends[tp] is not None else log_ends[tp]
            if end > starts[tp].offset:
                bounds[tp] = (starts[tp].offset, end)
        consumer.assign(list(bounds))
        for tp, (start, _) in bounds.items():
            consumer.seek(tp, start)
        per_partition: dict[TopicPartition, list[Event]] = {tp: [] for tp in bounds}
        remaining = set(bounds)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {sorted(map(str, remaining))} did not reach the range's end in {timeout_s}s")
            for tp, messages in consumer.poll(timeout_ms=1000).items():
                end = bounds[tp][1]
                for m in messages:
                    if m.offset >= end:
                        break
                    try:
                        if m.value is None:
                            raise DecodeError("empty message")
                        per_partition[tp].append(decode_event(m.value, expected.get(tp.topic)))
                    except DecodeError:
                        if skipped is not None:
                            skipped[tp.topic] += 1
                if consumer.position(tp) >= end:
                    remaining.discard(tp)
                    consumer.pause(tp)
        streams = (sorted(events, key=lambda e: e.event_time) for events in per_partition.values())
        return list(heapq.merge(*streams, key=lambda e: e.event_time))
    finally:
        consumer.close()
