"""Crash faults at scale: the live stack under repeated SIGKILLs of the stream worker and the learner.

Runs ``streamrec.chaos.run_chaos``: the Faust worker, the learner and serving as separate
processes on one broker; a synthetic shop's log of ``--events`` events replayed into fresh
topics; ``--kills`` SIGKILLs at seeded random points, taking the worker and the learner in turn,
each followed by a restart; serving probed every 50 ms throughout. Prints the counts the issue
asks for (events, kills, restarts, lost, duplicated, serving's longest unavailability, wall time)
and the rest of the checks (re-sent repeats, features against an uninterrupted run, dead letters).

There is no baseline ratio: the figures that matter are counts that must be zero, and serving's
longest unavailability, whose reference is its probe interval (50 ms).

    python benchmarks/chaos.py                              # 100,000 events, 10 kills; starts a LocalKafka
    python benchmarks/chaos.py --events 20000 --kills 4 --bootstrap 127.0.0.1:9092 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streaming.config import KafkaSettings  # noqa: E402
from streaming.local_broker import LocalKafka  # noqa: E402
from streamrec.chaos import ChaosConfig, run_chaos  # noqa: E402


def benchmark(bootstrap: str, config: ChaosConfig, workdir: Path | None) -> dict:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=f"chaos-{uuid.uuid4().hex[:8]}.", partitions=3,
                          retention_ms=-1, bootstrap_timeout_ms=15_000, linger_ms=5)
    started = time.strftime("%H:%M:%S")
    with tempfile.TemporaryDirectory(prefix="streamrec-chaos-") as tmp:
        where = workdir or Path(tmp)
        result = run_chaos(config, kafka, where,
                           say=lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True))
    print()
    print(f"chaos run started {started} on {bootstrap}, seed {config.seed}, {kafka.partitions} partitions")
    print(result.summary())
    print("OK: nothing lost, nothing learned twice, features as uninterrupted, serving always answered" if result.ok
          else f"FAULTS: {json.dumps(result.samples, indent=2)}")
    return result.as_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events in the replayed log (default 100,000)")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs, worker and learner in turn (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the world and the kill points")
    parser.add_argument("--bootstrap", metavar="HOST:PORT", help="use this broker instead of starting a LocalKafka")
    parser.add_argument("--workdir", type=Path, help="keep settings, logs, checkpoints and features here")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    config = ChaosConfig(events=args.events, kills=args.kills, seed=args.seed)
    if args.bootstrap:
        figures = benchmark(args.bootstrap, config, args.workdir)
    else:
        with LocalKafka() as broker:
            figures = benchmark(broker.bootstrap, config, args.workdir)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
