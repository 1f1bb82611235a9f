"""The learner's memory while it works off a backlog: RSS at 10%, 50% and 100% of 1,000,000 examples.

A backlog of ``--examples`` labelled examples (realistic ones from the synthetic world's logged
traffic, replicated with fresh event ids, ``--users`` distinct users, later event times and
serving-time features) is produced onto the ``examples`` topic with bare kafka-python, in a child
process, before the learner starts; the catalog goes onto ``items``. Then ``run_learner`` (what
``streamrec learn`` runs: consumer group, trainer with the network and both baselines,
checkpoints, publishing) consumes it in this process while a thread samples the process's RSS
every 100 ms. Printed: peak RSS up to 10%, 50% and 100% of the backlog and the ratio of each to
the RSS right after the first 10% (the baseline: model, optimizers and buffers are warm by then).
Target: the peak at 100% within 1.2x of it.

The learner holds at most ``kafka.max_poll_records`` polled records plus ``learner.batch_size``
pending examples at once; what it keeps across batches is bounded by settings: the de-duplication
window (``learner.dedup_ids`` event ids), the click history (``recent_items`` per user), the
metric windows, and the id-hash cache.

    python benchmarks/learner_backlog.py                        # 1,000,000 examples, own broker
    python benchmarks/learner_backlog.py --examples 200000 --kafka 127.0.0.1:9092 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARKS = (0.10, 0.50, 1.00)
TARGET_RATIO = 1.2


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def backlog(n: int, users: int, seed: int = 0):
    """``n`` encoded examples: the world's real ones, copied with new ids, users, times and features."""
    import random

    from learner.model import FEATURE_NAMES
    from policies.synthetic_world import SyntheticWorld, WorldConfig
    from streaming.events import encode_event
    from streaming.stream_processor import StreamProcessor

    world = SyntheticWorld(WorldConfig(seed=seed, n_users=500, n_items=1000))
    log = world.generate_log(2_000, log_seed=seed)
    base = [json.loads(encode_event(e)) for out in StreamProcessor().run(log) for e in out.examples]
    span = max(e["event_time"] for e in base) - min(e["impression"]["event_time"] for e in base) + 1
    rng = random.Random(seed)
    produced = 0
    copy = 0
    while produced < n:
        shift = copy * span
        for template in base:
            if produced >= n:
                break
            example = dict(template)
            impression = dict(template["impression"])
            example["event_id"] = impression["event_id"] = uuid.UUID(int=rng.getrandbits(128)).hex
            impression["user_id"] = f"u{rng.randrange(users):07d}"
            impression["request_id"] = f"{impression['request_id']}-{copy}"
            impression["event_time"] += shift
            impression["features"] = {name: round(rng.random(), 4) for name in FEATURE_NAMES}
            example["impression"] = impression
            example["event_time"] += shift
            for label in ("click_time", "purchase_time"):
                if example[label] is not None:
                    example[label] += shift
            produced += 1
            yield impression["user_id"].encode(), json.dumps(example, separators=(",", ":")).encode(), example["event_time"]
        copy += 1


def produce(bootstrap: str, prefix: str, n: int, users: int) -> None:
    """The child process: the catalog onto ``items``, ``n`` examples onto ``examples``, acknowledged."""
    from kafka import KafkaProducer

    from policies.synthetic_world import SyntheticWorld, WorldConfig
    from streaming.events import encode_event

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20,
                             compression_type="lz4")
    for item in SyntheticWorld(WorldConfig(seed=0, n_users=500, n_items=1000)).item_events():
        producer.send(prefix + "items", key=item.item_id.encode(), value=encode_event(item), timestamp_ms=item.event_time)
    producer.flush()
    for key, value, timestamp in backlog(n, users):
        producer.send(prefix + "examples", key=key, value=value, timestamp_ms=timestamp)
    producer.flush()
    producer.close()


class RssSampler(threading.Thread):
    def __init__(self, every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak, self._stop = every_s, rss_mb(), threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> None:
        self._stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000, help="distinct users in the backlog")
    parser.add_argument("--kafka", help="bootstrap servers (default: start a private local broker)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-poll-records", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--produce", nargs=4, metavar=("BOOTSTRAP", "PREFIX", "N", "USERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.produce:
        bootstrap, prefix, n, users = args.produce
        produce(bootstrap, prefix, int(n), int(users))
        return

    import torch

    from learner.config import LearnerSettings, tiny_model_config
    from learner.service import run_learner
    from streaming.config import KafkaSettings
    from streaming.kafka_io import ensure_topics

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-backlog-bench-"))
    broker = None
    if args.kafka:
        bootstrap = args.kafka
    else:
        from streaming.local_broker import LocalKafka

        broker = LocalKafka(workdir=workdir / "kafka").start()
        bootstrap = broker.bootstrap
    try:
        kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"backlog{uuid.uuid4().hex[:8]}.", partitions=3,
                              retention_ms=-1, max_poll_records=args.max_poll_records)
        ensure_topics(kafka, ["examples", "items", "model-updates", "dlq"])
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--produce", bootstrap, kafka.topic_prefix, str(args.examples),
                        str(args.users)], check=True, cwd=ROOT)
        produce_s = time.perf_counter() - started
        print(f"backlog: {args.examples:,} examples ({args.users:,} users) and the catalog produced in {produce_s:.1f}s "
              f"({args.examples / produce_s:,.0f}/s); {os.cpu_count()} CPUs", flush=True)

        settings = LearnerSettings(model=tiny_model_config(), device="cpu", batch_size=args.batch_size,
                                   group_id=f"backlog-{uuid.uuid4().hex[:8]}", instance_id=None,
                                   checkpoint_dir=workdir / "checkpoints", registry=str(workdir / "registry"))
        sampler = RssSampler()
        marks = [int(m * args.examples) for m in MARKS]
        readings: list[dict] = []
        learn_started = time.perf_counter()

        def until(trainer) -> bool:
            while len(readings) < len(marks) and trainer.examples_learned >= marks[len(readings)]:
                readings.append({"examples": trainer.examples_learned, "seconds": time.perf_counter() - learn_started,
                                 "rss_mb": rss_mb(), "peak_mb": max(sampler.peak, rss_mb()),
                                 "dedup_ids": len(trainer.recent_ids),
                                 "history_users": len(trainer.learner.history.users),
                                 "id_hashes": len(trainer.learner.model._id_hashes)})
                r = readings[-1]
                print(f"  {MARKS[len(readings) - 1]:>4.0%}: {r['examples']:>9,} examples in {r['seconds']:6.1f}s, "
                      f"RSS {r['rss_mb']:7.1f} MB, peak so far {r['peak_mb']:7.1f} MB "
                      f"(dedup window {r['dedup_ids']:,} ids, click history {r['history_users']:,} users, "
                      f"id-hash cache {r['id_hashes']:,})", flush=True)
            return len(readings) == len(marks)

        sampler.start()
        print(f"learner (tiny model, batch {args.batch_size}, max_poll_records {args.max_poll_records}, "
              f"dedup window {settings.dedup_ids:,}):", flush=True)
        report = run_learner(kafka, settings, workdir, until=until)
        sampler.stop()
    finally:
        if broker is not None:
            broker.remove()

    learn_s = readings[-1]["seconds"]
    baseline = readings[0]["rss_mb"]
    print(f"\nlearned {report['examples']:,} examples in {learn_s:.0f}s ({report['examples'] / learn_s:,.0f}/s)")
    for mark, r in zip(MARKS, readings):
        print(f"  peak RSS up to {mark:>4.0%}: {r['peak_mb']:7.1f} MB  x{r['peak_mb'] / baseline:.2f} of the RSS after 10% "
              f"({baseline:.1f} MB)")
    ratio = readings[-1]["peak_mb"] / baseline
    print(f"peak at 100% / RSS after 10%: x{ratio:.2f} (target <= x{TARGET_RATIO}): {'ok' if ratio <= TARGET_RATIO else 'OVER'}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "readings": readings,
                                         "ratio": ratio, "examples_per_s": report["examples"] / learn_s}, indent=2))


if __name__ == "__main__":
    main()
