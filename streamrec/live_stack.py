"""The live stack as separate processes: the Faust worker, the learner and serving on one Kafka cluster.

:class:`LiveStack` writes one YAML settings file, prepares what the processes share (topics, the
Feast definitions, a first model and policy so serving is ready at once) and runs
``streamrec stream worker``, ``streamrec learn`` and ``streamrec serve`` as subprocesses, each
with its own log. :class:`Announcements` follows ``model-updates`` from its start and records
when each version was announced. The end-to-end test (``tests/test_live_loop.py``) and the
freshness benchmark (``benchmarks/freshness.py``) start the stack from here; the crash harness
(:mod:`streamrec.chaos`) runs the same three commands and lends its process wrapper.

Only what a deployment would set differs from the defaults: paths, ports, the consumer group
and Faust app id (fresh per stack, so stacks on one cluster never share state), and whatever the
caller passes in ``overrides`` (a nested dict in the settings tree's shape).

>>> merge({"learner": {"device": "cpu", "batch_size": 8}}, {"learner": {"batch_size": 64}, "log_level": "INFO"})
{'learner': {'device': 'cpu', 'batch_size': 64}, 'log_level': 'INFO'}
>>> error_lines("INFO ok\\nERROR serving.hot_swap: refused\\nTraceback (most recent call last):\\n")
['ERROR serving.hot_swap: refused', 'Traceback (most recent call last):']
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.config import INTERNAL_TOPICS, TOPICS, KafkaSettings
from streaming.events import ModelUpdate
from streamrec.chaos import StackProcess, child_environment

log = logging.getLogger(__name__)
# a log line that reports a failure: logging's ERROR/CRITICAL level or a Python traceback
# error lines that report no fault: aiokafka logs its first coordinator lookup of a group on a fresh broker at
# ERROR, then retries and joins
BENIGN_ERROR_LINES = ("Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailableError",)
_ERROR_LINE = re.compile(r"(^|[\s\[|:])(ERROR|CRITICAL)([\s\]|:]|$)|^Traceback \(most recent call last\)")


class LiveStackError(RuntimeError):
    """The stack did not reach a state in time, or a process died; the message carries the logs' tails."""


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``, nested dicts merged key by key (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def error_lines(text: str) -> list[str]:
    """The lines of a process log that report an error (an ERROR/CRITICAL record or a traceback)."""
    return [line for line in text.splitlines() if _ERROR_LINE.search(line)]


@dataclass(frozen=True)
class Announced:
    """A ``model-updates`` announcement and the wall time (``time.time()``) it was read."""

    update: ModelUpdate
    received_at: float


class Announcements(threading.Thread):
    """Follows ``model-updates`` from the beginning and keeps every announcement with when it arrived."""

    def __init__(self, kafka: KafkaSettings) -> None:
        super().__init__(name="follow-model-updates", daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        self.topic = kafka.topic("model-updates")
        self.consumer = KafkaConsumer(**kafka.client_options(), group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest")
        partitions = self.consumer.partitions_for_topic(self.topic) or set()
        if not partitions:
            self.consumer.close()
            raise LiveStackError(f"topic {self.topic} does not exist; create the topics first")
        assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(assigned)
        self.consumer.seek_to_beginning(*assigned)
        self.lock = threading.Lock()
        self.seen: list[Announced] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        from streaming.events import DecodeError, decode_event

        try:
            while not self._halt.is_set():
                for messages in self.consumer.poll(timeout_ms=100).values():
                    now = time.time()
                    for message in messages:
                        try:
                            update = decode_event(message.value, ModelUpdate)
                        except DecodeError:
                            continue
                        with self.lock:
                            self.seen.append(Announced(update, now))
        except BaseException as exc:  # noqa: BLE001 - surfaced by models()
            self.error = exc

    def models(self, since: float = 0.0) -> list[Announced]:
        """Model announcements read at or after ``since`` (wall time), in the order they arrived."""
        if self.error is not None:
            raise LiveStackError(f"following {self.topic} failed: {self.error!r}")
        with self.lock:
            return [a for a in self.seen if a.update.kind == "model" and a.received_at >= since]

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.consumer.close()


class LiveStack:
    """The worker, the learner and serving as ``python -m streamrec`` processes under ``workdir``."""

    PROCESSES = ("serving", "worker", "learner")

    def __init__(self, kafka: KafkaSettings, workdir: Path, overrides: dict[str, Any] | None = None,
                 port: int | None = None) -> None:
        from streaming.local_broker import free_port

        self.kafka = kafka
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        run_id = uuid.uuid4().hex[:8]
        kafka_body = kafka.model_dump(mode="json", exclude_none=True)
        for secret in ("sasl_plain_password", "ssl_password"):  # dumped masked; pass them on unmasked
            value = getattr(kafka, secret)
            if value is not None:
                kafka_body[secret] = value.get_secret_value()
        base = {
            "data_dir": str(self.workdir / "data"),
            "log_level": "INFO",
            "kafka": kafka_body,
            "stream": {"app_id": f"live-{run_id}"},
            "feature_store": {"data_dir": str(self.workdir / "features")},
            "learner": {"group_id": f"live-{run_id}-learner", "instance_id": f"live-{run_id}-learner-0"},
            "serving": {"host": "127.0.0.1", "port": self.port},
        }
        self.settings_body = merge(base, overrides or {})
        self.config_path = self.workdir / "streamrec.yaml"
        self.processes: dict[str, StackProcess] = {}

    # -- where things are ----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return Path(self.settings_body["data_dir"])

    @property
    def registry_dir(self) -> Path:
        learner = self.settings_body.get("learner", {})
        return Path(str(learner.get("registry") or self.data_dir / "registry").removeprefix("file://"))

    @property
    def features_dir(self) -> Path:
        return Path(self.settings_body["feature_store"]["data_dir"])

    def registry(self):
        from learner.registry import ModelRegistry

        return ModelRegistry(self.registry_dir)

    def lineage(self, version: str) -> dict[str, Any]:
        """What model ``version`` had learned when it was published (``learner.model.LINEAGE_FILE``)."""
        from learner.model import LINEAGE_FILE

        return json.loads(self.registry().read_file("model", version, LINEAGE_FILE))

    # -- set-up ------------------------------------------------------------------------------------------
    def prepare(self, world=None, model_config=None) -> None:
        """Topics, the feature store's definitions and, with ``world``, a first model and policy.

        Serving becomes ready as soon as the registry holds a model and a policy; the learner
        publishes its versions into the same registry after them.
        """
        import yaml

        from feature_store.config import FeatureStoreSettings
        from feature_store.store import StreamingFeatureStore
        from streaming.kafka_io import ensure_topics

        ensure_topics(self.kafka, [*TOPICS, *INTERNAL_TOPICS])
        with StreamingFeatureStore(FeatureStoreSettings(data_dir=self.features_dir)) as store:
            store.apply()  # once, here: processes that each apply at start would race on the registry file
        if world is not None:
            from serving.synthetic import publish_baseline

            publish_baseline(self.registry(), world, config=model_config)
        self.config_path.write_text(yaml.safe_dump(self.settings_body, sort_keys=False))

    def start(self, ready_timeout_s: float = 120.0) -> "LiveStack":
        """Start the three processes and wait until serving answers ``/readyz`` with 200."""
        env = child_environment()
        common = ["--config", str(self.config_path)]
        commands = {
            "serving": [*common, "serve"],
            "worker": [*common, "stream", "worker", "--loglevel", "info"],
            "learner": [*common, "learn"],
        }
        for name in self.PROCESSES:
            self.processes[name] = StackProcess(name, commands[name], env, self.workdir / f"{name}.log").start()
        self.wait(self.ready, "serving to be ready", ready_timeout_s, interval_s=0.2)
        return self

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every process (SIGKILL after a grace period); their exit codes."""
        return {name: proc.stop(30) for name, proc in self.processes.items()}

    def __enter__(self) -> "LiveStack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- waiting and checking ----------------------------------------------------------------------------
    def check_alive(self) -> None:
        dead = [name for name, proc in self.processes.items() if not proc.alive]
        if dead:
            raise LiveStackError(f"{', '.join(dead)} exited by itself\n{self.logs()}")

    def wait(self, condition: Callable[[], Any], what: str, timeout_s: float, interval_s: float = 0.1) -> Any:
        """Poll ``condition`` until it returns something truthy (returned); raise after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            self.check_alive()
            if time.monotonic() > deadline:
                raise LiveStackError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.logs()}")
            time.sleep(interval_s)

    def logs(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {name} log tail:\n{proc.tail(chars)}" for name, proc in self.processes.items())

    def errors(self, benign: tuple[str, ...] = BENIGN_ERROR_LINES) -> dict[str, list[str]]:
        """Each process's log lines that report an error (see :func:`error_lines`), less the ``benign``
        ones; empty when all is well."""
        found = {}
        for name, proc in self.processes.items():
            try:
                lines = [line for line in error_lines(proc.log_path.read_text(errors="replace"))
                         if not any(known in line for known in benign)]
            except OSError:
                continue
            if lines:
                found[name] = lines
        return found
