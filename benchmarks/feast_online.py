"""Online read latency of StreamRec's feature store: Feast with SQLite against Feast with Redis.

Both stores hold the same pushed features (every user_activity, item_stats and item_catalog field
for ``--entities`` users and items). Each read is one ``StreamingFeatureStore.online_features``
call, timed end to end (Feast's request building, the store round trip, protobuf decoding);
the two stores alternate read by read so they share the machine's noise.

    python benchmarks/feast_online.py                       # starts its own redis-server
    python benchmarks/feast_online.py --reps 2000 --redis 127.0.0.1:6379 --json out.json

Workloads: 1 user and 100 users (the user_activity view), and a serving request, 1 user plus
100 candidate items (item_stats and item_catalog).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feature_store.config import FeatureStoreSettings  # noqa: E402
from feature_store.store import StreamingFeatureStore  # noqa: E402
from streaming.features import RECENT_ITEMS, VIEWS, FeatureUpdate  # noqa: E402
from tests.redis_server import LocalRedis  # noqa: E402

T0 = 1_767_225_600_000


def make_updates(n: int, seed: int = 7) -> list[FeatureUpdate]:
    rng = random.Random(seed)

    def value(kind: str, name: str):
        if kind == "int":
            return rng.randrange(10_000)
        if kind == "float":
            return rng.random()
        if kind == "str_list":
            return [f"i{rng.randrange(n):06d}" for _ in range(RECENT_ITEMS)]
        return f"{name} {rng.randrange(10**9)} " * (8 if name == "description" else 1)

    updates = []
    for i in range(n):
        for view, (entity, features) in VIEWS.items():
            key = f"u{i:06d}" if entity == "user" else f"i{i:06d}"
            updates.append(FeatureUpdate(view, key, T0 + i, {name: value(kind, name) for name, kind in features.items()}))
    return updates


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=1000, method="inclusive")[int(q * 1000) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=500, help="timed reads per workload and store")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--entities", type=int, default=5000, help="users and items pushed into each store")
    parser.add_argument("--redis", help="host:port of a running Redis (default: start a redis-server)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    server = None if args.redis else LocalRedis().start()
    connection = args.redis or server.connection_string
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    project = f"bench{uuid.uuid4().hex[:8]}"
    stores = {
        "sqlite": StreamingFeatureStore(FeatureStoreSettings(data_dir=workdir / "sqlite", project=project)),
        "redis": StreamingFeatureStore(FeatureStoreSettings(data_dir=workdir / "redis", project=project,
                                                            online_store="redis", redis_connection_string=connection)),
    }
    updates = make_updates(args.entities)
    for store in stores.values():
        store.apply()
        store.push(updates)

    rng = random.Random(11)
    users = [f"u{i:06d}" for i in range(args.entities)]
    items = [f"i{i:06d}" for i in range(args.entities)]
    workloads = {
        "1 user": lambda s: s.online_features(user_ids=rng.sample(users, 1)),
        "100 users": lambda s: s.online_features(user_ids=rng.sample(users, 100)),
        "1 user + 100 items": lambda s: s.online_features(user_ids=rng.sample(users, 1), item_ids=rng.sample(items, 100)),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"Feast online reads, {args.reps} per workload and store, {args.entities} users and items stored")
    print(f"{'workload':<20}{'store':<8}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for name, read in workloads.items():
        samples: dict[str, list[float]] = {s: [] for s in stores}
        for rep in range(args.warmup + args.reps):
            for store_name, store in stores.items():
                start = time.perf_counter()
                read(store)
                elapsed = (time.perf_counter() - start) * 1000
                if rep >= args.warmup:
                    samples[store_name].append(elapsed)
        results[name] = {}
        for store_name, values in samples.items():
            stats = {"p50_ms": percentile(values, 0.5), "p99_ms": percentile(values, 0.99),
                     "mean_ms": statistics.fmean(values)}
            results[name][store_name] = stats
            print(f"{name:<20}{store_name:<8}{stats['p50_ms']:>9.3f}{stats['p99_ms']:>9.3f}{stats['mean_ms']:>9.3f}")
        ratio = {q: results[name]["redis"][q] / results[name]["sqlite"][q] for q in ("p50_ms", "p99_ms")}
        results[name]["redis/sqlite"] = ratio
        print(f"{name:<20}{'ratio':<8}{ratio['p50_ms']:>9.2f}{ratio['p99_ms']:>9.2f}   (Redis / SQLite)")

    for store in stores.values():
        store.close()
    if server is not None:
        server.stop()
    if args.json:
        args.json.write_text(json.dumps({"reps": args.reps, "entities": args.entities, "results": results}, indent=2))


if __name__ == "__main__":
    main()
