"""Hot swap: new model and policy versions replace the serving ones without a lost request.

What serves is one immutable :class:`ServingBundle` (a model, a policy, and the retrieval index
built from that model's item embeddings). A request reads ``VersionSwapper.current`` once, at its
start, and uses that bundle to the end, so it finishes on the versions it started with however
many swaps happen meanwhile. A new version is loaded in the background: its manifest digest is
checked against the announcement, every file's checksum is verified (``learner.registry``), the
loader rebuilds the module (and smoke-tests it), and then a whole request is run through the new
bundle; only if all of that passes does one reference assignment make it current. A version that
fails anywhere is refused, remembered (it is never tried again), counted, and the old bundle
keeps serving.

Versions arrive two ways: ``ModelUpdate`` events on the ``model-updates`` topic
(:class:`ModelUpdateListener`, which every replica runs for itself, reading the whole topic
without a consumer group) and a periodic look at the registry (:class:`RegistryPoller`), which
also covers a broker that was down when an announcement went out. Versions only move forward:
an announcement of a version older than the serving one is ignored.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from learner.registry import CorruptArtifact, LoadedArtifact, ModelRegistry, VersionNotFound, load_artifact_dir
from streaming.config import KafkaSettings
from streaming.events import DecodeError, Impression, ModelUpdate, decode_event

from serving.metrics import ServingMetrics
from serving.retrieval import ExactIndex

log = logging.getLogger(__name__)

_VERSION = re.compile(r"^v(\d+)$")
SMOKE_TIME_MS = 1_767_225_600_000


def version_number(version: str) -> int:
    """The registry's version names are ``v000001``, ``v000002``, ...; their order is their number."""
    match = _VERSION.match(version or "")
    if match is None:
        raise ValueError(f"{version!r} is not a registry version name (v000001, v000002, ...)")
    return int(match.group(1))


def catalog(model: Any) -> tuple[list[str], dict[str, str]]:
    """The ids of the items a model version has text for, and their categories.

    The catalog travels with the model artifact (``learner.text.ItemTextCache``, ``model.cache``).
    """
    cache = model.cache
    ids, categories = [], {}
    for row in range(1, len(cache.ids)):
        if cache.has_text[row]:
            ids.append(cache.ids[row])
            if cache.categories[row]:
                categories[cache.ids[row]] = cache.categories[row]
    return ids, categories


class ReadWriteLock:
    """Many readers or one writer: requests score concurrently; adding catalog items waits for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._readers:
                self._cond.wait()
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass(frozen=True)
class ModelPart:
    """A loaded model version with what is derived from it once: the retrieval index and categories."""

    version: str
    model: Any
    index: ExactIndex
    categories: dict[str, str]
    guard: ReadWriteLock = field(default_factory=ReadWriteLock)  # the model's catalog grows under the writer side


@dataclass(frozen=True)
class ServingBundle:
    """Everything one request needs, fixed for the request's whole life."""

    model_part: ModelPart
    policy: Any
    policy_version: str
    loaded_at: float = field(default_factory=time.time)

    @property
    def model(self) -> Any:
        return self.model_part.model

    @property
    def model_version(self) -> str:
        return self.model_part.version

    @property
    def index(self) -> ExactIndex:
        return self.model_part.index

    @property
    def guard(self) -> ReadWriteLock:
        return self.model_part.guard


def prepare_model(version: str, model: Any, batch: int = 4096) -> ModelPart:
    """A loaded model with its retrieval index over the whole catalog (cached item-tower embeddings)."""
    item_ids, categories = catalog(model)
    if not item_ids:
        return ModelPart(version, model, ExactIndex([], np.zeros((0, 1), dtype=np.float32)), categories)
    parts = [np.asarray(model.item_vectors(item_ids[i:i + batch]), dtype=np.float32) for i in range(0, len(item_ids), batch)]
    return ModelPart(version, model, ExactIndex(item_ids, np.concatenate(parts)), categories)


def smoke_request(bundle: ServingBundle, n: int = 8) -> None:
    """Run one synthetic request through a bundle end to end; raise if anything is off."""
    from policies.export import candidate_features

    items = bundle.index.item_ids[:n]
    if not items:
        return  # a model without a catalog can still score requests that name known items
    impressions = [
        Impression.model_construct(event_id=f"smoke-{i}", event_time=SMOKE_TIME_MS, request_id="smoke", user_id="smoke-user",
                                   item_id=item, position=0, slate_size=1, propensity=1.0, model_version=bundle.model_version,
                                   policy_version=bundle.policy_version, context={}, features={})
        for i, item in enumerate(items)
    ]
    scores = bundle.model.predict(impressions, {"smoke-user": items[:2]})
    for name in ("pctr", "pcvr", "pctcvr"):
        values = np.asarray(scores[name], dtype=np.float64)
        if values.shape != (len(items),) or not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
            raise CorruptArtifact(f"model {bundle.model_version} gives invalid {name} {values!r} in the smoke request")
    query = np.asarray(bundle.model.user_vector("smoke-user", items[:2], {}), dtype=np.float32)
    bundle.index.search(query, min(n, len(bundle.index)))
    features = candidate_features(scores, [{} for _ in items], bundle.policy.feature_names)
    slots, propensities = bundle.policy.sample_slate(features, min(3, len(items)), np.random.default_rng(0))
    if len(set(slots)) != len(slots) or not all(0 < p <= 1 for p in propensities):
        raise CorruptArtifact(f"policy {bundle.policy_version} gives an invalid slate {slots} / {propensities}")


@dataclass(frozen=True)
class Offer:
    """A version that may be newer than the serving one, and how it was heard of."""

    kind: str
    version: str
    path: Path | None = None  # the announced artifact directory; None: the registry's own
    digest: str | None = None  # the announced manifest digest; None: no announcement to check against
    source: str = "registry"


class VersionSwapper:
    """Loads offered versions in one background thread and swaps them in atomically."""

    def __init__(self, registry: ModelRegistry, *, load_model: Callable[[LoadedArtifact], Any] | None = None,
                 load_policy: Callable[[LoadedArtifact], Any] | None = None, metrics: ServingMetrics | None = None,
                 on_swap: Callable[[ServingBundle], None] | None = None) -> None:
        if load_model is None:
            from learner.model import load_model
        if load_policy is None:
            from policies.export import load_policy
        self.registry = registry
        self._loaders = {"model": load_model, "policy": load_policy}
        self.metrics = metrics or ServingMetrics()
        self.on_swap = on_swap
        self.current: ServingBundle | None = None  # read once per request; replaced, never mutated
        self._model: ModelPart | None = None
        self._policy: tuple[str, Any] | None = None
        self.refused: dict[tuple[str, str], str] = {}
        self.history: list[tuple[float, str, str]] = []  # (time, kind, version) of every swap
        self._offers: queue.Queue[Offer | None] = queue.Queue()
        self._apply_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    # -- state ----------------------------------------------------------------------------------
    def serving_version(self, kind: str) -> str | None:
        if kind == "model":
            return self._model.version if self._model else None
        return self._policy[0] if self._policy else None

    @property
    def ready(self) -> bool:
        return self.current is not None

    # -- offers ---------------------------------------------------------------------------------
    def offer(self, offer: Offer) -> None:
        """Queue a version for the background loader (returns at once)."""
        self._idle.clear()
        self._offers.put(offer)

    def offer_update(self, update: ModelUpdate) -> None:
        path = Path(update.artifact_uri.removeprefix("file://"))
        self.offer(Offer(update.kind, update.version, path, update.manifest_digest, source="model-updates"))

    def offer_latest(self) -> None:
        for kind in ("model", "policy"):
            latest = self.registry.latest(kind)
            if latest is not None and self._is_new(kind, latest):
                self.offer(Offer(kind, latest))

    def _is_new(self, kind: str, version: str) -> bool:
        if (kind, version) in self.refused:
            return False
        serving = self.serving_version(kind)
        try:
            return serving is None or version_number(version) > version_number(serving)
        except ValueError:
            return True  # a malformed name is refused by apply() with the reason

    # -- loading --------------------------------------------------------------------------------
    def load_latest_now(self) -> None:
        """Synchronously load the newest model and policy in the registry (start-up)."""
        for kind in ("model", "policy"):
            latest = self.registry.latest(kind)
            if latest is not None:
                self.apply(Offer(kind, latest))

    def apply(self, offer: Offer) -> bool:
        """Load, verify, smoke-test and swap in one offered version; False if it was not swapped in."""
        with self._apply_lock:
            if not self._is_new(offer.kind, offer.version):
                return False
            started = time.perf_counter()
            try:
                version_number(offer.version)
                if offer.kind not in self._loaders:
                    raise CorruptArtifact(f"unknown artifact kind {offer.kind!r}")
                artifact = self._read(offer)
                loaded = self._loaders[offer.kind](artifact)
                if offer.kind == "model":
                    new_model, new_policy = prepare_model(offer.version, loaded), self._policy
                else:
                    new_model, new_policy = self._model, (offer.version, loaded)
                bundle = None
                if new_model is not None and new_policy is not None:
                    bundle = ServingBundle(new_model, new_policy[1], new_policy[0])
                    smoke_request(bundle)
            except VersionNotFound as exc:  # not (yet) visible here: not refused, the poller offers it again
                log.warning("cannot load %s %s yet: %s", offer.kind, offer.version, exc)
                return False
            except Exception as exc:  # noqa: BLE001 - any failure refuses the version; serving goes on
                reason = f"{exc.__class__.__name__}: {exc}"
                self.refused[(offer.kind, offer.version)] = reason
                self.metrics.refused.labels(kind=offer.kind).inc()
                log.error("refused %s %s (from %s): %s; still serving %s", offer.kind, offer.version, offer.source,
                          reason, self.serving_version(offer.kind))
                return False
            # the swap: plain reference assignments; a request holds the bundle it read
            self._model, self._policy = new_model, new_policy
            if bundle is not None:
                self.current = bundle
            self.history.append((time.time(), offer.kind, offer.version))
            self.metrics.swaps.labels(kind=offer.kind).inc()
            self.metrics.set_version(offer.kind, offer.version)
            log.info("serving %s %s (from %s, loaded in %.2fs)", offer.kind, offer.version, offer.source,
                     time.perf_counter() - started)
        if bundle is not None and self.on_swap is not None:
            self.on_swap(bundle)
        return True

    def _read(self, offer: Offer) -> LoadedArtifact:
        if offer.path is not None and offer.path.is_dir():
            directory = offer.path
        else:  # announced from another machine's path: this replica reads its own registry mount
            directory = self.registry.root / offer.kind / offer.version
            if not directory.is_dir():
                raise VersionNotFound(f"{offer.kind} {offer.version} is neither at {offer.path} nor in {self.registry.root}")
        artifact = load_artifact_dir(directory, expected_kind=offer.kind, expected_digest=offer.digest)
        if artifact.version != offer.version:
            raise CorruptArtifact(f"{directory} holds version {artifact.version}, announced as {offer.version}")
        return artifact

    # -- the background loader ------------------------------------------------------------------
    def start(self) -> "VersionSwapper":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="version-loader", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            offer = self._offers.get()
            if offer is None:
                return
            try:
                self.apply(offer)
            except Exception:  # noqa: BLE001 - apply refuses versions itself; this guards the thread
                log.exception("loading %s failed", offer)
            finally:
                if self._offers.empty():
                    self._idle.set()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every queued offer has been handled (tests, start-up)."""
        return self._idle.wait(timeout_s)

    def stop(self) -> None:
        if self._thread is not None:
            self._offers.put(None)
            self._thread.join(timeout=30)
            self._thread = None


class RegistryPoller:
    """Every ``interval_s``, offers the registry's newest versions (the fallback to announcements)."""

    def __init__(self, swapper: VersionSwapper, interval_s: float) -> None:
        self.swapper, self.interval_s = swapper, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-poller", daemon=True)

    def start(self) -> "RegistryPoller":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.swapper.offer_latest()
            except Exception:  # noqa: BLE001 - an unreadable registry now may be readable next time
                log.exception("polling the registry at %s failed", self.swapper.registry.root)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class ModelUpdateListener:
    """Reads every ``model-updates`` announcement and offers it to the swapper.

    No consumer group: each serving process (each Ray Serve replica) must see every update, so it
    assigns itself all partitions and starts at their ends (what was published before start-up
    is loaded from the registry). An unreachable broker is retried; the registry poller covers
    the gap.
    """

    def __init__(self, kafka: KafkaSettings, swapper: VersionSwapper, retry_s: float = 5.0) -> None:
        self.kafka, self.swapper, self.retry_s = kafka, swapper, retry_s
        self.topic = kafka.topic("model-updates")
        self._stop = threading.Event()
        self._positioned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-update-listener", daemon=True)
        self.received = 0

    def start(self, wait_s: float = 0.0) -> "ModelUpdateListener":
        """Start; with ``wait_s``, wait up to that long until the listener is positioned at the topic's end."""
        self._thread.start()
        if wait_s:
            self._positioned.wait(wait_s)
        return self

    @property
    def listening(self) -> bool:
        return self._positioned.is_set()

    def _connect(self):
        from kafka import KafkaConsumer, TopicPartition

        options = {**self.kafka.client_options(), "group_id": None, "enable_auto_commit": False,
                   "auto_offset_reset": "latest"}
        consumer = KafkaConsumer(**options)
        try:
            partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                raise RuntimeError(f"topic {self.topic} does not exist; run `streamrec topics create`")
            assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            consumer.seek_to_end(*assigned)
            for tp in assigned:
                consumer.position(tp)  # resolve the end offsets now, not at the first poll
        except BaseException:
            consumer.close()
            raise
        return consumer

    def _run(self) -> None:
        consumer = None
        while not self._stop.is_set():
            if consumer is None:
                try:
                    consumer = self._connect()
                except Exception as exc:  # noqa: BLE001
                    log.warning("cannot follow %s (%s); retrying in %.0fs, the registry poller covers the gap",
                                self.topic, exc, self.retry_s)
                    self._stop.wait(self.retry_s)
                    continue
                self._positioned.set()
                # anything published while we were not listening is in the registry
                self.swapper.offer_latest()
            try:
                batches = consumer.poll(timeout_ms=500)
            except Exception as exc:  # noqa: BLE001
                log.warning("reading %s failed (%s); reconnecting", self.topic, exc)
                consumer.close()
                consumer = None
                continue
            for messages in batches.values():
                for message in messages:
                    self._handle(message.value)
        if consumer is not None:
            consumer.close()

    def _handle(self, value: bytes | None) -> None:
        try:
            update = decode_event(value or b"", ModelUpdate)
        except DecodeError as exc:
            log.warning("ignoring a bad message on %s: %s", self.topic, exc.reason)
            return
        self.received += 1
        if self.swapper._is_new(update.kind, update.version):  # noqa: SLF001 - cheap pre-filter
            self.swapper.offer_update(update)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
