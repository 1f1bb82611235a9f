"""The whole loop live: a burst of purchases of a brand-new item lifts it in its cohort's recommendations.

Every part runs as the separate process production runs (``streamrec stream worker`` with the
joiner in ``streaming`` label mode, ``streamrec learn``, ``streamrec serve``) on the real broker.
A synthetic shop's history is replayed into Kafka and learned; then a new item is announced on
``items`` with its text, and once serving knows it, a cohort of users views, clicks and buys it
in a burst. The item must rise in the cohort's ranking, into the top-k of most of it, its predicted
pCTCVR at least doubled, within a bounded number of model versions published after the burst
(the learner publishes every 2 s here), and no process may log an error.
"""

from __future__ import annotations

import statistics
import time

import httpx
import pytest

from learner.config import tiny_model_config
from policies.synthetic_world import SyntheticWorld, WorldConfig
from streaming.events import Click, Impression, Item, Purchase
from streaming.kafka_io import EventProducer
from streaming.replay import replay_to_kafka
from streamrec.chaos import recent_start_ms
from streamrec.live_stack import Announcements, LiveStack

pytestmark = [pytest.mark.kafka, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]

WORLD = dict(seed=11, n_users=60, n_items=40, mean_request_gap_ms=15_000.0)
HISTORY_REQUESTS = 240
COHORT = 8
UNNOTICED = 40  # views of the new item by other users, without a click, before the burst
BURST_ROUNDS = 10  # views, clicks and purchases of the new item per cohort user
TOP_K = 5
MAX_VERSIONS = 3  # model versions published after the burst by which the item must have risen
NEW_ITEM = "new-0001"

# what differs from the defaults: a tiny model on the CPU, and publishing as often as anything is learned
OVERRIDES = {
    "joiner": {"label_mode": "streaming"},
    "stream": {"sweep_interval_s": 0.5},
    "learner": {
        "model": tiny_model_config().model_dump(mode="json"), "device": "cpu", "batch_size": 64,
        "publish_every_s": 2.0, "publish_min_examples": 1,
        "label_delay_ms": 60_000,  # so the prequential AUC (the publish gate) is defined after a short history
        "quality_gate_margin": 1.0,  # never gated: the test counts publish intervals
    },
    # these /recommend calls are measurements, not slates shown to users: their impressions stay out of the loop
    "serving": {"log_impressions": False, "torch_threads": 1},
}


def new_item(world: SyntheticWorld, topic: int, now_ms: int) -> Item:
    spec = world.topics[topic]
    return Item(event_time=now_ms, item_id=NEW_ITEM, title=f"Nova {spec.products[0]} Ultra",
                description=f"Brand new: {spec.products[0]} made for {spec.words[0]} and {spec.words[1]}.",
                category=spec.name, price=spec.median_price)


def burst(cohort: list[str], start_ms: int) -> list:
    """Each cohort user sees the new item at the top of a slate, clicks it and buys it, again and again."""
    events = []
    for r in range(BURST_ROUNDS):
        for u, user in enumerate(cohort):
            t = start_ms + (r * len(cohort) + u) * 1_000
            request = f"burst-{user}-{r}"
            shared = dict(user_id=user, item_id=NEW_ITEM, request_id=request)
            events += [
                Impression(event_time=t, position=0, slate_size=1, propensity=1.0, model_version=None,
                           policy_version=None, **shared),
                Click(event_time=t + 300, **shared),
                Purchase(event_time=t + 600, quantity=1, revenue=50.0, **shared),
            ]
    return events


def measure(client: httpx.Client, users: list[str], k: int) -> dict[str, tuple[str, int | None, float]]:
    """Per user: (model version, the new item's rank by pCTCVR among the served items or None, its pCTCVR)."""
    out = {}
    for user in users:
        response = client.post("/recommend", json={"user_id": user, "k": k})
        assert response.status_code == 200, response.text
        body = response.json()
        items = sorted(body["items"], key=lambda i: -i["pctcvr"])
        order = [i["item_id"] for i in items]
        rank = order.index(NEW_ITEM) if NEW_ITEM in order else None
        out[user] = (body["model_version"], rank, items[rank]["pctcvr"] if rank is not None else 0.0)
    return out


def in_top_k(measured: dict[str, tuple[str, int | None, float]]) -> float:
    return sum(rank is not None and rank < TOP_K for _, rank, _ in measured.values()) / len(measured)


def mean_pctcvr(measured: dict[str, tuple[str, int | None, float]]) -> float:
    return statistics.mean(p for _, _, p in measured.values())


def test_a_burst_of_purchases_lifts_a_new_item_in_its_cohorts_recommendations(kafka, tmp_path):
    started = time.monotonic()
    world = SyntheticWorld(WorldConfig(**WORLD, start_time_ms=recent_start_ms()))
    history = world.item_events() + world.generate_log(HISTORY_REQUESTS)
    impressions = sum(isinstance(e, Impression) for e in history)
    clickers = sorted({e.user_id for e in history if isinstance(e, Click)},
                      key=lambda u: -sum(isinstance(e, Click) and e.user_id == u for e in history))
    cohort = clickers[:COHORT]  # users with a click history: serving retrieves their candidates by user vector
    # the new item's topic is the one the cohort cares least about: its rise must come from the burst, not its text
    interest = world.user_interest[[world.user_index(u) for u in cohort]].sum(axis=0)
    topic = int(interest.argmin())

    stack = LiveStack(kafka, tmp_path, OVERRIDES)
    stack.prepare(world, tiny_model_config())
    announcements = Announcements(kafka)
    announcements.start()
    try:
        stack.start(ready_timeout_s=180)
        with EventProducer(kafka) as producer, httpx.Client(base_url=stack.base_url, timeout=30) as client:
            replay_to_kafka(history, producer, progress=False)

            def serving_lineage() -> dict:
                version = client.get("/versions").json()["model_version"]
                return stack.lineage(version) if version != "v000001" else {}  # v000001: the baseline

            stack.wait(lambda: serving_lineage().get("examples", 0) >= impressions,
                       "serving a version that learned the history", 180, interval_s=0.3)

            history_learned = time.monotonic()
            # the new item, shown to other users who pass it by: the learner publishes it, serving learns the catalog
            now_ms = int(time.time() * 1000)
            producer.send(new_item(world, topic, now_ms))
            others = [u for u in world.user_ids if u not in cohort]
            unnoticed = [Impression(event_time=now_ms + 100 * n, user_id=user, item_id=NEW_ITEM, request_id=f"cold-{n}",
                                    position=0, slate_size=1, propensity=1.0, model_version=None, policy_version=None)
                         for n, user in enumerate(others[:UNNOTICED])]
            for event in unnoticed:
                producer.send(event)
            producer.flush(30)
            catalog = world.config.n_items + 1
            stack.wait(lambda: client.get("/versions").json()["catalog_items"] == catalog
                       and serving_lineage().get("examples", 0) >= impressions + UNNOTICED,
                       "serving a version that knows the new item and learned its views", 60, interval_s=0.2)
            k = catalog  # the whole catalog: the new item's rank among every candidate
            before = measure(client, cohort, k)
            assert all(rank is not None for _, rank, _ in before.values()), f"retrieval misses the new item: {before}"
            # where a cold item starts depends on how the tiny random text tower placed it and on what the
            # learner had published by then; it must not already lead every cohort user's slate
            assert statistics.median(r for _, r, _ in before.values()) > 0, f"the new item leads before the burst: {before}"
            learned_before = stack.lineage(max(v for v, _, _ in before.values()))["examples"]

            burst_at = time.time()
            events = burst(cohort, int(burst_at * 1000))
            for event in events:
                producer.send(event)
            producer.flush(30)

            trajectory = []

            def risen():
                measured = measure(client, cohort, k)
                trajectory.append((round(time.time() - burst_at, 1), max(v for v, _, _ in measured.values()),
                                   sorted(r for _, r, _ in measured.values()), round(mean_pctcvr(measured), 4)))
                lifted = (in_top_k(measured) >= max(0.75, in_top_k(before)) and mean_pctcvr(measured) >= 2 * mean_pctcvr(before)
                          and statistics.median(r for _, r, _ in measured.values())
                          < statistics.median(r for _, r, _ in before.values()))
                return measured if lifted else None

            after = stack.wait(risen, f"the new item in the top {TOP_K} of most of its cohort", 90, interval_s=0.2)
            rise_s = time.time() - burst_at

        serving_version = max(v for v, _, _ in after.values())
        since_burst = [a.update.version for a in announcements.models(since=burst_at)]
        learned = {v: stack.lineage(v)["examples"] - learned_before for v in since_burst}
        print(f"\nnew item rank before {sorted(r for _, r, _ in before.values())} (pCTCVR {mean_pctcvr(before):.4f}), "
              f"after {sorted(r for _, r, _ in after.values())} (pCTCVR {mean_pctcvr(after):.4f}) "
              f"on {serving_version}, "
              f"{rise_s:.1f}s after the burst; versions since the burst (burst examples learned): {learned}; "
              f"start-up and history {history_learned - started:.0f}s; test {time.monotonic() - started:.0f}s")
        print("\n".join(map(str, trajectory)))
        versions_to_rise = sum(v <= serving_version for v in since_burst)
        assert versions_to_rise <= MAX_VERSIONS, f"it took {versions_to_rise} model versions after the burst: {learned}"
        assert statistics.median(r for _, r, _ in after.values()) < statistics.median(r for _, r, _ in before.values())
        assert stack.errors() == {}, stack.errors()  # beyond streamrec.live_stack.BENIGN_ERROR_LINES
    finally:
        stack.stop()
        announcements.stop()
