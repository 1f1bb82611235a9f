"""``streamrec demo --kafka BOOTSTRAP``: the closed loop over a real broker, every part its own process.

The live stack (:class:`streamrec.live_stack.LiveStack`: ``streamrec stream worker``,
``streamrec learn`` and ``streamrec serve`` as subprocesses) runs on the given cluster under
topic names of its own. The synthetic world's users call serving's HTTP API; serving logs the
slates it showed to ``impressions``; the users' clicks and purchases (by the world's ground truth)
are produced to ``clicks`` and ``purchases`` a few seconds later; the worker joins them (streaming
label mode) into ``examples`` and Feast features; the learner publishes a version every few
seconds and announces it on ``model-updates``; serving swaps it in. The driver here only plays the
users: it never touches a model, a table or a feature.

Time is the wall clock, so a run takes as long as its traffic (``requests / rate`` seconds plus
start-up). The re-ranking policy stays the baseline one here: training one is ``streamrec policy
train`` against the same registry (the in-process demo shows the gate at work).
"""

from __future__ import annotations

import heapq
import itertools
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from streaming.config import KafkaSettings
from streaming.events import Click, Event, Purchase

CLICK_DELAY_S = (0.5, 3.0)     # a click comes this long after its slate was served
PURCHASE_DELAY_S = (1.0, 5.0)  # a purchase this long after its click


@dataclass
class LiveDemoConfig:
    requests: int = 600
    seed: int = 0
    rate: float = 8.0               # requests per second the users send
    n_users: int = 300
    n_items: int = 200
    slate_size: int = 5
    model: str = "tiny"
    device: str = "cpu"
    publish_every_s: float = 5.0    # the learner's publish interval (its default, 300 s, suits production)
    settle_timeout_s: float = 180.0  # after the traffic: how long to wait for a version that learned it


def live_overrides(config: LiveDemoConfig) -> dict[str, Any]:
    from streamrec.closed_loop import model_config

    return {
        "joiner": {"label_mode": "streaming"},
        "stream": {"sweep_interval_s": 0.5},
        "learner": {
            "model": model_config(config.model).model_dump(mode="json"), "device": config.device,
            "publish_every_s": config.publish_every_s, "publish_min_examples": 50,
            "label_delay_ms": 5_000, "quality_gate_margin": 1.0,  # labels land within seconds here
        },
        "serving": {"log_impressions": True, "default_k": config.slate_size, "seed": config.seed},
    }


def run_live_demo(kafka: KafkaSettings, config: LiveDemoConfig, workdir: Path,
                  progress: Callable[[int, int], None] | None = None,
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the users against the live stack; return the summary (see :func:`summarise`)."""
    import httpx

    from policies.synthetic_world import SyntheticWorld, WorldConfig
    from streaming.kafka_io import EventProducer
    from streamrec.closed_loop import model_config
    from streamrec.live_stack import LiveStack

    progress = progress or (lambda done, total: None)
    kafka = kafka.model_copy(update={"topic_prefix": f"{kafka.topic_prefix}demo-{uuid.uuid4().hex[:8]}."})
    world = SyntheticWorld(WorldConfig(seed=config.seed, n_users=config.n_users, n_items=config.n_items,
                                       slate_size=config.slate_size, start_time_ms=int(time.time() * 1000)))
    rng = np.random.default_rng([config.seed, 11])
    stack = LiveStack(kafka, workdir, live_overrides(config))
    say(f"live stack on {kafka.bootstrap_servers} (topics {kafka.topic_prefix}*), logs under {workdir}")
    stack.prepare(world, model_config(config.model))
    started = time.monotonic()
    pending: list[tuple[float, int, Event]] = []  # (due, sequence, event): clicks and purchases to come
    sequence = itertools.count()
    served: list[dict[str, Any]] = []
    failures = 0
    try:
        stack.start(ready_timeout_s=300)
        say(f"worker, learner and serving up in {time.monotonic() - started:.0f}s; "
            f"{config.requests:,} requests at {config.rate:g}/s")
        with EventProducer(kafka) as producer, httpx.Client(base_url=stack.base_url, timeout=30) as client:
            for item in world.item_events():
                producer.send(item)
            users = rng.choice(world.config.n_users, size=config.requests, p=world.user_activity)
            begin = time.monotonic()
            for r, user in enumerate(users):
                _send_due(producer, pending)
                wait = begin + r / config.rate - time.monotonic()
                if wait > 0:  # the users' pace, not a wait for a condition
                    time.sleep(wait)
                response = client.post("/recommend", json={"user_id": world.user_ids[int(user)],
                                                           "k": config.slate_size})
                if response.status_code != 200:
                    failures += 1
                    continue
                body = response.json()
                served.append(_respond(world, int(user), body, rng, pending, sequence))
                if (r + 1) % 20 == 0 or r + 1 == config.requests:
                    progress(r + 1, config.requests)
            while pending:  # the last clicks and purchases, at their times
                _send_due(producer, pending)
                if pending:
                    time.sleep(max(0.0, min(0.2, pending[0][0] - time.monotonic())))
            producer.flush(60)
            impressions = sum(len(s["items"]) for s in served)
            # done when serving answers with a version that learned (nearly) every impression shown
            stack.wait(lambda: _learned_by_serving(stack, client) >= 0.9 * impressions,
                       "serving a version that learned the traffic", config.settle_timeout_s, interval_s=0.5)
            versions = client.get("/versions").json()
        errors = stack.errors()
    finally:
        exit_codes = stack.stop()
    return summarise(served, failures, versions, errors, exit_codes, time.monotonic() - started)


def _send_due(producer, pending: list) -> None:
    now = time.monotonic()
    while pending and pending[0][0] <= now:
        producer.send(heapq.heappop(pending)[2])


def _respond(world, user: int, body: dict, rng, pending: list, sequence) -> dict[str, Any]:
    """The user's answer to a served slate, by the world's ground truth; its events are scheduled."""
    items = [i["item_id"] for i in body["items"]]
    catalog = set(world.item_ids)
    known = [i for i in items if i in catalog]
    clicks = purchases = np.zeros(0, dtype=bool)
    if known:
        indices = world.item_indices(known)
        clicks, purchases = world.respond(user, indices, rng)
        now_s, now_ms = time.monotonic(), int(time.time() * 1000)
        for position, item in enumerate(known):
            if not clicks[position]:
                continue
            shared = dict(user_id=world.user_ids[user], item_id=item, request_id=body["request_id"])
            delay = rng.uniform(*CLICK_DELAY_S)
            heapq.heappush(pending, (now_s + delay, next(sequence),
                                     Click(event_time=now_ms + int(delay * 1000), **shared)))
            if purchases[position]:
                later = delay + rng.uniform(*PURCHASE_DELAY_S)
                price = float(world.item_price[indices[position]])
                heapq.heappush(pending, (now_s + later, next(sequence),
                                         Purchase(event_time=now_ms + int(later * 1000), revenue=price, **shared)))
    return {"items": items, "model_version": body["model_version"], "clicks": int(clicks.sum()),
            "purchases": int(purchases.sum())}


def _learned_by_serving(stack, client) -> int:
    """Examples learned by the model version serving answers with (0 for the baseline)."""
    version = client.get("/versions").json().get("model_version")
    try:
        return int(stack.lineage(version).get("examples", 0)) if version else 0
    except Exception:  # noqa: BLE001 - the baseline version has no lineage
        return 0


def summarise(served: list[dict], failures: int, versions: dict, errors: dict, exit_codes: dict,
              wall_s: float) -> dict[str, Any]:
    """What went round the loop.

    >>> s = summarise([{"items": ["a", "b"], "model_version": "v1", "clicks": 1, "purchases": 0}] * 4, 0,
    ...               {"model_version": "v3"}, {}, {"serving": 0}, 12.0)
    >>> s["impressions"], s["served CTR, first quarter"], s["model versions that served"]
    (8, 0.5, 1)
    """
    quarter = max(1, len(served) // 4)
    def ctr(part: list[dict]) -> float:
        shown = sum(len(s["items"]) for s in part)
        return sum(s["clicks"] for s in part) / shown if shown else float("nan")
    return {
        "requests served": len(served),
        "requests failed": failures,
        "impressions": sum(len(s["items"]) for s in served),
        "clicks": sum(s["clicks"] for s in served),
        "purchases": sum(s["purchases"] for s in served),
        "model versions that served": len({s["model_version"] for s in served}),
        "model version serving at the end": versions.get("model_version"),
        "served CTR, first quarter": ctr(served[:quarter]),
        "served CTR, last quarter": ctr(served[-quarter:]),
        "error lines in process logs": sum(len(lines) for lines in errors.values()),
        "processes that exited cleanly": sum(code == 0 for code in exit_codes.values()),
        "wall seconds": wall_s,
    }
