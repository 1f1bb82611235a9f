"""Model freshness on the live stack: from an event's production to the first response served by a
model version that has learned from it.

The stack is the one production runs, as separate processes on one broker (``streamrec.live_stack``):
``streamrec stream worker`` with the joiner in ``streaming`` label mode, ``streamrec learn`` and
``streamrec serve``. A synthetic shop's history (three days back) is replayed and learned first;
then the shop's users send a steady stream of live traffic (``--rate`` slates a second, each five
impressions and the clicks and purchases the world's ground truth draws, event time = now) for
``--duration`` seconds, while a client asks ``/recommend`` every ``--probe-ms`` milliseconds.

Definitions, per measured event (every live impression and click):

* **produced**: the wall time just before the event was handed to the Kafka producer (flushed
  at once).
* **its example**: the ``examples`` record the worker emits for it: ``<impression id>:impression``
  for an impression, ``<impression id>:click`` for a click (streaming labels emit both at once);
  read from the topic with its partition and offset.
* **learned from it**: a model version has learned the event when the learner's consumed offset
  of that ``examples`` partition, recorded in the version's ``lineage.json`` at publish
  (``learner.model.LINEAGE_FILE``: the next offset of every source the trainer had learned when
  it published), is past the example's offset. Versions only move forward, so every later
  version has learned it too.
* **freshness**: the time from *produced* to the first ``/recommend`` response whose
  ``model_version`` has learned from it (the client's receive time; resolution: the probe
  interval).

The stages of each event's freshness are also printed: produced -> example on the topic (its
record timestamp: the worker's join), -> the version that learned it was published (its manifest's
``created_at_ms``: the learner's batching and publish interval), -> first served (serving's
``model-updates`` listener, load and swap, plus the probe interval). Events produced in the last
``--tail`` seconds are not measured (no version may follow them before the run ends).

Target (issue 7): p50 <= 5 s and p99 <= 15 s with default settings. The learner publishes at most
every ``learner.publish_every_s`` (default 300 s) and only after ``learner.publish_min_examples``
(default 5,000) new examples, so with the defaults freshness is bounded below by those two; pass
``--set learner.publish_every_s=2 --set learner.publish_min_examples=1`` (or any other setting,
as a dotted path) to measure the rest of the pipeline.

    python benchmarks/freshness.py                                    # starts a LocalKafka, defaults
    python benchmarks/freshness.py --set learner.publish_every_s=2 --set learner.publish_min_examples=1
    python benchmarks/freshness.py --bootstrap 127.0.0.1:9092 --duration 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learner.config import LearnerSettings, tiny_model_config  # noqa: E402
from policies.synthetic_world import SyntheticWorld, WorldConfig  # noqa: E402
from serving.hot_swap import version_number  # noqa: E402
from streaming.config import KafkaSettings  # noqa: E402
from streaming.events import Click, Impression, Purchase  # noqa: E402
from streaming.kafka_io import EventProducer  # noqa: E402
from streaming.local_broker import LocalKafka  # noqa: E402
from streaming.replay import replay_to_kafka  # noqa: E402
from streamrec.chaos import recent_start_ms  # noqa: E402
from streamrec.live_stack import Announcements, LiveStack, LiveStackError  # noqa: E402

TARGET_P50_S, TARGET_P99_S = 5.0, 15.0


@dataclass
class Measured:
    kind: str  # impression | click
    example_id: str
    produced: float  # wall time
    partition: int | None = None
    offset: int | None = None
    on_topic: float | None = None  # the example record's timestamp (s)
    version: str | None = None  # the first version that learned it
    published: float | None = None
    served: float | None = None


class ExampleIndex(threading.Thread):
    """Reads ``examples`` from the beginning: example id -> (partition, offset, record timestamp in s)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        super().__init__(name="read-examples", daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        self.topic = kafka.topic("examples")
        self.consumer = KafkaConsumer(**kafka.client_options(), group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest")
        partitions = [TopicPartition(self.topic, p) for p in sorted(self.consumer.partitions_for_topic(self.topic))]
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning(*partitions)
        self.found: dict[str, tuple[int, int, float]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for messages in self.consumer.poll(timeout_ms=100).values():
                for m in messages:
                    try:
                        event_id = json.loads(m.value)["event_id"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    self.found.setdefault(event_id, (m.partition, m.offset, m.timestamp / 1000))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.consumer.close()


class Probe(threading.Thread):
    """A client asking ``/recommend`` every ``interval_s``: (receive time, model version) of each answer.

    It asks for the world's users in turn: serving logs each answer's impressions into the loop, and
    one user asking ten times a second would be no shop's user (its join state alone grows past
    Kafka's 1 MB record limit within the click window).
    """

    def __init__(self, base_url: str, users: list[str], interval_s: float) -> None:
        super().__init__(name="probe", daemon=True)
        self.base_url, self.users, self.interval_s = base_url, users, interval_s
        self.answers: list[tuple[float, int]] = []
        self.failures = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self._halt.is_set():
                try:
                    user = self.users[len(self.answers) % len(self.users)]
                    response = client.post("/recommend", json={"user_id": user, "k": 1})
                    if response.status_code == 200:
                        self.answers.append((time.time(), version_number(response.json()["model_version"])))
                    else:
                        self.failures += 1
                except httpx.HTTPError:
                    self.failures += 1
                self._halt.wait(self.interval_s)

    def first_served(self, version: int, after: float) -> float | None:
        for at, served in self.answers:
            if at >= after and served >= version:
                return at
        return None

    def stop(self) -> None:
        self._halt.set()
        self.join(15)


def live_slates(world: SyntheticWorld, rng: np.random.Generator, now_ms: int, request: int):
    """One slate of the live stream: five impressions, and the clicks and purchases the world draws."""
    cfg = world.config
    user = world.user_ids[rng.choice(cfg.n_users, p=world.user_activity)]
    slate = rng.choice(cfg.n_items, size=cfg.slate_size, replace=False)
    clicks, purchases = world.respond(user, slate, rng)
    request_id = f"live-{request}"
    events = []
    for position, item in enumerate(int(i) for i in slate):
        shared = dict(user_id=user, item_id=world.item_ids[item], request_id=request_id)
        impression = Impression(event_time=now_ms, position=position, slate_size=cfg.slate_size,
                                propensity=1 / cfg.n_items, model_version=None, policy_version="random", **shared)
        events.append(impression)
        if clicks[position]:
            events.append(Click(event_time=now_ms + 1, **shared))
            if purchases[position]:
                events.append(Purchase(event_time=now_ms + 2, quantity=1, revenue=float(world.item_price[item]),
                                       **shared))
    return events


def measured_id(event, impression_ids: dict[tuple[str, str], str]) -> tuple[str, str] | None:
    if isinstance(event, Impression):
        impression_ids[(event.request_id, event.item_id)] = event.event_id
        return "impression", f"{event.event_id}:impression"
    if isinstance(event, Click):
        return "click", f"{impression_ids[(event.request_id, event.item_id)]}:click"
    return None


def dotted(assignments: list[str]) -> dict[str, Any]:
    """``["learner.publish_every_s=2"]`` -> ``{"learner": {"publish_every_s": 2}}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for assignment in assignments:
        path, _, value = assignment.partition("=")
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def benchmark(bootstrap: str, args) -> dict[str, Any]:
    from streamrec.live_stack import merge

    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"fresh-{uuid.uuid4().hex[:8]}.", partitions=3,
                          retention_ms=-1, bootstrap_timeout_ms=15_000)
    overrides = {"joiner": {"label_mode": "streaming"}, "learner": {"device": "cpu"}}
    if args.model == "tiny":
        overrides["learner"]["model"] = tiny_model_config().model_dump(mode="json")
    overrides = merge(overrides, dotted(args.set))
    learner = LearnerSettings.model_validate(overrides.get("learner", {}))
    # history spans more than the learner's label delay (30 min), so its prequential AUC (the publish gate) is defined
    world = SyntheticWorld(WorldConfig(seed=args.seed, n_users=200, n_items=100, mean_request_gap_ms=10_000.0,
                                       start_time_ms=recent_start_ms()))
    history = world.item_events() + world.generate_log(args.history)
    history_impressions = sum(isinstance(e, Impression) for e in history)
    say = lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)  # noqa: E731

    with tempfile.TemporaryDirectory(prefix="streamrec-freshness-") as tmp:
        stack = LiveStack(kafka, args.workdir or Path(tmp), overrides)
        stack.prepare(world, tiny_model_config() if args.model == "tiny" else None)
        announcements = Announcements(kafka)
        examples = ExampleIndex(kafka)
        announcements.start()
        examples.start()
        probe = None
        try:
            say(f"starting the worker, the learner and serving (settings: {stack.config_path})")
            stack.start(ready_timeout_s=300)
            with EventProducer(kafka) as producer:
                say(f"replaying {len(history):,} events of history")
                replay_to_kafka(history, producer, progress=False)
                if learner.publish_every_s <= 60:
                    stack.wait(lambda: any(stack.lineage(a.update.version)["examples"] >= history_impressions
                                           for a in announcements.models()),
                               "a version that learned the history", 300, interval_s=0.5)
                else:
                    stack.wait(lambda: sum(k.endswith(":impression") for k in examples.found) >= history_impressions,
                               "the history's examples on the topic", 300, interval_s=0.5)
                probe = Probe(stack.base_url, world.user_ids, args.probe_ms / 1000)
                probe.start()
                say(f"live stream: {args.rate} slates/s for {args.duration}s")
                rng = np.random.default_rng([args.seed, 99])
                measured: list[Measured] = []
                impression_ids: dict[tuple[str, str], str] = {}
                started = time.time()
                n = 0
                while True:
                    due = started + n / args.rate
                    now = time.time()
                    if now >= started + args.duration:
                        break
                    if due > now:
                        time.sleep(due - now)  # pacing the producer, not waiting for a condition
                    events = live_slates(world, rng, int(time.time() * 1000), n)
                    produced = time.time()
                    for event in events:
                        producer.send(event)
                    producer.flush(30)
                    if produced < started + args.duration - args.tail:
                        for event in events:
                            found = measured_id(event, impression_ids)
                            if found:
                                measured.append(Measured(found[0], found[1], produced))
                    else:
                        for event in events:
                            measured_id(event, impression_ids)
                    n += 1
                stream_end = time.time()
            say(f"produced {n} slates; waiting for every measured event to be served")

            lineage: dict[str, dict] = {}

            def resolve() -> bool:
                for a in announcements.models():
                    if a.update.version not in lineage:
                        lineage[a.update.version] = {**stack.lineage(a.update.version),
                                                     "created": stack.registry().load("model", a.update.version)
                                                     .manifest["created_at_ms"] / 1000}
                ordered = sorted(lineage.items(), key=lambda kv: version_number(kv[0]))
                for m in measured:
                    if m.served is not None:
                        continue
                    if m.offset is None and m.example_id in examples.found:
                        m.partition, m.offset, m.on_topic = examples.found[m.example_id]
                    if m.offset is None:
                        continue
                    if m.version is None:
                        source = f"{kafka.topic('examples')}:{m.partition}"
                        for version, body in ordered:
                            if body["offsets"].get(source, 0) > m.offset:
                                m.version, m.published = version, body["created"]
                                break
                    if m.version is not None:
                        m.served = probe.first_served(version_number(m.version), m.produced)
                return all(m.served is not None for m in measured)

            drain = max(30.0, 2 * learner.publish_every_s + 30) if learner.publish_every_s <= 60 else 30.0
            try:
                stack.wait(resolve, "every measured event to be served by a version that learned it", drain, 0.5)
            except LiveStackError:
                resolve()
            errors = stack.errors()
        finally:
            if probe is not None:
                probe.stop()
            stack.stop()
            announcements.stop()
            examples.stop()

    served = [m for m in measured if m.served is not None]
    fresh = [m.served - m.produced for m in served]
    unserved = len(measured) - len(served)
    # an event never served is fresher than nothing: count it as infinitely stale in the percentiles
    with_unserved = fresh + [math.inf] * unserved
    p50, p99 = (float(np.percentile(with_unserved, q, method="inverted_cdf")) if with_unserved else math.nan
                for q in (50, 99))
    stages = {
        "join (produced -> example on topic)": [m.on_topic - m.produced for m in served],
        "learn + publish (example -> version published)": [m.published - m.on_topic for m in served],
        "serve (published -> first response)": [m.served - m.published for m in served],
    }
    by_kind = {kind: [m.served - m.produced for m in served if m.kind == kind] for kind in ("impression", "click")}
    during = [a for a in announcements.models(since=started) if a.received_at <= stream_end]
    result = {
        "settings": {"model": args.model, "rate_slates_per_s": args.rate, "duration_s": args.duration,
                     "publish_every_s": learner.publish_every_s, "publish_min_examples": learner.publish_min_examples,
                     "overrides": args.set},
        "events_measured": len(measured), "events_served": len(served), "events_unserved": unserved,
        "p50_s": p50, "p99_s": p99, "mean_s": float(np.mean(fresh)) if fresh else math.nan,
        "p50_by_kind_s": {k: percentile(v, 50) for k, v in by_kind.items()},
        "stage_p50_s": {k: percentile(v, 50) for k, v in stages.items()},
        "stage_p99_s": {k: percentile(v, 99) for k, v in stages.items()},
        "versions_published_during_stream": len(during),
        "probe_answers": len(probe.answers) if probe else 0, "probe_failures": probe.failures if probe else 0,
        "process_errors": errors,
    }
    print()
    print(f"model freshness on the live stack ({args.model} model, streaming labels, {args.rate} slates/s for "
          f"{args.duration}s, publish_every_s={learner.publish_every_s:g}, "
          f"publish_min_examples={learner.publish_min_examples})")
    print(f"  events measured        {len(measured):,} ({unserved:,} never served by a version that learned them)")
    print(f"  freshness p50          {p50:8.2f} s   ratio to target {TARGET_P50_S:g} s: {p50 / TARGET_P50_S:.2f}")
    print(f"  freshness p99          {p99:8.2f} s   ratio to target {TARGET_P99_S:g} s: {p99 / TARGET_P99_S:.2f}")
    by_kind_p50 = result["p50_by_kind_s"]
    print(f"  p50 impressions/clicks {by_kind_p50['impression']:.2f} s / {by_kind_p50['click']:.2f} s")
    for name in stages:
        print(f"  {name:48s} p50 {result['stage_p50_s'][name]:6.2f} s  p99 {result['stage_p99_s'][name]:6.2f} s")
    print(f"  model versions published during the stream: {len(during)}; probe answers {result['probe_answers']}, "
          f"failures {result['probe_failures']}")
    if errors:
        print(f"  ERRORS in process logs: {json.dumps(errors)[:2000]}")
    if not served:
        print(f"  no version learned any measured event within the run: the learner publishes at most every "
              f"{learner.publish_every_s:g} s and after {learner.publish_min_examples:,} new examples")
    verdict = p50 <= TARGET_P50_S and p99 <= TARGET_P99_S
    print("  MEETS the target" if verdict else "  MISSES the target")
    result["meets_target"] = verdict
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=4.0, help="live slates per second (5 impressions each)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of live traffic")
    parser.add_argument("--tail", type=float, default=10.0, help="the last seconds of traffic are not measured")
    parser.add_argument("--history", type=int, default=600, help="slates of history replayed first")
    parser.add_argument("--probe-ms", type=float, default=100.0, help="between /recommend calls of the client")
    parser.add_argument("--model", choices=("tiny", "default"), default="tiny",
                        help="tiny: the test model; default: learner.model's default (all-MiniLM-L6-v2)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting for every process, e.g. learner.publish_every_s=2 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", metavar="HOST:PORT", help="use this broker instead of starting a LocalKafka")
    parser.add_argument("--workdir", type=Path, help="keep settings, logs, registry and features here")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    broker = None
    if args.bootstrap is None:
        broker = LocalKafka(workdir=Path(tempfile.mkdtemp(prefix="streamrec-freshness-kafka-"))).start()
    try:
        result = benchmark(args.bootstrap or broker.bootstrap, args)
    finally:
        if broker is not None:
            broker.remove()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
