"""Events per second through the Faust stream worker against a bare aiokafka consumer, in one run.

A synthetic shop's log (impressions, clicks, purchases and the catalog) is replayed once into
fresh topics on one broker; then both readers take all of it from the beginning:

* bare: an ``AIOKafkaConsumer`` assigned every partition of impressions, clicks and purchases,
  seeking to the beginning and reading until it has every record (no decoding): the ceiling.
* worker: ``streamrec stream worker`` as its own process (a fresh app id, memory tables with
  changelogs, features pushed to a fresh Feast store unless ``--no-features``), timed from its
  "Worker ready" (group joined, tables recovered) until the ``examples`` topic holds one example
  per impression. The log ends with one impression, click and purchase per partition a day past
  everything else, so the last windows close as soon as the worker has read that far.

Events/s is joiner input (impressions + clicks + purchases) over that time. For scale it also
prints the joiner and aggregates alone (``StreamProcessor``, in-process, no Kafka) over the same
log: what the worker would reach if Faust and Kafka cost nothing. The bare reader runs
``--rounds`` times and the best counts; the worker runs once per round too (each on fresh app
state), best counts. The target is the worker at >= 0.5x the bare reader; both absolutes print.

    python benchmarks/joiner.py                        # starts its own LocalKafka
    python benchmarks/joiner.py --requests 2000 --bootstrap 127.0.0.1:9092 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from kafka import KafkaConsumer  # noqa: E402

from policies.synthetic_world import SyntheticWorld, WorldConfig  # noqa: E402
from streaming.config import INTERNAL_TOPICS, TOPICS, KafkaSettings  # noqa: E402
from streaming.events import Click, Impression, Purchase  # noqa: E402
from streaming.kafka_io import EventProducer, ensure_topics  # noqa: E402
from streaming.local_broker import LocalKafka  # noqa: E402
from streaming.replay import replay_to_kafka  # noqa: E402
from streaming.stream_processor import StreamProcessor  # noqa: E402
from streamrec.chaos import clock_events  # noqa: E402

TARGET = 0.5
HOUR = 3_600_000
DAY = 24 * HOUR
PARTITIONS = 3
JOIN_INPUTS = ("impressions", "clicks", "purchases")


def shop_log(requests: int, seed: int = 11) -> list:
    """The catalog, ``requests`` served slates with their clicks and purchases, then the closing clock.

    Times start a few days back: Kafka timestamps are event times, and a broker deletes records
    older than the topics' retention (and refuses ones more than an hour ahead of its clock).
    """
    start = (int(time.time() * 1000) // DAY - 3) * DAY
    world = SyntheticWorld(WorldConfig(seed=seed, n_users=2000, n_items=500, mean_request_gap_ms=200.0,
                                       start_time_ms=start))
    log = world.item_events() + world.generate_log(requests)
    return log + clock_events(PARTITIONS, max(e.event_time for e in log) + 26 * HOUR)


def end_offsets(kafka: KafkaSettings, suffixes) -> int:
    consumer = KafkaConsumer(**kafka.client_options())
    try:
        tps = [TopicPartition(kafka.topic(s), p) for s in suffixes for p in range(kafka.partitions)]
        return sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()


async def bare_read(kafka: KafkaSettings, expected: int) -> float:
    """Seconds for a bare aiokafka consumer to read every record of the joiner's inputs."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(kafka.topic(s), p) for s in JOIN_INPUTS for p in range(kafka.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        t0 = time.perf_counter()
        got = 0
        while got < expected:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch and time.perf_counter() - t0 > 60:
                raise SystemExit(f"FAIL: the bare consumer stalled at {got}/{expected} records")
            got += sum(len(records) for records in batch.values())
        return time.perf_counter() - t0
    finally:
        await consumer.stop()


def worker_run(kafka: KafkaSettings, impressions: int, features: bool, workdir: Path, timeout_s: float) -> dict:
    """Start a worker on fresh app state; seconds from "Worker ready" until every example is out.

    Each round runs under a new app id, so the worker reads the inputs from the start and writes
    new changelogs; ``examples`` accumulates across rounds, so the count to reach grows.
    """
    app_id = f"bench-{uuid.uuid4().hex[:8]}"
    log_path = workdir / f"{app_id}.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "STREAMREC_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "STREAMREC_KAFKA__PARTITIONS": str(kafka.partitions),
        "STREAMREC_STREAM__APP_ID": app_id,
        "STREAMREC_DATA_DIR": str(workdir / app_id / "data"),
        "STREAMREC_FEATURE_STORE__DATA_DIR": str(workdir / app_id / "features"),
    }
    command = [sys.executable, "-m", "streamrec", "stream", "worker", "--loglevel", "info"]
    if not features:
        command.append("--no-features")
    before = end_offsets(kafka, ["examples"])
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = started + timeout_s
        ready = None
        while ready is None:
            if b"Worker ready" in log_path.read_bytes():
                ready = time.perf_counter()
            elif process.poll() is not None or time.perf_counter() > deadline:
                raise SystemExit(f"FAIL: the worker did not get ready:\n{log_path.read_text(errors='replace')[-3000:]}")
            else:
                time.sleep(0.02)
        while (done := end_offsets(kafka, ["examples"]) - before) < impressions:
            if process.poll() is not None or time.perf_counter() > deadline:
                raise SystemExit(f"FAIL: {done}/{impressions} examples after {timeout_s:.0f} s:\n"
                                 f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        finished = time.perf_counter()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    done = end_offsets(kafka, ["examples"]) - before
    if done != impressions:
        raise SystemExit(f"FAIL: {done} examples for {impressions} impressions (a run without restarts sends each once)")
    return {"startup_s": ready - started, "seconds": finished - ready}


def benchmark(bootstrap: str, requests: int, rounds: int, features: bool) -> dict:
    print(f"building the log of {requests:,} requests ...", flush=True)
    log = shop_log(requests)
    # the closing clock's own impressions stay open: nothing comes after them
    impressions = sum(isinstance(e, Impression) and not e.user_id.startswith("clock-") for e in log)
    join_events = sum(isinstance(e, (Impression, Click, Purchase)) for e in log)
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}.",
                          partitions=PARTITIONS, retention_ms=DAY * 30)
    ensure_topics(kafka, [*TOPICS, *INTERNAL_TOPICS])
    with EventProducer(kafka) as producer:
        replay_to_kafka(log, producer, progress=False)
    stored = end_offsets(kafka, JOIN_INPUTS)
    if stored != join_events:
        raise SystemExit(f"FAIL: {stored} records on the joiner's inputs for {join_events} events replayed")
    print(f"{join_events:,} joiner events ({impressions:,} impressions) and {len(log) - join_events} catalog "
          f"items on {bootstrap}, {PARTITIONS} partitions; feature push to Feast {'on' if features else 'off'}",
          flush=True)
    t0 = time.perf_counter()
    for _ in StreamProcessor().run(log, finish=False):
        pass
    core = join_events / (time.perf_counter() - t0)
    print(f"  the same core in-process (no Kafka, no Faust): {core:,.0f} events/s", flush=True)
    bare, worker = [], []
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-") as tmp:
        for r in range(rounds):
            seconds = asyncio.run(bare_read(kafka, join_events))
            bare.append(seconds)
            print(f"  round {r + 1} bare aiokafka   {seconds:7.2f} s  {join_events / seconds:10,.0f} events/s", flush=True)
            run = worker_run(kafka, impressions, features, Path(tmp), timeout_s=max(300.0, join_events / 50))
            worker.append(run)
            print(f"  round {r + 1} Faust worker    {run['seconds']:7.2f} s  {join_events / run['seconds']:10,.0f} events/s"
                  f"  (startup {run['startup_s']:.1f} s, not counted)", flush=True)
    best_bare = join_events / min(bare)
    best_worker = join_events / min(run["seconds"] for run in worker)
    ratio = best_worker / best_bare
    return {"events": join_events, "impressions": impressions, "rounds": rounds, "features": features,
            "bootstrap": bootstrap, "bare_s": bare, "worker": worker, "bare_events_per_s": best_bare,
            "worker_events_per_s": best_worker, "core_events_per_s": core, "ratio": ratio, "target": TARGET, "passed": ratio >= TARGET}


def report(result: dict) -> None:
    print(f"\n{result['events']:,} joiner events, best of {result['rounds']} round(s)")
    print(f"  bare aiokafka consumer  {result['bare_events_per_s']:10,.0f} events/s")
    print(f"  Faust stream worker     {result['worker_events_per_s']:10,.0f} events/s")
    print(f"  (joiner + aggregates in-process, no Kafka: {result['core_events_per_s']:,.0f} events/s)")
    verdict = "PASS" if result["passed"] else "FAIL"
    print(f"  ratio {result['ratio']:.3f}x (target >= {TARGET}x): {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=6000, help="served slates in the log (default 6,000: ~33k events)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each reader (default 1)")
    parser.add_argument("--no-features", dest="features", action="store_false", help="run the worker without Feast")
    parser.add_argument("--bootstrap", metavar="HOST:PORT", help="use this broker instead of starting a LocalKafka")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be at least 1")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed run still removes its broker
    if args.bootstrap:
        result = benchmark(args.bootstrap, args.requests, args.rounds, args.features)
    else:
        print("starting a local Kafka broker ...", flush=True)
        with LocalKafka() as broker:
            result = benchmark(broker.bootstrap, args.requests, args.rounds, args.features)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
