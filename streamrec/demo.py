"""``streamrec demo``: the most complete job StreamRec runs on embedded defaults.

Today that is the event path: a synthetic shop's logged traffic is written as an event log,
read back, and replayed in event-time order in-process (or through a real Kafka cluster with
``--kafka``, read back by time range), with a summary that sets the logged click-through rate
against the oracle's. The learner, policy and serving steps of the closed loop join it as they land.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from rich.console import Console
from rich.table import Table

from policies.synthetic_world import SyntheticWorld, WorldConfig
from streaming.event_log import read_events, write_parquet
from streaming.events import Event, Impression
from streaming.kafka_io import EventProducer, ensure_topics
from streaming.replay import ReplayStats, read_kafka_range, replay_in_process, replay_to_kafka
from streamrec.settings import Settings


def run_demo(settings: Settings, n_events: int, seed: int, use_kafka: bool, console: Console) -> dict:
    world = SyntheticWorld(WorldConfig(seed=seed))
    n_requests = max(1, n_events // world.config.slate_size)
    console.print(f"synthetic shop: {world.config.n_users} users, {world.config.n_items} items, "
                  f"{n_requests:,} logged slates of {world.config.slate_size}")
    log = world.item_events() + world.generate_log(n_requests)
    out_dir = settings.data_dir / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "events.parquet"
    write_parquet(log_path, log)
    events = list(read_events(log_path))
    if events != log:
        raise RuntimeError(f"the event log {log_path} did not read back as written")

    if use_kafka:
        ensure_topics(settings.kafka)
        with EventProducer(settings.kafka) as producer:
            stats = replay_to_kafka(events, producer, speed=settings.replay.speed, progress=settings.replay.progress)
        first, last = events[0].event_time, max(e.event_time for e in events)
        replayed = read_kafka_range(settings.kafka, ["items", "impressions", "clicks", "purchases"], first, last + 1)
        missing = len(events) - len(replayed)
        console.print(f"read back {len(replayed):,} events from Kafka by time range ({missing:,} missing)")
        if missing:
            raise RuntimeError(f"{missing} events sent to Kafka did not come back in the time range")
    else:
        stats = ReplayStats()
        replayed = list(replay_in_process(events, settings.replay.speed, stats))

    summary = summarise(world, replayed, stats)
    _print(summary, stats, log_path, "Kafka" if use_kafka else "in-process", console)
    return summary


def summarise(world: SyntheticWorld, events: list[Event], stats: ReplayStats) -> dict:
    slates: dict[str, list[Impression]] = defaultdict(list)
    for event in events:
        if isinstance(event, Impression):
            slates[event.request_id].append(event)
    logged_clicks = stats.by_type["click"]
    impressions = stats.by_type["impression"]
    oracle_logged, oracle_best = [], []
    for request_id in sorted(slates)[:1000]:  # a sample keeps the oracle's best-slate search quick
        slate = sorted(slates[request_id], key=lambda i: i.position)
        user = slate[0].user_id
        items = [i.item_id for i in slate]
        oracle_logged.append(world.click_probability(user, items, [i.position for i in slate]).sum())
        best = world.best_slate(user, world.item_ids, k=len(items))
        oracle_best.append(world.click_probability(user, best, list(range(len(best)))).sum())
    slate_size = world.config.slate_size
    return {
        "events": stats.events,
        "impressions": impressions,
        "clicks": logged_clicks,
        "purchases": stats.by_type["purchase"],
        "logged_ctr": logged_clicks / max(impressions, 1),
        "oracle_ctr_of_logged_slates": float(np.mean(oracle_logged)) / slate_size if oracle_logged else 0.0,
        "oracle_ctr_of_best_slates": float(np.mean(oracle_best)) / slate_size if oracle_best else 0.0,
    }


def _print(summary: dict, stats: ReplayStats, log_path, sink: str, console: Console) -> None:
    table = Table(title=f"StreamRec demo: event path ({sink})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key in ("events", "impressions", "clicks", "purchases"):
        table.add_row(key, f"{summary[key]:,}")
    table.add_row("logged CTR (random policy)", f"{summary['logged_ctr']:.4f}")
    table.add_row("oracle CTR of the logged slates", f"{summary['oracle_ctr_of_logged_slates']:.4f}")
    table.add_row("oracle CTR of the best slates (headroom)", f"{summary['oracle_ctr_of_best_slates']:.4f}")
    table.add_row("replay throughput", f"{stats.events / max(stats.wall_seconds, 1e-9):,.0f} events/s")
    console.print(table)
    console.print(f"event log: {log_path}")
