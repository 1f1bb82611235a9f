"""`streamrec serve --ray`: the same FastAPI app as Ray Serve replicas on a local Ray (num_cpus=2).

The deployment answers a request exactly as the in-process app does, and a newly published
model version reaches every replica (each runs its own registry poller and update listener).
"""

from __future__ import annotations

import time
import warnings

import httpx
import pytest

from feature_store.store import StreamingFeatureStore
from learner.model import load_model, publish_model
from policies.synthetic_world import SyntheticWorld, WorldConfig
from serving.service import RecommendationService, RecommendRequest
from serving.synthetic import build_synthetic_serving
from streaming.local_broker import free_port
from streamrec.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

try:
    from ray import serve  # noqa: F401
except ImportError as exc:  # ray[rllib] does not bring Ray Serve's own dependencies (grpcio, ...)
    pytest.skip(f"Ray Serve cannot be imported ({exc}); the project needs the ray[serve] extra", allow_module_level=True)


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.2)
    return value


def test_ray_serve_replicas_answer_like_the_app_and_all_take_new_versions(tmp_path):
    import ray
    from ray import serve

    from serving.server import run_ray_serve

    warnings.simplefilter("ignore")
    setup = build_synthetic_serving(tmp_path, SyntheticWorld(WorldConfig(seed=4, n_users=30, n_items=50)), n_requests=200)
    port = free_port()
    settings = Settings(data_dir=tmp_path, feature_store=setup.feature_store,
                        serving={"registry_dir": str(setup.registry.root), "port": port, "candidates": 15,
                                 "log_impressions": False, "listen_for_updates": False, "registry_poll_s": 1.0,
                                 "replicas": 2, "replica_num_cpus": 0.5})
    request = {"user_id": "u0003", "k": 4, "request_id": "same-request", "context": {"device": "ios"}}
    local = RecommendationService(settings.serving, registry=setup.registry,
                                  store=StreamingFeatureStore(setup.feature_store)).start()
    try:
        expected = local.recommend(RecommendRequest(**request)).model_dump()
    finally:
        local.stop()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_ray_serve(settings, blocking=False)
        base = f"http://127.0.0.1:{port}"
        response = httpx.post(f"{base}/recommend", json=request, timeout=60)
        assert response.status_code == 200, response.text
        got = response.json()
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in expected["items"]]
        for a, b in zip(got["items"], expected["items"]):
            assert a["propensity"] == pytest.approx(b["propensity"], rel=1e-5)
            assert a["pctcvr"] == pytest.approx(b["pctcvr"], rel=1e-5)
        assert got["model_version"] == expected["model_version"] == "v000001"

        def replicas_on(version: str) -> set[int]:
            answers = [httpx.get(f"{base}/versions", timeout=30).json() for _ in range(16)]
            return {a["process_id"] for a in answers} if all(a["model_version"] == version for a in answers) else set()

        assert len(wait_for(lambda: {httpx.get(f"{base}/versions", timeout=30).json()["process_id"] for _ in range(16)},
                            30, "two replicas")) == 2
        new = publish_model(setup.registry, load_model(setup.registry.load("model")), metrics={}, parent="v000001")
        assert len(wait_for(lambda: replicas_on(new.version), 60, f"both replicas to serve {new.version}")) == 2
    finally:
        serve.shutdown()
        ray.shutdown()
