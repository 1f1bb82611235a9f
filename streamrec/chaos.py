"""Crash faults on the live stack: SIGKILL the stream worker and the learner mid-stream, prove nothing is lost.

:func:`run_chaos` runs StreamRec as the separate processes production runs, on loopback against
a given Kafka cluster and one YAML settings file: the Faust worker (``streamrec stream worker``),
the learner (``streamrec learn``) and serving (``streamrec serve``). It replays a synthetic
shop's log into Kafka (stamped a few days back, ending with one "clock" impression, click and
purchase per partition a day past everything, so every window closes), SIGKILLs the worker or the
learner at seeded random points of the stream and restarts it at once, again and again, while
serving's ``/readyz`` is probed every 50 ms and ``/recommend`` is called a few times a second.
Serving is never killed; it must keep answering.

At the end it waits (deadlines, no fixed sleeps) until the worker has committed all its input and
the learner has checkpointed every example on the topic, and compares three views of the run:

* the expectation: the same core in one process over the same log
  (:class:`~streaming.stream_processor.StreamProcessor`), i.e. an uninterrupted run;
* the ``examples`` topic: every example the worker sent, repeats included (at-least-once);
* the learner's ledger (:meth:`~learner.checkpoint.CheckpointStore.ledger_ids`): every event id
  the committed checkpoints learned, one entry per time it was learned.

``lost`` counts expected examples the learner never learned, ``duplicated`` the ones it learned
more than once, ``resent`` the repeats on the topic (allowed: consumers de-duplicate by
event_id); the Feast online store must hold the expectation's last feature rows.

It lives in the application shell because it drives every package's process; the pure parts
(the log, the kill plan, the outage arithmetic) are plain functions:

>>> [(k.target, k.after_examples) for k in kill_plan(4, 1000, seed=0)]
[('worker', 270), ('learner', 407), ('worker', 694), ('learner', 767)]
>>> longest_outage([(0.0, True), (0.05, True), (0.1, False), (0.4, False), (0.45, True)])
0.4
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from streaming.config import INTERNAL_TOPICS, TOPICS, KafkaSettings
from streaming.events import Click, Event, Example, Impression, Purchase
from streaming.stream_processor import StreamProcessor

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
Target = Literal["worker", "learner"]


class ChaosError(RuntimeError):
    """The stack did not reach a state the run waits for in time; the message carries the logs' tails."""


class ChaosConfig(BaseModel):
    """What to replay, what to kill and how long to wait."""

    events: int = Field(default=100_000, ge=100, description="events in the replayed log (catalog and clocks included)")
    kills: int = Field(default=10, ge=0)
    targets: tuple[Target, ...] = Field(default=("worker", "learner"), min_length=1,
                                        description="kills go to these in turn")
    seed: int = 0
    users: int = Field(default=500, ge=1)
    items: int = Field(default=300, ge=5)
    request_gap_ms: float = Field(default=2_000.0, gt=0, description="mean event-time gap between logged slates")
    kill_window: tuple[float, float] = Field(default=(0.05, 0.9),
                                             description="kills land between these shares of the expected examples")
    partitions: int | None = Field(default=None, ge=1, description="default: the Kafka settings' partitions")
    session_timeout_ms: int = Field(default=6_000, ge=1000, description="how soon a killed worker's partitions move on")
    probe_interval_s: float = Field(default=0.05, gt=0, description="between /readyz probes")
    probe_timeout_s: float = Field(default=2.0, gt=0)
    recommend_interval_s: float = Field(default=0.25, gt=0, description="between /recommend calls")
    stage_timeout_s: float = Field(default=600.0, gt=0, description="the longest any one wait may take")
    learner_batch_size: int = Field(default=128, ge=1)
    checkpoint_every_s: float = Field(default=1.0, gt=0)
    checkpoint_every_examples: int = Field(default=2_000, ge=1)
    publish_every_s: float = Field(default=15.0, gt=0)


@dataclass(frozen=True)
class Kill:
    target: Target
    after_examples: int  # distinct examples on the topic before it lands


@dataclass
class ChaosResult:
    events: int
    examples: int  # expected: one per logged impression
    kills: dict[str, int]
    restarts: dict[str, int]
    crashes: dict[str, int]  # processes that exited without being killed (restarted too)
    lost: int  # expected examples the learner never learned
    duplicated: int  # examples learned more than once
    resent: int  # repeats on the examples topic (at-least-once; de-duplicated downstream)
    missing_on_topic: int  # expected examples the worker never sent
    unexpected: int  # examples on the topic or in the ledger that the expectation does not have
    wrong_labels: int  # examples on the topic whose content differs from the expectation
    feature_mismatches: int  # (view, key) rows in Feast that differ from the expectation's last rows
    feature_rows: int
    dead_letters: int
    max_unavailable_s: float  # the longest time serving's /readyz gave no successful answer
    probes: int
    probe_failures: int
    recommends: int
    recommend_failures: int
    published_versions: int  # model versions the learner published during the run
    wall_s: float
    samples: dict[str, list[str]] = field(default_factory=dict)  # a few ids of each kind of fault

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.missing_on_topic or self.unexpected or self.wrong_labels
                    or self.feature_mismatches or self.dead_letters or self.probe_failures or self.recommend_failures
                    or sum(self.crashes.values()))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        kills = ", ".join(f"{n} {t}" for t, n in self.kills.items())
        return "\n".join([
            f"events                {self.events:,}",
            f"examples expected     {self.examples:,}",
            f"kills                 {sum(self.kills.values())} ({kills})",
            f"restarts              {sum(self.restarts.values())}",
            f"crashes               {sum(self.crashes.values())}",
            f"lost                  {self.lost}",
            f"duplicated (learned)  {self.duplicated}",
            f"re-sent on topic      {self.resent} (de-duplicated by event_id)",
            f"missing on topic      {self.missing_on_topic}",
            f"wrong labels          {self.wrong_labels}",
            f"feature mismatches    {self.feature_mismatches} of {self.feature_rows} rows",
            f"dead letters          {self.dead_letters}",
            f"serving max unavail.  {self.max_unavailable_s:.3f} s "
            f"({self.probe_failures} of {self.probes} probes failed)",
            f"/recommend failures   {self.recommend_failures} of {self.recommends}",
            f"model versions        {self.published_versions} published during the run",
            f"wall time             {self.wall_s:,.1f} s",
        ])


# -- the pure parts -------------------------------------------------------------------------------------

def recent_start_ms(days_ago: int = 3, now_ms: int | None = None) -> int:
    """Midnight (UTC) a few days back: where the log starts.

    Records carry their event times; a broker deletes records older than a topic's retention and
    rejects ones more than an hour ahead of its clock, so the log must be recent and in the past.
    (Test topics keep everything, retention -1; recent times keep a log valid on a cluster's
    topics too. Logs from 2026-01 on 7-day topics once vanished under the worker whenever a
    retention check fell between replay and read.)
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return (now_ms // DAY_MS - days_ago) * DAY_MS


def clock_events(partitions: int, at_ms: int) -> list[Event]:
    """One impression, click and purchase per partition at ``at_ms``: moves every watermark there.

    Event time only advances with events; a finite stream needs these to close its last windows.

    >>> sorted({e.user_id for e in clock_events(3, 0)})
    ['clock-0', 'clock-2', 'clock-4']
    """
    from kafka.partitioner.default import murmur2

    users: dict[int, str] = {}
    n = 0
    while len(users) < partitions:
        user = f"clock-{n}"
        users.setdefault((murmur2(user.encode()) & 0x7FFFFFFF) % partitions, user)
        n += 1
    events: list[Event] = []
    for p, user in sorted(users.items()):
        req = f"clock-{p}"
        events += [
            Impression(event_id=f"{req}-i", event_time=at_ms, request_id=req, user_id=user, item_id="clock",
                       position=0, slate_size=1, propensity=1.0, model_version=None, policy_version=None),
            Click(event_id=f"{req}-c", event_time=at_ms, user_id=user, item_id="clock", request_id=req),
            Purchase(event_id=f"{req}-p", event_time=at_ms, user_id=user, item_id="clock", request_id=req),
        ]
    return events


def chaos_world(config: ChaosConfig, start_ms: int | None = None):
    from policies.synthetic_world import SyntheticWorld, WorldConfig

    return SyntheticWorld(WorldConfig(seed=config.seed, n_users=config.users, n_items=config.items,
                                      mean_request_gap_ms=config.request_gap_ms,
                                      start_time_ms=recent_start_ms() if start_ms is None else start_ms))


def chaos_log(world, events: int, partitions: int) -> list[Event]:
    """The catalog, then about ``events`` logged events in event-time order, then the clock events."""
    catalog = world.item_events()
    clocks = 3 * partitions
    wanted = max(events - len(catalog) - clocks, 1)
    requests = wanted // world.config.slate_size + 1  # a slate is slate_size impressions and some clicks
    log = world.generate_log(requests)
    while len(log) < wanted:
        requests = int(requests * wanted / len(log) * 1.05) + 1
        log = world.generate_log(requests)
    log = log[:wanted]  # a prefix of an event-time ordered log is a shorter stream of the same shop
    end = max(e.event_time for e in log)
    return catalog + log + clock_events(partitions, end + DAY_MS + 2 * HOUR_MS)


def expected_outcome(log: Sequence[Event]) -> tuple[dict[str, Example], dict[tuple[str, str], dict[str, Any]]]:
    """An uninterrupted run: the examples by event id and the last feature row of each (view, key)."""
    processor = StreamProcessor()
    examples: dict[str, Example] = {}
    features: dict[tuple[str, str], dict[str, Any]] = {}
    for out in processor.run(log, finish=False):
        examples.update({e.event_id: e for e in out.examples})
        for update in out.features:
            features[(update.view, update.key)] = update.values
    return examples, features


def kill_plan(kills: int, n_examples: int, seed: int = 0, targets: Sequence[Target] = ("worker", "learner"),
              window: tuple[float, float] = (0.05, 0.9)) -> list[Kill]:
    """``kills`` kills at seeded random points of the stream, taking ``targets`` in turn."""
    rng = random.Random(seed)
    lo, hi = window
    points = sorted(rng.uniform(lo, hi) for _ in range(kills))
    return [Kill(targets[i % len(targets)], max(1, int(p * n_examples))) for i, p in enumerate(points)]


def longest_outage(probes: Sequence[tuple[float, bool]]) -> float:
    """The longest span between two successful answers with failures in between (0 when none failed).

    ``probes`` are (time the answer came or the probe gave up, whether it succeeded), in order. A
    probe that fails before the first success counts from the first probe.
    """
    longest, last_ok, failing_since = 0.0, None, None
    for at, ok in probes:
        if ok:
            if failing_since is not None:
                longest = max(longest, at - (last_ok if last_ok is not None else failing_since))
            last_ok, failing_since = at, None
        elif failing_since is None:
            failing_since = at
    if failing_since is not None and probes:
        longest = max(longest, probes[-1][0] - (last_ok if last_ok is not None else failing_since))
    return longest


# -- the shell: processes, probes, readers --------------------------------------------------------------

def _die_with_parent() -> None:
    """In a child: ask Linux to SIGKILL it when the harness dies, so an interrupted run leaves no orphans."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the harness's finally still stops them


class StackProcess:
    """One ``python -m streamrec ...`` process with its log file; killed, restarted, stopped by the harness."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.args, self.env, self.log_path = name, args, env, log_path
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> "StackProcess":
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== start {time.strftime('%H:%M:%S')} ===\n".encode())
            out.flush()
            self.process = subprocess.Popen([sys.executable, "-m", "streamrec", *self.args], cwd=ROOT, env=self.env,
                                            stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.started_at = time.monotonic()
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def tail(self, chars: int = 3000) -> str:
        """The end of the log, a line repeated in a row shown once (the learner repeats its progress)."""
        try:
            lines = self.log_path.read_text(errors="replace")[-20 * chars:].splitlines()
        except OSError:
            return ""
        kept = [line for i, line in enumerate(lines) if i == 0 or line != lines[i - 1]]
        return "\n".join(kept)[-chars:]


class TopicReader(threading.Thread):
    """Reads every partition of a topic from the beginning, keeping the first copy of each event by id."""

    def __init__(self, kafka: KafkaSettings, suffix: str, partitions: int) -> None:
        super().__init__(name=f"read-{suffix}", daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        self.topic = kafka.topic(suffix)
        self.consumer = KafkaConsumer(**kafka.client_options(), group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest")
        self.partitions = [TopicPartition(self.topic, p) for p in range(partitions)]
        self.consumer.assign(self.partitions)
        self.consumer.seek_to_beginning(*self.partitions)
        self.lock = threading.Lock()
        self.by_id: dict[str, Event] = {}
        self.records = 0
        self.conflicting: list[str] = []  # ids whose repeat differs from the first copy
        self.undecodable = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    @property
    def distinct(self) -> int:
        return len(self.by_id)

    def has_all(self, ids: set[str]) -> bool:
        with self.lock:
            return ids <= self.by_id.keys()

    def run(self) -> None:
        from streaming.events import DecodeError, decode_event

        try:
            while not self._halt.is_set():
                for messages in self.consumer.poll(timeout_ms=200).values():
                    for message in messages:
                        try:
                            event = decode_event(message.value)
                        except DecodeError:
                            self.undecodable += 1
                            continue
                        with self.lock:
                            self.records += 1
                            first = self.by_id.setdefault(event.event_id, event)
                            if first is not event and first != event:
                                self.conflicting.append(event.event_id)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the harness
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.consumer.close()


class ServingProbe(threading.Thread):
    """Asks ``/readyz`` every ``interval_s`` and records (answered-at, ok) for each probe."""

    def __init__(self, base_url: str, interval_s: float, timeout_s: float) -> None:
        super().__init__(name="probe-readyz", daemon=True)
        self.base_url, self.interval_s, self.timeout_s = base_url, interval_s, timeout_s
        self.results: list[tuple[float, bool]] = []
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as client:
            while not self._halt.is_set():
                try:
                    response = client.get("/readyz")
                    ok = response.status_code == 200
                    reason = f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, reason = False, repr(exc)
                self.results.append((time.monotonic(), ok))
                if not ok and len(self.failures) < 20:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {reason}")
                self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class RecommendCaller(threading.Thread):
    """Calls ``/recommend`` for the world's users every ``interval_s``; counts what was not a 200."""

    def __init__(self, base_url: str, users: Sequence[str], interval_s: float, seed: int) -> None:
        super().__init__(name="recommend", daemon=True)
        self.base_url, self.users, self.interval_s = base_url, list(users), interval_s
        self.rng = random.Random(seed)
        self.calls = 0
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while not self._halt.is_set():
                body = {"user_id": self.rng.choice(self.users), "k": 5}
                try:
                    response = client.post("/recommend", json=body)
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code} {response.text[:300]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.calls += 1
                self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(60)


def latest_checkpoint_meta(checkpoints: Path) -> tuple[int, dict[str, Any]]:
    """(sequence, meta) of the newest complete checkpoint on disk, (0, {}) before the first."""
    try:
        names = sorted(p.name for p in checkpoints.glob("ckpt-*"))
    except OSError:
        return 0, {}
    for name in reversed(names):
        try:
            body = json.loads((checkpoints / name / "state.json").read_bytes())
            return body["seq"], body["meta"]
        except (OSError, ValueError, KeyError):  # pruned or being written while we looked
            continue
    return 0, {}


def child_environment() -> dict[str, str]:
    """The harness's environment minus ``STREAMREC_*`` (the settings file decides), one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("STREAMREC_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


class ChaosRun:
    """One run: the settings file, the three processes, the readers and probes, the kill loop, the checks."""

    def __init__(self, config: ChaosConfig, kafka: KafkaSettings, workdir: Path,
                 say: Callable[[str], None] = lambda line: log.info("%s", line)) -> None:
        self.config = config
        self.partitions = config.partitions or kafka.partitions
        self.kafka = kafka.model_copy(update={"partitions": self.partitions,
                                              "session_timeout_ms": config.session_timeout_ms})
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.say = say
        run_id = uuid.uuid4().hex[:8]
        self.app_id = f"chaos-{run_id}"
        self.learner_group = f"chaos-{run_id}-learner"
        self.checkpoints = self.workdir / "learner" / "checkpoints"
        self.registry_dir = self.workdir / "registry"
        self.features_dir = self.workdir / "features"
        self.processes: dict[str, StackProcess] = {}
        self.kills: Counter = Counter()
        self.restarts: Counter = Counter()
        self.crashes: Counter = Counter()
        self.crash_logs: list[str] = []

    # -- set-up --------------------------------------------------------------------------------------
    def settings_file(self, port: int) -> Path:
        from learner.config import tiny_model_config

        kafka = self.kafka.model_dump(mode="json", exclude_none=True)
        for secret in ("sasl_plain_password", "ssl_password"):  # dumped masked; pass them on unmasked
            value = getattr(self.kafka, secret)
            if value is not None:
                kafka[secret] = value.get_secret_value()
        cfg = self.config
        body = {
            "data_dir": str(self.workdir / "data"),
            "log_level": "INFO",
            "kafka": kafka,
            "stream": {"app_id": self.app_id, "sweep_interval_s": 0.2},
            "feature_store": {"data_dir": str(self.features_dir)},
            "learner": {
                "model": tiny_model_config().model_dump(mode="json"), "device": "cpu",
                "batch_size": cfg.learner_batch_size, "history_lag_ms": 5 * 60_000,
                "checkpoint_dir": str(self.checkpoints), "checkpoint_every_s": cfg.checkpoint_every_s,
                "checkpoint_every_examples": cfg.checkpoint_every_examples, "ledger": True,
                "dedup_ids": max(200_000, 2 * cfg.events), "registry": str(self.registry_dir),
                "publish_every_s": cfg.publish_every_s, "publish_min_examples": 500, "quality_gate_margin": 1.0,
                "group_id": self.learner_group, "instance_id": self.learner_group + "-0",
            },
            "serving": {
                "host": "127.0.0.1", "port": port, "registry_dir": str(self.registry_dir),
                # serving's own impressions would join the replayed stream and change what it must produce
                "log_impressions": False, "candidates": 50, "registry_poll_s": 5.0, "torch_threads": 1,
                "seed": cfg.seed,
            },
        }
        import yaml

        path = self.workdir / "streamrec.yaml"
        path.write_text(yaml.safe_dump(body, sort_keys=False))
        return path

    def prepare(self, world) -> None:
        """Topics, the feature store's definitions and a first model and policy, so serving is ready at once."""
        from feature_store.config import FeatureStoreSettings
        from feature_store.store import StreamingFeatureStore
        from learner.config import tiny_model_config
        from learner.registry import ModelRegistry
        from serving.synthetic import publish_baseline
        from streaming.kafka_io import ensure_topics

        ensure_topics(self.kafka, [*TOPICS, *INTERNAL_TOPICS])
        with StreamingFeatureStore(FeatureStoreSettings(data_dir=self.features_dir)) as store:
            store.apply()
        publish_baseline(ModelRegistry(self.registry_dir), world, config=tiny_model_config(), seed=self.config.seed)

    # -- supervision -----------------------------------------------------------------------------------
    def supervise(self) -> None:
        """Restart a process that exited without being killed (and count it: that is a crash)."""
        for name, proc in self.processes.items():
            if not proc.alive:
                self.crashes[name] += 1
                self.crash_logs.append(f"--- {name} exited with {proc.process.returncode}:\n{proc.tail()}")
                self.say(f"{name} exited by itself ({proc.process.returncode}); restarting it")
                proc.start()

    def logs(self) -> str:
        return "\n".join(f"--- {name} log tail:\n{proc.tail()}" for name, proc in self.processes.items())

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float | None = None,
             interval_s: float = 0.05, fail: bool = True) -> bool:
        deadline = time.monotonic() + (timeout_s or self.config.stage_timeout_s)
        while not condition():
            self.supervise()
            if time.monotonic() > deadline:
                if fail:
                    raise ChaosError(f"timed out after {timeout_s or self.config.stage_timeout_s:.0f}s waiting for "
                                     f"{what}\n{self.logs()}")
                return False
            time.sleep(interval_s)
        return True

    # -- checks --------------------------------------------------------------------------------------------
    def end_offsets(self, suffixes: Sequence[str]) -> dict[Any, int]:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(**self.kafka.client_options())
        try:
            return consumer.end_offsets([TopicPartition(self.kafka.topic(s), p) for s in suffixes
                                         for p in range(self.partitions)])
        finally:
            consumer.close()

    def uncommitted_inputs(self, topics: Sequence[str] = ("impressions", "clicks", "purchases", "items"),
                           ) -> dict[str, tuple[int | None, int]]:
        """The worker's partitions of ``topics`` whose committed offset is short of the end: (committed, end)."""
        from kafka import KafkaConsumer

        ends = self.end_offsets(topics)
        consumer = KafkaConsumer(**self.kafka.client_options(), group_id=self.app_id, enable_auto_commit=False)
        try:
            return {f"{tp.topic}[{tp.partition}]": (consumer.committed(tp), end) for tp, end in ends.items()
                    if end and (consumer.committed(tp) or 0) < end}
        finally:
            consumer.close()

    def learner_behind(self, ends: dict[Any, int]) -> dict[str, tuple[int, int]]:
        """Examples partitions the newest checkpoint has not consumed to ``ends``: (checkpointed, end)."""
        offsets = latest_checkpoint_meta(self.checkpoints)[1].get("offsets", {})
        return {f"{tp.topic}:{tp.partition}": (offsets.get(f"{tp.topic}:{tp.partition}", 0), end)
                for tp, end in ends.items() if offsets.get(f"{tp.topic}:{tp.partition}", 0) < end}

    def feature_mismatches(self, expected: dict[tuple[str, str], dict[str, Any]]) -> list[tuple[str, str]]:
        from feature_store.config import FeatureStoreSettings
        from feature_store.store import StreamingFeatureStore

        users = sorted({key for view, key in expected if view == "user_activity"})
        items = sorted({key for view, key in expected if view != "user_activity"})
        with StreamingFeatureStore(FeatureStoreSettings(data_dir=self.features_dir)) as store:
            online = store.online_features(user_ids=users, item_ids=items)
        wrong = []
        for entity, ids, views in (("user", users, ("user_activity",)),
                                   ("item", items, ("item_stats", "item_catalog"))):
            columns = online.get(entity, {})
            for row, key in enumerate(ids):
                for view in views:
                    if (view, key) in expected:
                        got = {name: columns.get(name, [None] * len(ids))[row] for name in expected[(view, key)]}
                        if got != expected[(view, key)]:
                            wrong.append((view, key))
        return wrong

    # -- the run ---------------------------------------------------------------------------------------
    def run(self) -> ChaosResult:
        from learner.checkpoint import CheckpointStore
        from learner.registry import ModelRegistry
        from streaming.kafka_io import EventProducer
        from streaming.local_broker import free_port
        from streaming.replay import replay_to_kafka

        cfg = self.config
        started = time.monotonic()
        world = chaos_world(cfg)
        events = chaos_log(world, cfg.events, self.partitions)
        expected_examples, expected_features = expected_outcome(events)
        self.expected_examples = expected_examples
        plan = kill_plan(cfg.kills, len(expected_examples), cfg.seed, cfg.targets, cfg.kill_window)
        self.say(f"{len(events):,} events, {len(expected_examples):,} examples expected; kills at "
                 + ", ".join(f"{k.target}@{k.after_examples}" for k in plan))

        self.prepare(world)
        baseline_versions = len(ModelRegistry(self.registry_dir).versions("model"))
        port = free_port()
        config_file = self.settings_file(port)
        env = child_environment()
        common = ["--config", str(config_file)]
        serving = StackProcess("serving", [*common, "serve"], env, self.workdir / "serving.log")
        self.processes = {
            "serving": serving.start(),
            "worker": StackProcess("worker", [*common, "stream", "worker", "--loglevel", "info"], env,
                                   self.workdir / "worker.log").start(),
            "learner": StackProcess("learner", [*common, "learn"], env, self.workdir / "learner.log").start(),
        }
        base_url = f"http://127.0.0.1:{port}"
        examples = self.examples = TopicReader(self.kafka, "examples", self.partitions)
        examples.start()
        probe = recommender = None
        replay_error: list[BaseException] = []

        def replay() -> None:
            try:
                with EventProducer(self.kafka) as producer:
                    replay_to_kafka(events, producer, progress=False)
            except BaseException as exc:  # noqa: BLE001 - surfaced below
                replay_error.append(exc)

        replayer = threading.Thread(target=replay, name="replay", daemon=True)
        try:
            self.wait(lambda: self._ready(base_url), "serving to be ready", interval_s=0.2)
            probe = ServingProbe(base_url, cfg.probe_interval_s, cfg.probe_timeout_s)
            recommender = RecommendCaller(base_url, world.user_ids, cfg.recommend_interval_s, cfg.seed)
            probe.start()
            recommender.start()
            replayer.start()

            for n, kill in enumerate(plan, 1):
                target = self.processes[kill.target]
                since = self._progress(kill.target, examples)
                try:
                    self.wait(lambda: examples.distinct >= kill.after_examples
                              and self._progress(kill.target, examples) > since,
                              f"{kill.after_examples} examples and {kill.target} progress before kill {n}")
                except ChaosError as exc:
                    learned = latest_checkpoint_meta(self.checkpoints)[1].get("examples_learned", 0)
                    raise ChaosError(f"{exc}\n--- at the timeout: {examples.distinct:,} distinct examples on the topic, "
                                     f"{kill.target} progress {since} -> {self._progress(kill.target, examples)}, "
                                     f"learner checkpoint holds {learned:,}") from None
                target.kill()
                self.kills[kill.target] += 1
                learned = latest_checkpoint_meta(self.checkpoints)[1].get("examples_learned", 0)
                self.say(f"kill {n}/{len(plan)}: SIGKILLed the {kill.target} at {examples.distinct:,} examples "
                         f"on the topic ({examples.records - examples.distinct} repeats), "
                         f"learner checkpoint holds {learned:,}")
                target.start()
                self.restarts[kill.target] += 1

            # the end: every input committed by the worker, every example checkpointed by the learner
            replayer.join(cfg.stage_timeout_s)
            if replay_error:
                raise ChaosError(f"the replay into Kafka failed: {replay_error[0]!r}")
            expected_ids = set(expected_examples)
            self.wait(lambda: examples.has_all(expected_ids), "every expected example on the topic", fail=False)
            self.wait(lambda: not self.uncommitted_inputs(), "the worker to commit all its input", interval_s=0.5)
            ends = self.end_offsets(("examples",))
            self.wait(lambda: examples.records + examples.undecodable >= sum(ends.values()),
                      "reading the examples topic to its end")
            self.wait(lambda: not self.learner_behind(ends), "the learner to checkpoint every example", interval_s=0.2)
            # its own topics too: item statistics re-keyed, and feature rows committed once Feast has them
            self.wait(lambda: not self.uncommitted_inputs(("item-activity", "feature-updates")),
                      "the worker to push every feature update to Feast", interval_s=0.5)
            self.wait(lambda: not self.feature_mismatches(expected_features), "Feast to hold the expected features",
                      interval_s=0.5, timeout_s=min(cfg.stage_timeout_s, 120), fail=False)
            wrong_features = self.feature_mismatches(expected_features)
        finally:
            for thread in (recommender, probe):
                if thread is not None:
                    thread.stop()
            exits = {name: proc.stop() for name, proc in self.processes.items()}
            examples.stop()
        if any(code not in (0, None) for code in exits.values()):
            self.say(f"exit codes at the end: {exits}")

        ledger = CheckpointStore(self.checkpoints, ledger=True).ledger_ids()
        learned = Counter(ledger)
        expected_ids = set(expected_examples)
        on_topic = set(examples.by_id)
        lost = sorted(expected_ids - learned.keys())
        twice = sorted(i for i, n in learned.items() if n > 1)
        missing = sorted(expected_ids - on_topic)
        unexpected = sorted((on_topic | learned.keys()) - expected_ids)
        wrong = sorted(i for i in on_topic & expected_ids if examples.by_id[i] != expected_examples[i])
        wrong += examples.conflicting
        dead = sum(self.end_offsets(("dlq",)).values())
        published = len(ModelRegistry(self.registry_dir).versions("model")) - baseline_versions
        return ChaosResult(
            events=len(events), examples=len(expected_examples), kills=dict(self.kills),
            restarts=dict(self.restarts), crashes=dict(self.crashes), lost=len(lost), duplicated=len(twice),
            resent=examples.records - examples.distinct, missing_on_topic=len(missing), unexpected=len(unexpected),
            wrong_labels=len(wrong), feature_mismatches=len(wrong_features), feature_rows=len(expected_features),
            dead_letters=dead, max_unavailable_s=round(longest_outage(probe.results) if probe else 0.0, 3),
            probes=len(probe.results) if probe else 0,
            probe_failures=sum(not ok for _, ok in probe.results) if probe else 0,
            recommends=recommender.calls if recommender else 0,
            recommend_failures=len(recommender.failures) if recommender else 0,
            published_versions=published, wall_s=round(time.monotonic() - started, 1),
            samples={k: v[:5] for k, v in {
                "lost": lost, "duplicated": twice, "missing_on_topic": missing, "unexpected": unexpected,
                "wrong_labels": wrong, "features": [f"{v}:{k}" for v, k in wrong_features],
                "probe_failures": probe.failures if probe else [],
                "recommend_failures": recommender.failures if recommender else [],
                "crashes": [c[-1500:] for c in self.crash_logs]}.items() if v},
        )

    def _ready(self, base_url: str) -> bool:
        import httpx

        try:
            return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _progress(self, target: Target, examples: TopicReader) -> int:
        """A counter that moves only while ``target`` works: records the worker sent, checkpoints the learner wrote."""
        if target == "worker":
            return examples.records
        return latest_checkpoint_meta(self.checkpoints)[0]


def run_chaos(config: ChaosConfig, kafka: KafkaSettings, workdir: Path,
              say: Callable[[str], None] = lambda line: log.info("%s", line)) -> ChaosResult:
    """Run the live stack under ``config``'s kills against ``kafka``'s cluster (give fresh topics); see the module doc."""
    return ChaosRun(config, kafka, workdir, say).run()
