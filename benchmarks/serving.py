"""Serving latency and throughput: `streamrec serve` against Feast lookups alone, on loopback.

A synthetic shop (``--items`` catalog items, ``--users`` users, their logged traffic pushed to a
Feast SQLite store) and a tiny model plus the pCTCVR softmax policy in a registry. Each request
asks for k=10 items from 200 candidates retrieved from the catalog. Three servers run one after
the other, each a uvicorn process with the same Feast store:

* ``feast-only`` (the baseline): reads the user's row and 200 candidates' rows from Feast and
  returns them; what the model, the policy and StreamRec's plumbing add is the difference;
* ``streamrec``: the real service (retrieval, Feast with the in-memory item rows refreshed every
  ``item_feature_ttl_s``, model, policy, exploration);
* ``streamrec-ttl0``: the real service reading all 200 candidates from Feast on every request.

The load generator (httpx async, open loop: requests leave on schedule whether or not earlier
ones have returned, and latency counts from the scheduled time, so queueing is not hidden) runs
on the same machine, sharing its cores with the server.

    python benchmarks/serving.py                          # 1000 items, 50 and 100 req/s, max rate
    python benchmarks/serving.py --items 100000 --duration 20 --json out.json
    python benchmarks/serving.py --kafka 127.0.0.1:9092   # impressions logged to a real broker

The sustainable rate is the highest offered rate whose p99 stays under ``--slo-ms`` with no
errors and at least 97% of the requests completed in the window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATES = 200
K = 10


def feast_only_app(feature_store_dir: str, catalog: list[str]):
    """The baseline server: one Feast online read of the user and 200 candidates per request."""
    from fastapi import FastAPI

    from feature_store.config import FeatureStoreSettings
    from feature_store.store import StreamingFeatureStore
    from serving.online_features import request_features

    store = StreamingFeatureStore(FeatureStoreSettings(data_dir=Path(feature_store_dir)))
    app = FastAPI()
    rng = random.Random(0)

    @app.post("/recommend")
    def recommend(body: dict) -> dict:
        candidates = rng.sample(catalog, CANDIDATES)
        features = request_features(body["user_id"], candidates,
                                    store.online_features(user_ids=[body["user_id"]], item_ids=candidates))
        return {"items": [{"item_id": i, "features": f} for i, f in zip(candidates[:K], features.items[:K])]}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"ready": True}

    return app


def percentile(samples: list[float], q: float) -> float:
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=1000, method="inclusive")[min(int(q * 1000), 999) - 1]


async def open_loop(base: str, users: list[str], rate: float, duration_s: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    n = int(rate * duration_s)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        start = time.perf_counter() + 0.2

        async def one(i: int) -> None:
            nonlocal errors
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                response = await client.post("/recommend", json={"user_id": users[i % len(users)], "k": K})
                if response.status_code != 200:
                    errors += 1
                    return
            except httpx.HTTPError:
                errors += 1
                return
            latencies.append((time.perf_counter() - scheduled) * 1000)

        window_end = start + duration_s
        await asyncio.gather(*(one(i) for i in range(n)))
        finished = time.perf_counter()
    on_time = sum(1 for _ in latencies)
    return {"offered_rps": rate, "requests": n, "completed": on_time, "errors": errors,
            "achieved_rps": on_time / max(finished - start, 1e-9), "overrun_s": max(0.0, finished - window_end),
            "p50_ms": percentile(latencies, 0.50), "p99_ms": percentile(latencies, 0.99),
            "mean_ms": statistics.fmean(latencies) if latencies else float("nan")}


def sustainable(result: dict, slo_ms: float, duration_s: float) -> bool:
    return (result["errors"] == 0 and result["p99_ms"] <= slo_ms
            and result["completed"] >= 0.97 * result["requests"] and result["overrun_s"] <= 0.1 * duration_s)


def wait_ready(base: str, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"server not ready in {timeout_s}s:\n{log.read_text()[-3000:]}")


def run_server(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def drain(base: str, users: list[str], timeout_s: float = 120.0) -> None:
    """Wait until the server has worked off any backlog: a lone request is answered quickly again."""
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base, timeout=60) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            client.post("/recommend", json={"user_id": users[0], "k": K})
            if time.perf_counter() - started < 0.2:
                return
            time.sleep(0.5)


def measure(name: str, base: str, users: list[str], rates: list[float], ramp: list[float], duration: float,
            slo_ms: float) -> dict:
    asyncio.run(open_loop(base, users, 20, 2.0))  # warm-up: connections, caches, torch
    fixed = []
    for rate in rates:
        drain(base, users)
        fixed.append(asyncio.run(open_loop(base, users, rate, duration)))
    for r in fixed:
        print(f"{name:<16}{r['offered_rps']:>8.0f}{r['achieved_rps']:>10.1f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['errors']:>7}", flush=True)
    best = 0.0
    ramp_results = []
    for rate in ramp:
        drain(base, users)
        r = asyncio.run(open_loop(base, users, rate, duration))
        ramp_results.append(r)
        ok = sustainable(r, slo_ms, duration)
        print(f"{name:<16}{rate:>8.0f}{r['achieved_rps']:>10.1f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>7}"
              f"   {'ok' if ok else 'over'}", flush=True)
        if not ok:
            break
        best = rate
    return {"fixed": fixed, "ramp": ramp_results, "sustainable_rps": best}


def synthetic_shop(workdir: Path, items: int, users: int, log_requests: int):
    """The benchmark's shop: world, serving setup (registry + Feast), catalog file and the request users."""
    from policies.synthetic_world import SyntheticWorld, WorldConfig
    from serving.synthetic import build_synthetic_serving

    world = SyntheticWorld(WorldConfig(seed=0, n_users=users, n_items=items))
    setup = build_synthetic_serving(workdir, world, n_requests=log_requests)
    (workdir / "catalog.json").write_text(json.dumps(world.item_ids))
    history_users = sorted({e.user_id for e in setup.events if getattr(e, "type", "") == "click"})
    request_users = history_users + [f"new-visitor-{n}" for n in range(max(1, len(history_users) // 10))]
    random.Random(0).shuffle(request_users)
    return world, setup, request_users


def streamrec_env(setup, kafka: str | None = None) -> dict:
    """Environment of a `streamrec serve` process over ``setup``; impressions go to ``kafka`` when given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STREAMREC_LOG_LEVEL": "WARNING",
           "STREAMREC_FEATURE_STORE__DATA_DIR": str(setup.feature_store.data_dir),
           "STREAMREC_SERVING__REGISTRY_DIR": str(setup.registry.root),
           "STREAMREC_SERVING__CANDIDATES": str(CANDIDATES),
           "STREAMREC_SERVING__LOG_IMPRESSIONS": "true" if kafka else "false",
           "STREAMREC_SERVING__LISTEN_FOR_UPDATES": "true" if kafka else "false"}
    if kafka:
        from streaming.config import KafkaSettings
        from streaming.kafka_io import ensure_topics

        ensure_topics(KafkaSettings(bootstrap_servers=kafka))
        env["STREAMREC_KAFKA__BOOTSTRAP_SERVERS"] = kafka
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000, help="catalog size")
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--log-requests", type=int, default=3000, help="logged slates whose features fill Feast")
    parser.add_argument("--rates", default="50,100", help="fixed offered rates (req/s) to report")
    parser.add_argument("--ramp", default="10,20,30,40,50,60,80,100,150,200,300", help="rates tried for the sustainable rate")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per rate")
    parser.add_argument("--slo-ms", type=float, default=100.0, help="p99 a sustainable rate must stay under")
    parser.add_argument("--kafka", help="bootstrap servers: log impressions to this broker (default: logging off)")
    parser.add_argument("--only", help="comma-separated subset of feast-only,streamrec,streamrec-ttl0")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-baseline", nargs=3, metavar=("FEATURE_DIR", "CATALOG_JSON", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    if args.serve_baseline:  # the baseline server process
        import uvicorn

        feature_dir, catalog_json, port = args.serve_baseline
        app = feast_only_app(feature_dir, json.loads(Path(catalog_json).read_text()))
        uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False)
        return

    from streaming.local_broker import free_port

    workdir = Path(tempfile.mkdtemp(prefix="streamrec-serving-bench-"))
    started = time.perf_counter()
    world, setup, users = synthetic_shop(workdir, args.items, args.users, args.log_requests)
    catalog_json = workdir / "catalog.json"
    print(f"synthetic shop: {args.items} items, {args.users} users, {len(setup.events)} logged events -> Feast "
          f"({time.perf_counter() - started:.1f}s); k={K} from {CANDIDATES} candidates; "
          f"impressions {'to ' + args.kafka if args.kafka else 'not logged'}; {os.cpu_count()} CPUs", flush=True)

    rates = [float(r) for r in args.rates.split(",")]
    ramp = [float(r) for r in args.ramp.split(",")]
    base_env = streamrec_env(setup, args.kafka)
    servers = {
        "feast-only": lambda port: ([sys.executable, __file__, "--serve-baseline", str(setup.feature_store.data_dir),
                                     str(catalog_json), str(port)], base_env),
        "streamrec": lambda port: ([sys.executable, "-m", "streamrec", "serve", "--port", str(port)], base_env),
        "streamrec-ttl0": lambda port: ([sys.executable, "-m", "streamrec", "serve", "--port", str(port)],
                                        {**base_env, "STREAMREC_SERVING__ITEM_FEATURE_TTL_S": "0"}),
    }
    chosen = args.only.split(",") if args.only else list(servers)

    print(f"{'server':<16}{'offered':>8}{'achieved':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}", flush=True)
    results: dict[str, dict] = {}
    for name in chosen:
        port = free_port()
        command, env = servers[name](port)
        log = workdir / f"{name}.log"
        process = run_server(command, env, log)
        try:
            wait_ready(f"http://127.0.0.1:{port}", process, log)
            results[name] = measure(name, f"http://127.0.0.1:{port}", users, rates, ramp, args.duration, args.slo_ms)
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()

    print("\nsummary (p99 at each fixed rate; sustainable = highest ramp rate within the SLO)")
    for name, result in results.items():
        p99 = ", ".join(f"{r['offered_rps']:.0f}/s: {r['p99_ms']:.1f} ms" for r in result["fixed"])
        print(f"  {name:<16} p99 {p99}; sustainable {result['sustainable_rps']:.0f} req/s")
    if "feast-only" in results:
        baseline = results["feast-only"]
        for name in ("streamrec", "streamrec-ttl0"):
            if name in results:
                ratios = ", ".join(f"{a['offered_rps']:.0f}/s: p50 x{a['p50_ms'] / b['p50_ms']:.2f} p99 x{a['p99_ms'] / b['p99_ms']:.2f}"
                                   for a, b in zip(results[name]["fixed"], baseline["fixed"]))
                if baseline["sustainable_rps"] > 0:
                    rate = f"x{results[name]['sustainable_rps'] / baseline['sustainable_rps']:.2f}"
                else:
                    rate = f"{results[name]['sustainable_rps']:.0f} vs none (the baseline meets the SLO at no tested rate)"
                print(f"  {name} / feast-only: {ratios}; sustainable {rate}")
    if "streamrec" in results:
        print(f"  issue 8 load (2x sustainable): {2 * results['streamrec']['sustainable_rps']:.0f} req/s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
