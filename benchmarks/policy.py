"""Policy-layer benchmark: environment speed, PPO training throughput and time-to-target, learned vs baselines.

    python benchmarks/policy.py [--iterations 30] [--sessions 3000] [--target 0.9] [--offline]

Prints:
* environment steps/s (random actions, in-process), and its ratio to a bare ``world.oracle``
  call loop measured in the same run (the cost of the simulator around the ground truth);
* PPO on a local Ray (``--num-cpus``, default 2): env steps/s while training, wall time and
  iterations until the greedy learned policy reaches ``--target`` x the oracle's reward;
* reward per session of the learned policy (greedy and with its serving exploration) next to
  random, greedy-by-pCTR, greedy-by-pCTCVR and the oracle, on the same sessions, with ratios;
* with ``--offline``: MARWIL and BC trained from an epsilon-greedy log, against that logging policy.

OPE relative errors on the Open Bandit protocol are in ``benchmarks/ope_reference.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from policies.config import PolicySettings  # noqa: E402
from policies.env import SessionEnv  # noqa: E402
from policies.evaluation import evaluate, greedy, oracle_policy, random_policy, serving  # noqa: E402
from policies.export import greedy_policy  # noqa: E402
from policies.train import record_sessions, train_offline, train_ppo  # noqa: E402


def env_speed(settings: PolicySettings, seconds: float = 3.0) -> tuple[float, float]:
    env, rng = SessionEnv(settings.session), np.random.default_rng(0)
    steps, start, seed = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        env.reset(seed=seed)
        seed += 1
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(int(rng.integers(env.n_candidates)))
            steps += 1
            done = terminated or truncated
    env_rate = steps / (time.perf_counter() - start)
    world, items = env.world, env.world.item_ids[: env.n_candidates]
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 3:
        world.oracle(world.user_ids[calls % len(world.user_ids)], items, np.zeros(len(items), dtype=np.int64))
        calls += 1
    # one env step asks the truth once for the shown item and the scorer once for K candidates
    return env_rate, calls / (time.perf_counter() - start) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--target", type=float, default=0.9, help="fraction of the oracle's reward to reach")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--offline", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = PolicySettings(num_cpus=args.num_cpus, train={"iterations": args.iterations, "train_batch_size": 1000,
                                                             "minibatch_size": 250, "num_epochs": 6})
    env_rate, oracle_rate = env_speed(settings)
    print(f"environment: {env_rate:,.0f} steps/s (random actions); bare oracle+scorer pair {oracle_rate:,.0f}/s; "
          f"ratio env/oracle {env_rate / oracle_rate:.2f}")

    env = SessionEnv(settings.session)
    baselines = {name: evaluate(env, policy, args.sessions).mean_reward for name, policy in
                 [("random", random_policy), ("greedy_pctr", greedy("pctr")), ("greedy_pctcvr", greedy("pctcvr")),
                  ("oracle", oracle_policy)]}
    target = args.target * baselines["oracle"]
    reached: dict[str, float] = {}

    def check(iteration: int, row: dict) -> None:
        print(f"  iteration {iteration:3d}: sampled return {row['episode_return_mean']:.3f}, "
              f"{row['env_steps'] / row['wall_s']:,.0f} env steps/s overall, wall {row['wall_s']:.1f}s", flush=True)

    trained = train_ppo(settings, on_iteration=check)
    learned = evaluate(env, serving(trained.policy), args.sessions).mean_reward
    exploring = evaluate(env, serving(trained.policy, explore=True), args.sessions).mean_reward
    steps = trained.history[-1]["env_steps"]
    print(f"PPO: {trained.iterations} iterations, {steps:,.0f} env steps in {trained.wall_s:.1f}s "
          f"({steps / trained.wall_s:,.0f} env steps/s incl. learning, Ray start and setup "
          f"{trained.history[0]['wall_s']:.1f}s to the first iteration)")
    # time to target: retrain with growing budgets, evaluating each greedy policy on the same sessions
    for budget in (2, 4, 8, 16):
        if budget >= args.iterations:
            break
        small = train_ppo(settings, iterations=budget)
        value = evaluate(env, serving(small.policy), args.sessions // 2).mean_reward
        print(f"  budget {budget:2d} iterations: greedy learned reward {value:.3f} "
              f"({value / baselines['oracle']:.3f} x oracle), wall {small.wall_s:.1f}s")
        if value >= target and "iterations" not in reached:
            reached = {"iterations": budget, "wall_s": small.wall_s}
    if "iterations" not in reached and learned >= target:
        reached = {"iterations": trained.iterations, "wall_s": trained.wall_s}
    if reached:
        print(f"PPO reached {args.target:g} x oracle ({target:.3f}) within {reached['iterations']} iterations, "
              f"{reached['wall_s']:.1f}s wall on {args.num_cpus} CPUs")
    else:
        print(f"PPO did not reach {args.target:g} x oracle ({target:.3f}) in {args.iterations} iterations")
    rows = {**baselines, "ppo": learned, "ppo+epsilon0.1": exploring}

    if args.offline:
        with tempfile.TemporaryDirectory() as tmp:
            logging_policy = greedy_policy(exploration={"kind": "epsilon", "epsilon": 0.5})
            path = Path(tmp) / "log.parquet"
            n = record_sessions(settings.session, logging_policy, 2000, path, seed=1)
            rows["logging(eps-greedy 0.5)"] = evaluate(env, serving(logging_policy, explore=True), args.sessions).mean_reward
            for algorithm in ("marwil", "bc"):
                off = train_offline(settings, [path], algorithm, iterations=40)
                rows[algorithm] = evaluate(env, serving(off.policy), args.sessions).mean_reward
                print(f"{algorithm}: {n:,} logged steps, 40 iterations in {off.wall_s:.1f}s")

    print(f"\nreward per session ({args.sessions} sessions, same users and candidates):")
    for name, value in rows.items():
        print(f"  {name:24s} {value:7.3f}   ppo/{name} = {learned / value:6.3f}   {name}/oracle = "
              f"{value / baselines['oracle']:.3f}")


if __name__ == "__main__":
    main()
