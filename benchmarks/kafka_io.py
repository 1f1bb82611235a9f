"""Throughput of StreamRec's Kafka path against bare kafka-python, on one broker, in one run.

StreamRec: ``EventProducer.send(impression)`` (encode + key + topic) then an ``EventConsumer``
in a fresh group that polls, decodes and validates every event, and commits after each poll.
Bare: ``KafkaProducer.send`` of the same pre-encoded bytes with the same keys and timestamps,
then a ``KafkaConsumer`` in a fresh group that polls and commits. Both use the same
``KafkaSettings`` producer/consumer options and each run gets fresh topics. Rounds alternate
the order of the two paths and the best of the rounds counts (a shared 2-core box is noisy).

    python benchmarks/kafka_io.py                      # starts a LocalKafka, 200,000 events
    python benchmarks/kafka_io.py --events 20000 --bootstrap 127.0.0.1:9092 --json out.json

End-to-end is N / (produce time + consume time): produce until flushed (acknowledged), then
consume from consumer creation (group join included) until all N are committed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import random
import signal
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer  # noqa: E402

from streaming.config import KafkaSettings  # noqa: E402
from streaming.events import Impression, encode_event  # noqa: E402
from streaming.kafka_io import EventConsumer, EventProducer, ensure_topics, event_key  # noqa: E402
from streaming.local_broker import LocalKafka  # noqa: E402

TARGET = 0.8
STALL_S = 60.0
FLUSH_TIMEOUT_S = 120.0
RUN_PREFIX = f"bench-{uuid.uuid4().hex[:8]}-"  # every topic of this run; removed at the end
FEATURES = ["user_ctr_7d", "item_ctr_7d", "item_popularity", "user_item_sim", "recency_h",
            "price_z", "category_affinity", "model_score"]


def make_events(n: int, seed: int = 7) -> list[Impression]:
    """Slates of 10 impressions with the fields serving logs: ids, propensities, context, features."""
    rng = random.Random(seed)
    start = int(time.time() * 1000) - n * 5
    events = []
    for i in range(n):
        events.append(Impression(
            event_id=uuid.UUID(int=rng.getrandbits(128)).hex,
            event_time=start + i * 5,
            request_id=f"req-{i // 10:09d}",
            user_id=f"u{rng.randrange(100_000):06d}",
            item_id=f"i{rng.randrange(500_000):07d}",
            position=i % 10,
            slate_size=10,
            propensity=round(rng.uniform(0.01, 1.0), 6),
            model_version="mtl-2026.01.07-3",
            policy_version="rerank-ppo-41",
            context={"device": rng.choice(["ios", "android", "web"]),
                     "country": rng.choice(["DE", "US", "FR", "BR", "IN"]),
                     "hour": rng.randrange(24), "new_user": rng.random() < 0.1},
            features={name: round(rng.random(), 6) for name in FEATURES},
        ))
    return events


def fresh_settings(base: KafkaSettings, path: str) -> KafkaSettings:
    """The base settings with a unique topic prefix, whose impressions topic is created now."""
    prefix = f"{RUN_PREFIX}{path}-{uuid.uuid4().hex[:8]}."
    kafka = base.model_copy(update={"topic_prefix": prefix, "retention_ms": 3_600_000})
    ensure_topics(kafka, ["impressions"])
    return kafka


def consume_loop(poll_and_commit, n: int, topic: str) -> None:
    """Call ``poll_and_commit() -> count`` until n are consumed; fail if nothing arrives for STALL_S."""
    got, last_progress = 0, time.monotonic()
    while got < n:
        count = poll_and_commit()
        if count:
            got, last_progress = got + count, time.monotonic()
        elif time.monotonic() - last_progress > STALL_S:
            raise SystemExit(f"FAIL: consuming {topic} stalled at {got}/{n} events (nothing for {STALL_S:.0f} s)")


def run_streamrec(base: KafkaSettings, events: list[Impression]) -> tuple[float, float]:
    kafka = fresh_settings(base, "streamrec")
    with EventProducer(kafka) as producer:
        t0 = time.perf_counter()
        for event in events:
            producer.send(event)
        producer.flush(FLUSH_TIMEOUT_S)
        produce_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    with EventConsumer(kafka, ["impressions"], group_id=f"bench-{uuid.uuid4().hex[:8]}") as consumer:
        def poll_and_commit() -> int:
            batch = consumer.poll()
            consumer.commit()
            return len(batch)

        consume_loop(poll_and_commit, len(events), kafka.topic("impressions"))
        consume_s = time.perf_counter() - t0
        if consumer.stats.dead_letters:
            raise SystemExit(f"FAIL: {consumer.stats.dead_letters} benchmark events were dead-lettered")
    return produce_s, consume_s


def run_bare(base: KafkaSettings, payloads: list[tuple[bytes, bytes, int]]) -> tuple[float, float]:
    kafka = fresh_settings(base, "bare")
    topic = kafka.topic("impressions")
    producer = KafkaProducer(**kafka.producer_options())
    try:
        t0 = time.perf_counter()
        for key, value, timestamp_ms in payloads:
            producer.send(topic, value=value, key=key, timestamp_ms=timestamp_ms)
        producer.flush(timeout=FLUSH_TIMEOUT_S)
        produce_s = time.perf_counter() - t0
    finally:
        producer.close()

    t0 = time.perf_counter()
    consumer = KafkaConsumer(**kafka.consumer_options(f"bench-{uuid.uuid4().hex[:8]}"))
    try:
        consumer.subscribe([topic])

        def poll_and_commit() -> int:
            raw = consumer.poll(timeout_ms=kafka.poll_timeout_ms)
            consumer.commit()
            return sum(len(messages) for messages in raw.values())

        consume_loop(poll_and_commit, len(payloads), topic)
        consume_s = time.perf_counter() - t0
    finally:
        consumer.close(autocommit=False)
    return produce_s, consume_s


def rates(n: int, produce_s: float, consume_s: float) -> dict[str, float]:
    return {"produce": n / produce_s, "consume": n / consume_s, "end_to_end": n / (produce_s + consume_s)}


def delete_bench_topics(base: KafkaSettings) -> None:
    admin = KafkaAdminClient(**base.client_options())
    try:
        topics = [t for t in admin.list_topics() if t.startswith(RUN_PREFIX)]
        if topics:
            admin.delete_topics(topics)
    finally:
        admin.close()


def benchmark(bootstrap: str, n: int, rounds: int) -> dict:
    base = KafkaSettings(bootstrap_servers=bootstrap)
    print(f"building {n:,} Impression events ...", flush=True)
    events = make_events(n)
    payloads = [(event_key(e), encode_event(e), e.event_time) for e in events]
    gc.collect()
    gc.freeze()  # keep the fixture's objects out of every GC pass: allocation-heavy paths would pay for them
    crc = "C extension" if importlib.util.find_spec("crc32c") else "pure Python (no `crc32c` package)"
    print(f"mean encoded size {sum(len(v) for _, v, _ in payloads) / n:.0f} B; broker {bootstrap}; crc32c {crc}\n"
          f"producer acks={base.acks} compression={base.compression_type} linger={base.linger_ms}ms "
          f"batch={base.batch_size}; consumer max_poll_records={base.max_poll_records}", flush=True)
    runs: dict[str, list[dict[str, float]]] = {"streamrec": [], "bare": []}
    try:
        for r in range(rounds):
            order = ["streamrec", "bare"] if r % 2 == 0 else ["bare", "streamrec"]
            for path in order:
                produce_s, consume_s = run_streamrec(base, events) if path == "streamrec" else run_bare(base, payloads)
                runs[path].append({"produce_s": produce_s, "consume_s": consume_s, **rates(n, produce_s, consume_s)})
                print(f"  round {r + 1} {path:9s} produce {produce_s:6.2f} s  consume {consume_s:6.2f} s", flush=True)
    finally:
        delete_bench_topics(base)
    metrics = ("produce", "consume", "end_to_end")
    best = {path: {m: max(run[m] for run in rs) for m in metrics} for path, rs in runs.items()}
    ratio = {m: best["streamrec"][m] / best["bare"][m] for m in metrics}
    return {"events": n, "rounds": rounds, "bootstrap": bootstrap, "crc32c": crc, "runs": runs, "best": best,
            "ratio": ratio, "target": TARGET, "passed": all(v >= TARGET for v in ratio.values())}


def report(result: dict) -> None:
    best, ratio = result["best"], result["ratio"]
    print(f"\n{result['events']:,} events, best of {result['rounds']} rounds (events/s)")
    print(f"{'':12s}{'StreamRec':>12s}{'bare':>12s}{'ratio':>8s}")
    for metric in ("produce", "consume", "end_to_end"):
        print(f"{metric:12s}{best['streamrec'][metric]:12,.0f}{best['bare'][metric]:12,.0f}{ratio[metric]:7.2f}x")
    verdict = "PASS" if result["passed"] else f"FAIL (lowest {min(ratio.values()):.3f}x)"
    print(f"target: StreamRec >= {TARGET}x bare kafka-python: {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per run (default 200,000)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each path, order alternating (default 2)")
    parser.add_argument("--bootstrap", metavar="HOST:PORT", help="use this broker instead of starting a LocalKafka")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.events < 1 or args.rounds < 1:
        parser.error("--events and --rounds must be at least 1")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed run still removes its broker
    if args.bootstrap:
        result = benchmark(args.bootstrap, args.events, args.rounds)
    else:
        print("starting a local Kafka broker ...", flush=True)
        with LocalKafka() as broker:
            result = benchmark(broker.bootstrap, args.events, args.rounds)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
