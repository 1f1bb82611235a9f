"""Serving at twice its sustainable rate for 60 s: it sheds (503 + Retry-After) or queues within
``serving.max_inflight``, and recovers when the load returns to normal.

The same synthetic shop and `streamrec serve` process as ``benchmarks/serving.py`` (its set-up and
load functions are reused). The sustainable rate is measured first in the same run, as that
benchmark does (the highest ramp rate whose p99 stays under ``--slo-ms``), unless ``--rate`` gives
it. Then one continuous open-loop schedule: ``--before`` seconds at 1x, ``--duration`` seconds at
``--overload`` x, ``--after`` seconds at 1x. Latency counts from each request's scheduled time,
so queueing is not hidden; ``/metrics`` is sampled every 100 ms for the requests in hand.

Printed: offered and served rates during the overload, the shed count (503/429), other errors,
p50/p99 of the served requests, the most requests in hand (server) and outstanding (client), and
recovery: p99 in the ``--after`` seconds at 1x against p99 in the ``--before`` seconds.

    python benchmarks/load.py                      # measure the sustainable rate, then 2x for 60 s
    python benchmarks/load.py --rate 10 --json out.json
    python benchmarks/load.py --rate 10 --max-inflight 1000   # no effective bound, for comparison
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location("serving_benchmark", ROOT / "benchmarks" / "serving.py")
serving_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serving_benchmark)  # its name would clash with the serving package

K = serving_benchmark.K
SHED = (429, 503)


async def phased_load(base: str, users: list[str], phases: list[tuple[float, float]]) -> dict:
    """One open-loop schedule through ``phases`` of (rate, seconds); per-request outcomes and in-hand samples."""
    import httpx

    schedule: list[tuple[int, float]] = []  # (phase, offset in seconds)
    offset = 0.0
    for phase, (rate, seconds) in enumerate(phases):
        n = int(rate * seconds)
        schedule += [(phase, offset + i / rate) for i in range(n)]
        offset += seconds
    records: list[dict] = []
    server_inflight: list[float] = []
    outstanding = max_outstanding = 0
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        start = time.perf_counter() + 0.3
        done = asyncio.Event()

        async def one(i: int, phase: int, at: float) -> None:
            nonlocal outstanding, max_outstanding
            scheduled = start + at
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            outstanding += 1
            max_outstanding = max(max_outstanding, outstanding)
            record = {"phase": phase, "at": at, "status": -1, "retry_after": None}
            try:
                response = await client.post("/recommend", json={"user_id": users[i % len(users)], "k": K})
                record["status"] = response.status_code
                record["retry_after"] = response.headers.get("Retry-After")
                if response.status_code == 200 and len(response.json()["items"]) != K:
                    record["status"] = -2  # a wrong answer
            except httpx.HTTPError as exc:
                record["error"] = repr(exc)
            finally:
                outstanding -= 1
            record["latency_ms"] = (time.perf_counter() - scheduled) * 1000
            records.append(record)

        async def sample() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=5) as probe:
                while not done.is_set():
                    try:
                        text = (await probe.get("/metrics")).text
                        for line in text.splitlines():
                            if line.startswith("streamrec_serving_inflight "):
                                server_inflight.append(float(line.split()[1]))
                    except httpx.HTTPError:
                        pass
                    try:
                        await asyncio.wait_for(done.wait(), 0.1)
                    except asyncio.TimeoutError:
                        pass

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(one(i, phase, at) for i, (phase, at) in enumerate(schedule)))
        finished = time.perf_counter()
        done.set()
        await sampler
    return {"records": records, "server_inflight": server_inflight, "max_outstanding": max_outstanding,
            "overrun_s": max(0.0, finished - (start + offset))}


def shed_total(base: str) -> float:
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("streamrec_serving_shed_total "))


def phase_summary(records: list[dict], phase: int, seconds: float) -> dict:
    mine = [r for r in records if r["phase"] == phase]
    served = [r["latency_ms"] for r in mine if r["status"] == 200]
    shed = [r for r in mine if r["status"] in SHED]
    return {
        "offered_rps": len(mine) / seconds,
        "served_rps": len(served) / seconds,
        "requests": len(mine),
        "served": len(served),
        "shed": len(shed),
        "shed_without_retry_after": sum(1 for r in shed if not r["retry_after"]),
        "errors": sum(1 for r in mine if r["status"] not in SHED and r["status"] != 200),
        "p50_ms": serving_benchmark.percentile(served, 0.50),
        "p99_ms": serving_benchmark.percentile(served, 0.99),
        "max_ms": max(served) if served else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000, help="catalog size")
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--log-requests", type=int, default=3000, help="logged slates whose features fill Feast")
    parser.add_argument("--rate", type=float, help="the sustainable rate (req/s); default: measured first")
    parser.add_argument("--ramp", default="5,10,15,20,30,40,50,60,80,100,150,200,300",
                        help="rates tried for the sustainable rate")
    parser.add_argument("--ramp-duration", type=float, default=8.0, help="seconds per ramp rate")
    parser.add_argument("--slo-ms", type=float, default=100.0, help="p99 a sustainable rate must stay under")
    parser.add_argument("--overload", type=float, default=2.0, help="multiple of the sustainable rate")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of overload")
    parser.add_argument("--before", type=float, default=10.0, help="seconds at 1x before the overload")
    parser.add_argument("--after", type=float, default=10.0, help="seconds at 1x after it (recovery)")
    parser.add_argument("--max-inflight", type=int, help="serving.max_inflight for the server (default: its default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from serving.config import ServingSettings
    from streaming.local_broker import free_port

    workdir = Path(tempfile.mkdtemp(prefix="streamrec-load-bench-"))
    started = time.perf_counter()
    _, setup, users = serving_benchmark.synthetic_shop(workdir, args.items, args.users, args.log_requests)
    max_inflight = args.max_inflight or ServingSettings().max_inflight
    env = {**serving_benchmark.streamrec_env(setup), "STREAMREC_SERVING__MAX_INFLIGHT": str(max_inflight)}
    print(f"synthetic shop: {args.items} items, {args.users} users ({time.perf_counter() - started:.1f}s); "
          f"k={K} from {serving_benchmark.CANDIDATES} candidates; serving.max_inflight={max_inflight}; "
          f"{os.cpu_count()} CPUs", flush=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = workdir / "serve.log"
    process = serving_benchmark.run_server([sys.executable, "-m", "streamrec", "serve", "--port", str(port)], env, log)
    try:
        serving_benchmark.wait_ready(base, process, log)
        if args.rate:
            rate = args.rate
            print(f"sustainable rate: {rate:.0f} req/s (given)")
        else:
            print(f"{'server':<16}{'offered':>8}{'achieved':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}", flush=True)
            measured = serving_benchmark.measure("streamrec", base, users, [], [float(r) for r in args.ramp.split(",")],
                                                 args.ramp_duration, args.slo_ms)
            rate = measured["sustainable_rps"]
            if rate <= 0:
                raise SystemExit(f"no ramp rate kept p99 under {args.slo_ms} ms; give --rate")
            print(f"sustainable rate: {rate:.0f} req/s (measured: p99 <= {args.slo_ms:.0f} ms, no errors)")
        serving_benchmark.drain(base, users)
        if args.rate:
            asyncio.run(serving_benchmark.open_loop(base, users, rate, 2.0))  # warm-up, as the ramp would have done
            serving_benchmark.drain(base, users)
        shed_at_start = shed_total(base)
        phases = [(rate, args.before), (args.overload * rate, args.duration), (rate, args.after)]
        print(f"load: {rate:.0f} req/s for {args.before:.0f}s, {args.overload * rate:.0f} req/s for {args.duration:.0f}s, "
              f"{rate:.0f} req/s for {args.after:.0f}s", flush=True)
        run = asyncio.run(phased_load(base, users, phases))
        shed_metric = shed_total(base) - shed_at_start
    finally:
        process.terminate()
        try:
            process.wait(20)
        except Exception:  # noqa: BLE001
            process.kill()

    before, overload, after = (phase_summary(run["records"], i, seconds) for i, (_, seconds) in enumerate(phases))
    total_shed = before["shed"] + overload["shed"] + after["shed"]
    max_inflight_seen = max(run["server_inflight"], default=float("nan"))
    print(f"\noverload ({args.overload:.0f}x for {args.duration:.0f}s):")
    print(f"  offered {overload['offered_rps']:.1f} req/s, served {overload['served_rps']:.1f} req/s, "
          f"shed {overload['shed']} (503/429; {overload['shed_without_retry_after']} without Retry-After), "
          f"other errors {overload['errors']}")
    print(f"  served latency p50 {overload['p50_ms']:.1f} ms, p99 {overload['p99_ms']:.1f} ms, max {overload['max_ms']:.1f} ms")
    print(f"  most requests in hand (server, sampled every 100 ms): {max_inflight_seen:.0f} "
          f"(bound serving.max_inflight={max_inflight}); most outstanding at the client: {run['max_outstanding']}")
    print(f"  /metrics streamrec_serving_shed_total grew by {shed_metric:.0f} during the run (the client saw {total_shed})")
    print("recovery (1x):")
    print(f"  before: p50 {before['p50_ms']:.1f} ms, p99 {before['p99_ms']:.1f} ms, shed {before['shed']}, errors {before['errors']}")
    print(f"  after:  p50 {after['p50_ms']:.1f} ms, p99 {after['p99_ms']:.1f} ms, shed {after['shed']}, errors {after['errors']}")
    print(f"  p99 after / before: x{after['p99_ms'] / before['p99_ms']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) for k, v in vars(args).items()}, "sustainable_rps": rate, "max_inflight": max_inflight,
            "before": before, "overload": overload, "after": after, "max_inflight_seen": max_inflight_seen,
            "max_outstanding": run["max_outstanding"], "shed_metric": shed_metric, "overrun_s": run["overrun_s"],
        }, indent=2))


if __name__ == "__main__":
    main()
