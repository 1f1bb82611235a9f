"""The recommendation API in-process (FastAPI TestClient) over a real tiny model and policy from the
registry and a real Feast SQLite store filled from the synthetic world's traffic: normal, cold-start
and invalid requests, the API key, readiness and metrics."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from feature_store.store import StreamingFeatureStore
from learner.registry import ModelRegistry
from policies.synthetic_world import SyntheticWorld, WorldConfig
from serving.app import create_app
from serving.config import ServingSettings
from serving.service import RecommendationService
from serving.synthetic import SOFTMAX_EXPLORATION, build_synthetic_serving
from streaming.events import Click
from streaming.features import FeatureUpdate

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

T0 = 1_767_225_600_000
N_CANDIDATES = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    warnings.simplefilter("ignore")
    world = SyntheticWorld(WorldConfig(seed=3, n_users=40, n_items=80))
    return build_synthetic_serving(tmp_path_factory.mktemp("serving"), world, n_requests=400)


def start_service(setup, **overrides) -> RecommendationService:
    settings = ServingSettings(candidates=N_CANDIDATES, seed=0, **overrides)
    return RecommendationService(settings, registry=setup.registry, store=StreamingFeatureStore(setup.feature_store)).start()


@pytest.fixture(scope="module")
def service(setup):
    service = start_service(setup)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as client:
        yield client


def users_with_history(setup) -> list[str]:
    return sorted({e.user_id for e in setup.events if isinstance(e, Click)})


def plackett_luce(values: np.ndarray, slate: list[int], temperature: float) -> list[float]:
    """Propensity of each slot of ``slate`` under softmax(values / T) without replacement."""
    remaining = list(range(len(values)))
    out = []
    for chosen in slate:
        logits = values[remaining] / temperature
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out.append(float(p[remaining.index(chosen)]))
        remaining.remove(chosen)
    return out


def test_a_known_user_gets_a_slate_retrieved_from_their_history(client, setup):
    user = users_with_history(setup)[0]
    response = client.post("/recommend", json={"user_id": user, "k": 5, "context": {"device": "ios"}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == setup.published.model.version
    assert body["policy_version"] == setup.published.policy.version
    assert body["candidate_source"] == "retrieval" and body["cold_start"] is False
    assert body["candidates"] == N_CANDIDATES
    items = body["items"]
    assert [i["position"] for i in items] == [0, 1, 2, 3, 4]
    assert len({i["item_id"] for i in items}) == 5
    assert set(i["item_id"] for i in items) <= set(setup.world.item_ids)
    for item in items:
        assert 0 < item["propensity"] <= 1
        assert 0 <= item["pctr"] <= 1 and 0 <= item["pcvr"] <= 1
        assert math.isclose(item["pctcvr"], item["pctr"] * item["pcvr"], rel_tol=1e-5)
    assert len(body["request_id"]) >= 16


def test_retrieval_returns_the_exact_nearest_items_to_the_user_vector(service, setup):
    user = users_with_history(setup)[1]
    bundle = service.swapper.current
    features = service.reader.user(user)
    assert features.recent_items, "the fixture user has clicked items"
    query = bundle.model.user_vector(user, features.recent_items, features.user)
    vectors = bundle.model.item_vectors(bundle.index.item_ids)
    cosine = vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    expected = [bundle.index.item_ids[i] for i in np.argsort(-cosine, kind="stable")[:N_CANDIDATES]]
    candidates, _, source = service._retrieve(bundle, user, {})
    assert source == "retrieval" and candidates == expected


def test_propensities_are_the_policys_plackett_luce_probabilities(client, setup):
    candidates = setup.world.item_ids[:6]
    body = client.post("/recommend", json={"user_id": "u0001", "k": 6, "item_ids": candidates}).json()
    assert body["candidate_source"] == "request" and body["candidates"] == 6
    slate = [candidates.index(i["item_id"]) for i in body["items"]]
    by_id = {i["item_id"]: i["pctcvr"] for i in body["items"]}
    values = np.array([by_id[c] for c in candidates])
    expected = plackett_luce(values, slate, SOFTMAX_EXPLORATION["temperature"])
    assert [i["propensity"] for i in body["items"]] == pytest.approx(expected, rel=1e-4)
    assert body["items"][-1]["propensity"] == pytest.approx(1.0)  # the last remaining item is certain


def test_a_request_id_makes_the_slate_reproducible(client):
    request = {"user_id": "u0002", "k": 4, "request_id": "retry-me-1"}
    first, second = (client.post("/recommend", json=request).json() for _ in range(2))
    assert first["request_id"] == "retry-me-1"
    assert [i["item_id"] for i in first["items"]] == [i["item_id"] for i in second["items"]]
    slates = {tuple(i["item_id"] for i in client.post("/recommend", json={**request, "request_id": f"r-{n}"}).json()["items"])
              for n in range(8)}
    assert len(slates) > 1, "exploration varies the slate across requests"


def test_an_unknown_user_gets_the_most_popular_items(client, setup, service):
    body = client.post("/recommend", json={"user_id": "never-seen", "k": 5}).json()
    assert body["cold_start"] is True and body["candidate_source"] == "popularity"
    with StreamingFeatureStore(setup.feature_store) as store:
        stats = store.online_features(item_ids=setup.world.item_ids, views=["item_stats"])["item"]
    popularity = {i: p or 0.0 for i, p in zip(stats["item_id"], stats["item_popularity_24h"])}
    top = sorted(popularity, key=lambda i: (-popularity[i], i))[:N_CANDIDATES]
    assert {i["item_id"] for i in body["items"]} <= set(top)
    assert max(popularity.values()) > 0


def test_cold_start_context_narrows_the_slate_to_a_category(client, setup):
    world = setup.world
    category = world.topics[int(np.bincount(world.item_topic).argmax())].name  # the largest category
    in_category = {i for i, t in zip(world.item_ids, world.item_topic) if world.topics[t].name == category}
    assert len(in_category) >= N_CANDIDATES
    body = client.post("/recommend", json={"user_id": "new-visitor", "k": 5, "context": {"category": category}}).json()
    assert body["cold_start"] is True
    assert {i["item_id"] for i in body["items"]} <= in_category
    other = client.post("/recommend", json={"user_id": "new-visitor", "k": 5, "context": {"category": "no such"}})
    assert other.status_code == 200 and len(other.json()["items"]) == 5  # an unknown category is plain popularity


def test_an_item_only_the_catalog_knows_is_scored_from_its_text(client, setup, service):
    with StreamingFeatureStore(setup.feature_store) as store:
        store.push([FeatureUpdate("item_catalog", "brand-new-grinder", T0, {
            "title": "Summit coffee grinder Pro", "description": "Burr grinder for espresso.", "category": "espresso",
            "price": 89.0})])
    model = service.swapper.current.model
    assert not model.known_item("brand-new-grinder")
    response = client.post("/recommend", json={"user_id": "u0003", "k": 3,
                                               "item_ids": ["brand-new-grinder", "i0001", "i0002"]})
    assert response.status_code == 200, response.text
    assert "brand-new-grinder" in {i["item_id"] for i in response.json()["items"]}
    assert model.known_item("brand-new-grinder")


def test_an_item_nobody_knows_is_rejected_with_its_id(client):
    response = client.post("/recommend", json={"user_id": "u0003", "item_ids": ["i0001", "ghost-item"]})
    assert response.status_code == 422
    assert "ghost-item" in response.json()["error"] and "items topic" in response.json()["error"]


def test_fewer_candidates_than_k_gives_a_shorter_slate(client):
    body = client.post("/recommend", json={"user_id": "u0004", "k": 10, "item_ids": ["i0005", "i0006"]}).json()
    assert [i["position"] for i in body["items"]] == [0, 1]


@pytest.mark.parametrize("body, fragment", [
    ({}, "user_id: Field required"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": " padded "}, "user_id"),
    ({"user_id": "u1", "k": 0}, "k: Input should be greater than or equal to 1"),
    ({"user_id": "u1", "k": 101}, "max_k=100"),
    ({"user_id": "u1", "k": "10"}, "k: Input should be a valid integer"),
    ({"user_id": "u1", "k": 2.5}, "k: Input should be a valid integer"),
    ({"user_id": "u1", "item_ids": []}, "item_ids"),
    ({"user_id": "u1", "item_ids": ["i0001", "i0001"]}, "repeated: i0001"),
    ({"user_id": "u1", "item_ids": "i0001"}, "item_ids: Input should be a valid list"),
    ({"user_id": "u1", "context": {"nested": {"a": 1}}}, "context.nested"),
    ({"user_id": "u1", "surprise": 1}, "surprise: Extra inputs are not permitted"),
    ([], "body: must be a JSON object"),
])
def test_invalid_requests_get_a_4xx_that_says_what_is_wrong(client, body, fragment):
    response = client.post("/recommend", json=body)
    assert response.status_code == 422, response.text
    message = response.json()["error"] + " " + " ".join(response.json().get("details", []))
    assert fragment in message


def test_malformed_bodies_are_4xx(client):
    for content, headers in [(b"{not json", {"content-type": "application/json"}),
                             (b'{"user_id": "u1", "k": NaN}', {"content-type": "application/json"}),
                             (b"user_id=u1", {"content-type": "application/x-www-form-urlencoded"}),
                             (b"\xff\xfe", {"content-type": "application/json"}),
                             (b"", {})]:
        response = client.post("/recommend", content=content, headers=headers)
        assert 400 <= response.status_code < 500, (content, response.status_code, response.text)
        assert "error" in response.json()
    assert client.get("/recommend").status_code == 405
    assert client.get("/nowhere").status_code == 404


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
request_like = st.fixed_dictionaries({}, optional={
    "user_id": json_values | st.text(min_size=1, max_size=300),
    "k": json_values | st.integers(-5, 200),
    "item_ids": json_values | st.lists(st.sampled_from(["i0001", "i0002", "i0003", "zzz", ""]), max_size=6),
    "context": json_values | st.dictionaries(st.text(max_size=70), json_values, max_size=5),
    "request_id": json_values,
})


@hypothesis_settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                              HealthCheck.too_slow])
@given(body=request_like | json_values)
def test_no_client_input_causes_a_server_error(client, body):
    response = client.post("/recommend", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code == 200:
        items = response.json()["items"]
        assert all(0 < i["propensity"] <= 1 for i in items)
    else:
        assert response.json()["error"]


def test_health_readiness_versions_and_metrics(client, setup):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == setup.published.model.version
    versions = client.get("/versions").json()
    assert versions["model_version"] == setup.published.model.version
    assert versions["catalog_items"] == len(setup.world.item_ids)
    client.post("/recommend", json={"user_id": "u0001", "k": 2})
    client.post("/recommend", json={"user_id": "u0001", "k": 0})
    text = client.get("/metrics").text
    assert 'streamrec_serving_request_seconds_count{endpoint="/recommend"}' in text
    assert 'streamrec_serving_errors_total{endpoint="/recommend",kind="client"}' in text
    assert f'streamrec_serving_version_info{{kind="model",version="{setup.published.model.version}"}} 1.0' in text
    assert 'streamrec_serving_swaps_total{kind="policy"} 1.0' in text


def test_an_api_key_guards_recommendations(setup):
    service = start_service(setup, api_key="open-sesame")
    try:
        with TestClient(create_app(service)) as client:
            denied = client.post("/recommend", json={"user_id": "u1"})
            assert denied.status_code == 401 and "X-API-Key" in denied.json()["error"]
            assert client.post("/recommend", json={"user_id": "u1"}, headers={"X-API-Key": "wrong"}).status_code == 401
            assert client.get("/versions").status_code == 401
            allowed = client.post("/recommend", json={"user_id": "u1"}, headers={"X-API-Key": "open-sesame"})
            assert allowed.status_code == 200
            assert client.get("/healthz").status_code == 200  # probes need no key
    finally:
        service.stop()


def test_an_empty_registry_is_not_ready_and_says_why(setup, tmp_path):
    service = RecommendationService(ServingSettings(), registry=ModelRegistry(tmp_path / "empty"),
                                    store=StreamingFeatureStore(setup.feature_store)).start()
    try:
        with TestClient(create_app(service)) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "no model loaded" in ready.json()["reasons"][0]
            response = client.post("/recommend", json={"user_id": "u1"})
            assert response.status_code == 503 and "no model loaded" in response.json()["error"]
            assert client.get("/healthz").status_code == 200
    finally:
        service.stop()
