"""Hot swap and impression logging, in-process: versions move forward only, bad versions are
refused while the old bundle serves on, a request finishes on the bundle it started with, and
impressions wait in a bounded buffer while Kafka is unreachable and are delivered once it answers."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch

from learner.model import load_model, publish_model
from learner.registry import CorruptArtifact, ModelRegistry
from policies.export import greedy_policy, load_policy, publish_policy
from policies.synthetic_world import SyntheticWorld, WorldConfig
from serving.config import ServingSettings
from serving.hot_swap import Offer, ReadWriteLock, VersionSwapper, version_number
from serving.impressions import ImpressionLogger
from serving.metrics import ServingMetrics
from serving.retrieval import ExactIndex, popular_items
from serving.service import RecommendationService, RecommendRequest
from serving.synthetic import catalog_model
from streaming.config import KafkaSettings
from streaming.events import Impression
from streaming.kafka_io import EventConsumer
from streaming.local_broker import free_port

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
T0 = 1_767_225_600_000


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    warnings.simplefilter("ignore")
    world = SyntheticWorld(WorldConfig(seed=9, n_users=10, n_items=30))
    registry = ModelRegistry(tmp_path_factory.mktemp("registry"))
    model = catalog_model(world.item_events())
    publish_model(registry, model, metrics={}, parent=None)
    publish_policy(registry, greedy_policy(exploration={"kind": "epsilon", "epsilon": 0.2}))
    return registry


def new_model_version(registry: ModelRegistry, shift: float):
    model = load_model(registry.load("model", "v000001"))
    with torch.no_grad():
        model.towers[0][-1].bias.add_(shift)
    return publish_model(registry, model, metrics={}, parent="v000001")


def test_versions_only_move_forward_and_bad_ones_are_refused(registry):
    swapper = VersionSwapper(registry)
    swapper.load_latest_now()
    first = swapper.current
    assert (first.model_version, first.policy_version) == ("v000001", "v000001")
    good = new_model_version(registry, 0.5)
    assert swapper.apply(Offer("model", good.version, good.path, good.manifest_digest))
    assert swapper.current.model_version == good.version and swapper.current.policy is first.policy
    assert not swapper.apply(Offer("model", "v000001"))  # older: ignored, not refused
    assert ("model", "v000001") not in swapper.refused

    lying = new_model_version(registry, 0.6)  # announced with another artifact's digest
    assert not swapper.apply(Offer("model", lying.version, lying.path, good.manifest_digest))
    assert "not the announced" in swapper.refused[("model", lying.version)]

    damaged = new_model_version(registry, 0.7)
    (damaged.path / "catalog.json").write_text("[]")  # a side file no longer matches its checksum
    assert not swapper.apply(Offer("model", damaged.version, damaged.path, damaged.manifest_digest))
    assert "checksum" in swapper.refused[("model", damaged.version)]
    assert swapper.current.model_version == good.version  # the old version serves on
    swapper.offer_latest()  # a refused version is never tried again
    assert swapper._offers.empty()
    assert swapper.metrics.refused.labels(kind="model")._value.get() == 2


def test_a_version_failing_the_smoke_request_is_refused(registry):
    def nan_model(artifact):
        model = load_model(artifact)
        with torch.no_grad():
            model.towers[0][-1].bias.fill_(float("nan"))
        return model

    swapper = VersionSwapper(registry)
    swapper.load_latest_now()
    serving = swapper.current
    candidate = new_model_version(registry, 0.1)
    swapper._loaders["model"] = nan_model
    assert not swapper.apply(Offer("model", candidate.version))
    assert "invalid pctr" in swapper.refused[("model", candidate.version)]
    assert swapper.current is serving


def test_a_request_finishes_on_the_bundle_it_started_with(registry):
    """A request blocked inside scoring while a new model and policy are swapped in still answers
    with the old versions, and its scores come from the old model."""
    service = RecommendationService(ServingSettings(log_impressions=False, listen_for_updates=False),
                                    registry=registry).start()
    try:
        old = service.swapper.current
        entered, release = threading.Event(), threading.Event()
        original_predict = old.model.predict

        def slow_predict(*args, **kwargs):
            entered.set()
            assert release.wait(30)
            return original_predict(*args, **kwargs)

        old.model.predict = slow_predict
        result = {}
        request = RecommendRequest(user_id="u0001", k=3, item_ids=["i0001", "i0002", "i0003"], request_id="r1")
        thread = threading.Thread(target=lambda: result.setdefault("response", service.recommend(request)))
        thread.start()
        assert entered.wait(30)
        new_model = new_model_version(registry, 2.0)
        new_policy = publish_policy(registry, greedy_policy(exploration={"kind": "epsilon", "epsilon": 0.5}))
        assert service.swapper.apply(Offer("model", new_model.version))
        assert service.swapper.apply(Offer("policy", new_policy.version))
        release.set()
        thread.join(30)
        old.model.predict = original_predict
        during = result["response"]
        assert (during.model_version, during.policy_version) == (old.model_version, old.policy_version)
        after = service.recommend(request)
        assert (after.model_version, after.policy_version) == (new_model.version, new_policy.version)
        assert after.items[0].pctr != pytest.approx(during.items[0].pctr)  # the new model scored it
    finally:
        service.stop()


def test_exact_index_finds_the_true_top_n():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 8)).astype(np.float32)
    ids = [f"i{n}" for n in range(500)]
    index = ExactIndex(ids, vectors)
    for _ in range(5):
        query = rng.normal(size=8)
        cosine = vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
        assert index.search(query, 25) == [ids[i] for i in np.argsort(-cosine)[:25]]
    assert len(index.search(rng.normal(size=8), 10_000)) == 500
    with pytest.raises(ValueError, match="dimensions"):
        index.search(np.ones(3), 5)


def test_popularity_puts_the_context_category_first():
    popularity = {"a": 5.0, "b": 9.0, "c": 1.0, "d": 7.0}
    categories = {"a": "tea", "b": "coffee", "c": "tea", "d": "coffee"}
    assert popular_items(popularity, 3) == ["b", "d", "a"]
    assert popular_items(popularity, 3, categories=categories, category="tea") == ["a", "c", "b"]
    assert popular_items(popularity, 2, categories=categories, category="juice") == ["b", "d"]


def test_readers_share_the_model_and_a_writer_waits_for_them():
    lock, order = ReadWriteLock(), []
    with lock.reading():
        writer = threading.Thread(target=lambda: [lock.writing().__enter__(), order.append("write")])
        writer.start()
        time.sleep(0.05)
        with lock.reading():  # a second reader is not blocked by the first
            order.append("read")
        assert order == ["read"]
    writer.join(5)
    assert order == ["read", "write"]


def test_version_names_order_by_number():
    assert sorted(["v000010", "v000002", "v000100"], key=version_number) == ["v000002", "v000010", "v000100"]
    with pytest.raises(ValueError):
        version_number("latest")


def impressions(n: int, start: int = 0) -> list[Impression]:
    return [Impression(event_time=T0 + i, request_id=f"r{i}", user_id=f"u{i % 3}", item_id=f"i{i}", position=0,
                       slate_size=1, propensity=0.5, model_version="v000001", policy_version="v000001",
                       features={"item_ctr_1h": 0.1})
            for i in range(start, start + n)]


@pytest.mark.kafka
def test_impressions_wait_in_a_bounded_buffer_while_kafka_is_unreachable(kafka: KafkaSettings):
    reachable = threading.Event()
    nowhere = kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}", "bootstrap_timeout_ms": 500})
    metrics = ServingMetrics()
    logger = ImpressionLogger(lambda: kafka if reachable.is_set() else nowhere, max_buffer=20, retry_s=0.2,
                              metrics=metrics).start()
    try:
        started = time.perf_counter()
        logged = impressions(30)
        for n in range(0, 30, 5):
            logger.log(logged[n:n + 5])
        assert time.perf_counter() - started < 0.1, "logging never waits for Kafka"
        assert logger.pending == 20 and logger.dropped == 10
        text = metrics.render().decode()
        assert "streamrec_impressions_dropped_total 10.0" in text and "streamrec_impressions_buffered 20.0" in text
        time.sleep(0.5)
        assert logger.sent == 0

        reachable.set()  # the broker answers again: the buffer drains
        assert logger.wait_until_sent(60), f"{logger.pending} impressions still pending"
        assert logger.sent == 20
        with EventConsumer(kafka, ["impressions"]) as consumer:
            seen: list[Impression] = []
            deadline = time.monotonic() + 30
            while len(seen) < 20 and time.monotonic() < deadline:
                seen += [r.event for r in consumer.poll(timeout_ms=500)]
        assert sorted(e.event_id for e in seen) == sorted(e.event_id for e in logged[10:])  # the newest 20
    finally:
        logger.close()
