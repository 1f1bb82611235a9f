"""Serving as a real process (`streamrec serve` under uvicorn) with the real Kafka broker:
recommendations come back, their impressions land on the impressions topic with the served
propensities and versions, and 20 model plus 5 policy versions (one corrupt) are hot-swapped
under a concurrent load without one failed request."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch

from learner.model import load_model, publish_model
from policies.export import greedy_policy, publish_policy
from policies.synthetic_world import SyntheticWorld, WorldConfig
from serving.hot_swap import version_number
from serving.synthetic import build_synthetic_serving
from streaming.events import Click, Impression
from streaming.kafka_io import EventConsumer, EventProducer
from streaming.local_broker import free_port
from tests.waiting import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    warnings.simplefilter("ignore")
    world = SyntheticWorld(WorldConfig(seed=5, n_users=40, n_items=60))
    return build_synthetic_serving(tmp_path_factory.mktemp("live"), world, n_requests=300)


@pytest.fixture(scope="module")
def module_kafka(kafka_bootstrap):
    """Fresh topics for this module's server (the `kafka` fixture is per test)."""
    import uuid

    from streaming.config import KafkaSettings
    from streaming.kafka_io import ensure_topics

    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=3,
                             group_id=f"g{uuid.uuid4().hex[:10]}", bootstrap_timeout_ms=15_000, linger_ms=2)
    ensure_topics(settings)
    return settings


@pytest.fixture(scope="module")
def server(setup, module_kafka, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server-log") / "serve.log"
    env = {
        **os.environ,
        "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": module_kafka.bootstrap_servers,
        "STREAMREC_KAFKA__TOPIC_PREFIX": module_kafka.topic_prefix,
        "STREAMREC_KAFKA__LINGER_MS": "2",
        "STREAMREC_FEATURE_STORE__DATA_DIR": str(setup.feature_store.data_dir),
        "STREAMREC_SERVING__REGISTRY_DIR": str(setup.registry.root),
        "STREAMREC_SERVING__CANDIDATES": "20",
        "STREAMREC_SERVING__REGISTRY_POLL_S": "3",
        "STREAMREC_LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "streamrec", "serve", "--port", str(port)], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready():
        assert process.poll() is None, f"the server exited:\n{log_path.read_text()[-3000:]}"
        try:
            return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 90, "the server to be ready", interval_s=0.2)
        yield base, log_path
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_impressions(kafka, n: int, timeout_s: float = 60) -> list[Impression]:
    seen: list[Impression] = []
    with EventConsumer(kafka, ["impressions"], group_id=f"{kafka.group_id}-check") as consumer:
        deadline = time.monotonic() + timeout_s
        while len(seen) < n:
            assert time.monotonic() < deadline, f"only {len(seen)} of {n} impressions arrived"
            seen += [r.event for r in consumer.poll(timeout_ms=500)]
    return seen


def test_recommendations_are_served_and_their_impressions_reach_kafka(server, setup, module_kafka):
    base, _ = server
    history_users = sorted({e.user_id for e in setup.events if isinstance(e, Click)})[:6]
    requests = ([{"user_id": u, "k": 4, "context": {"device": "web"}} for u in history_users]
                + [{"user_id": f"visitor-{n}", "k": 3} for n in range(3)]
                + [{"user_id": "u0001", "k": 2, "item_ids": ["i0003", "i0004", "i0005"], "request_id": "given-id-1"}])
    with httpx.Client(base_url=base, timeout=10) as client:
        responses = [client.post("/recommend", json=body) for body in requests]
    assert [r.status_code for r in responses] == [200] * len(requests)
    bodies = [r.json() for r in responses]
    assert {b["candidate_source"] for b in bodies} == {"retrieval", "popularity", "request"}

    expected = {(b["request_id"], i["item_id"]): (b, i) for b in bodies for i in b["items"]}
    impressions = read_impressions(module_kafka, len(expected))
    assert len(impressions) == len(expected)
    for impression in impressions:
        body, item = expected[(impression.request_id, impression.item_id)]
        assert impression.user_id == body["user_id"]
        assert impression.position == item["position"]
        assert impression.slate_size == len(body["items"])
        assert impression.propensity == pytest.approx(item["propensity"], rel=1e-9)
        assert (impression.model_version, impression.policy_version) == (body["model_version"], body["policy_version"])
        assert "item_impressions_24h" in impression.features  # the Feast values it was scored with
        if body["candidate_source"] == "retrieval":
            assert impression.context == {"device": "web"}
            assert impression.features.get("user_clicks_24h", 0) >= 1


def test_hot_swap_under_load_loses_no_request_and_never_serves_a_corrupt_version(server, setup, module_kafka):
    base, log_path = server
    torch.manual_seed(0)
    model = load_model(setup.registry.load("model"))
    published = {"model": {setup.published.model.version: 0.0}, "policy": {setup.published.policy.version: 0.0}}
    corrupt: set[str] = set()
    results: list[tuple[float, int, str | None, str | None]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=base, timeout=15) as client:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"user_id": f"u{(worker * 7 + n) % 40:04d}", "k": 5}
                try:
                    response = client.post("/recommend", json=body)
                    payload = response.json() if response.status_code == 200 else {}
                    results.append((time.time(), response.status_code, payload.get("model_version"),
                                    payload.get("policy_version")))
                except httpx.HTTPError as exc:
                    results.append((time.time(), -1, repr(exc), None))

    def serving(kind: str) -> str:
        return httpx.get(f"{base}/versions", timeout=5).json()[f"{kind}_version"]

    workers = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(3)]
    for w in workers:
        w.start()
    try:
        with EventProducer(module_kafka) as producer:
            plan = ["model"] * 20 + ["policy"] * 5
            plan = [plan[i] for i in (0, 1, 20, 2, 3, 4, 5, 21, 6, 7, 8, 9, 22, 10, 11, 12, 13, 23, 14, 15, 16, 17, 24, 18, 19)]
            for step, kind in enumerate(plan):
                if kind == "model":
                    with torch.no_grad():
                        model.towers[0][-1].bias.add_(0.01)  # a different model each time
                    artifact = publish_model(setup.registry, model, metrics={"step": step}, parent=None)
                else:
                    policy = greedy_policy(exploration={"kind": "softmax", "temperature": 0.02 + 0.01 * step})
                    artifact = publish_policy(setup.registry, policy, metrics={"step": step})
                bad = step == 9  # the 10th version: its weights are damaged after publishing
                if bad:
                    weights = artifact.path / "weights.safetensors"
                    data = bytearray(weights.read_bytes())
                    data[len(data) // 2] ^= 0xFF
                    weights.write_bytes(bytes(data))
                    corrupt.add(artifact.version)
                else:
                    published[kind][artifact.version] = time.time()
                producer.send(setup.registry.announcement(artifact))
                producer.flush()
                if bad:
                    wait_for(lambda: any(r["version"] == artifact.version for r in
                                         httpx.get(f"{base}/versions", timeout=5).json()["refused"]),
                             30, f"the corrupt {kind} {artifact.version} to be refused")
                else:
                    wait_for(lambda: serving(kind) == artifact.version, 30, f"{kind} {artifact.version} to serve")
        time.sleep(0.3)  # a few more requests on the final versions
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)

    assert len(corrupt) == 1 and corrupt.isdisjoint(published["model"])
    failures = [r for r in results if r[1] != 200]
    assert not failures, f"{len(failures)} of {len(results)} requests failed, first: {failures[:3]}"
    assert len(results) > 50
    served_models = {r[2] for r in results}
    assert served_models <= set(published["model"]), served_models - set(published["model"])
    assert not served_models & corrupt
    assert len(served_models) >= 5, "requests saw the versions change"
    for received, _, model_version, policy_version in results:
        # a version is only ever served after it was published and announced
        assert published["model"][model_version] <= received
        assert published["policy"][policy_version] <= received
    versions = httpx.get(f"{base}/versions", timeout=5).json()
    assert versions["model_version"] == max(published["model"], key=version_number)
    assert versions["policy_version"] == max(published["policy"], key=version_number)
    assert "checksum mismatch" in versions["refused"][0]["reason"]
    metrics = httpx.get(f"{base}/metrics", timeout=5).text
    assert 'streamrec_serving_swaps_total{kind="model"} 20.0' in metrics  # v1 at start-up + 19 valid new ones
    assert 'streamrec_serving_refused_versions_total{kind="model"} 1.0' in metrics
