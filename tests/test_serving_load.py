"""Admission control under a flood: a real uvicorn server over the real service (tiny model, softmax
policy, Feast SQLite) gets far more concurrent requests than ``serving.max_inflight``. The excess
is refused at once with 503 and Retry-After (never a 500, never an unbounded queue), every
admitted request is answered correctly, /metrics counts exactly the refusals, and the server
serves normally right after. The rate it sustains is measured by ``benchmarks/load.py``."""

from __future__ import annotations

import asyncio
import threading
import warnings

import httpx
import pytest
import uvicorn

from feature_store.store import StreamingFeatureStore
from policies.synthetic_world import SyntheticWorld, WorldConfig
from serving.app import create_app
from serving.config import ServingSettings
from serving.service import RecommendationService
from serving.synthetic import build_synthetic_serving
from streaming.local_broker import free_port

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
MAX_INFLIGHT, FLOOD, K = 3, 60, 5


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    warnings.simplefilter("ignore")
    world = SyntheticWorld(WorldConfig(seed=11, n_users=40, n_items=120))
    return build_synthetic_serving(tmp_path_factory.mktemp("load"), world, n_requests=200)


@pytest.fixture(scope="module")
def server(shop):
    settings = ServingSettings(candidates=100, seed=0, max_inflight=MAX_INFLIGHT, retry_after_s=2)
    service = RecommendationService(settings, registry=shop.registry, store=StreamingFeatureStore(shop.feature_store)).start()
    port = free_port()
    uvi = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning",
                                        access_log=False))
    thread = threading.Thread(target=uvi.run, daemon=True)
    thread.start()
    try:
        deadline = 60.0
        while not uvi.started:
            assert thread.is_alive(), "uvicorn exited"
            deadline -= 0.05
            assert deadline > 0, "uvicorn did not start in 60 s"
            threading.Event().wait(0.05)
        yield f"http://127.0.0.1:{port}", service
    finally:
        uvi.should_exit = True
        thread.join(timeout=20)
        service.stop()


async def flood(base: str, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post("/recommend", json=body) for body in bodies))


def shed_total(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("streamrec_serving_shed_total "):
            return float(line.split()[1])
    raise AssertionError("streamrec_serving_shed_total is not in /metrics")


def test_a_flood_beyond_max_inflight_is_shed_with_retry_after_and_the_rest_served_correctly(server, shop):
    base, service = server
    catalog = set(shop.world.item_ids)
    assert shed_total(base) == 0
    bodies = [{"user_id": f"u{n % 40:04d}", "k": K, "request_id": f"flood-{n}"} for n in range(FLOOD)]
    responses = asyncio.run(flood(base, bodies))

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, f"unexpected statuses: {sorted(set(statuses))}"
    shed = [r for r in responses if r.status_code == 503]
    served = [(body, r) for body, r in zip(bodies, responses) if r.status_code == 200]
    assert shed, f"{FLOOD} concurrent requests against max_inflight={MAX_INFLIGHT}: some must be refused"
    assert served, "the admitted requests are served"
    for r in shed:
        assert r.headers["Retry-After"] == "2"
        assert "max_inflight" in r.json()["error"]
    for body, r in served:
        answer = r.json()
        assert answer["request_id"] == body["request_id"] and answer["user_id"] == body["user_id"]
        items = [item["item_id"] for item in answer["items"]]
        assert len(items) == K == len(set(items)) and set(items) <= catalog
        assert [item["position"] for item in answer["items"]] == list(range(K))
        assert all(0 < item["propensity"] <= 1 for item in answer["items"])
        assert answer["model_version"] == shop.published.model.version

    assert shed_total(base) == len(shed), "/metrics counts every refusal, and only refusals"
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert "streamrec_serving_inflight 0.0" in metrics, "nothing is left in hand after the flood"
    assert f'streamrec_serving_requests_total{{endpoint="/recommend",status="503"}} {float(len(shed))}' in metrics

    # right after the flood a normal request is served, and a refused one retried gets a full slate
    body, answered = served[0]
    again = httpx.post(f"{base}/recommend", json=body, timeout=10)
    assert again.status_code == 200, again.text
    assert [i["item_id"] for i in again.json()["items"]] == [i["item_id"] for i in answered.json()["items"]]
    refused = bodies[statuses.index(503)]
    retried = httpx.post(f"{base}/recommend", json=refused, timeout=10)
    assert retried.status_code == 200 and len(retried.json()["items"]) == K


def test_as_many_clients_as_max_inflight_asking_back_to_back_are_never_refused(server):
    base, _ = server

    async def client_loop(client: httpx.AsyncClient, worker: int) -> list[int]:
        return [(await client.post("/recommend", json={"user_id": f"u{worker:04d}", "k": K})).status_code
                for _ in range(10)]

    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            return await asyncio.gather(*(client_loop(client, w) for w in range(MAX_INFLIGHT)))

    before = shed_total(base)
    statuses = [s for loop in asyncio.run(run()) for s in loop]
    assert statuses == [200] * (10 * MAX_INFLIGHT), "a slot is free again by the time its client has the answer"
    assert shed_total(base) == before
