"""Off-policy evaluation on the Open Bandit protocol, and the estimators' speed, in one run.

Protocol: estimate the Bernoulli-TS policy's CTR from the uniform-random logs of the Open Bandit
Dataset sample shipped in ``streaming/data/open_bandit`` (BTS's slot probabilities by Monte-Carlo
with the ZOZOTOWN prior, as obp does) and compare with the CTR BTS obtained in its own logs.
Prints each estimator's estimate, 95% bootstrap interval and relative error, next to obp's run
of the same protocol (from ``tests/data/ope/obp_reference.json``) and obp's published example.

Speed: the vectorised estimators and bootstrap against naive per-round Python loops (the
obp-free baseline, measured in the same run), and each estimator's time against IPS's.

    python benchmarks/ope.py [--n-bootstrap 10000] [--n-sim 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.ope import (  # noqa: E402
    bernoulli_ts_action_dist, bootstrap_interval, context_free_action_dist, estimate_rewards_by_regression,
    load_open_bandit, open_bandit_protocol, round_rewards,
)

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "ope" / "obp_reference.json"
# obp's examples/obd README (2020): mean relative error over 10 bootstrap resamples of the logs,
# with BTS replayed by run_bandit_simulation (a deterministic slate per round), not its action
# probabilities; a harder, higher-variance set-up than the one measured here.
OBP_PUBLISHED = {"dm": 0.218148, "ips": 1.158730, "dr": 0.992942}


def best_of(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def naive_ips(reward, action, pscore, action_dist, position) -> float:
    total = 0.0
    for i in range(len(reward)):
        total += reward[i] * action_dist[i][action[i]][position[i]] / pscore[i]
    return total / len(reward)


def naive_dr(reward, action, pscore, action_dist, position, q_hat) -> float:
    total = 0.0
    n_actions = len(action_dist[0])
    for i in range(len(reward)):
        k = position[i]
        dm = sum(action_dist[i][a][k] * q_hat[i][a][k] for a in range(n_actions))
        total += dm + action_dist[i][action[i]][k] / pscore[i] * (reward[i] - q_hat[i][action[i]][k])
    return total / len(reward)


def naive_bootstrap(samples: np.ndarray, n_bootstrap: int, seed: int) -> tuple[float, float]:
    random = np.random.RandomState(seed)  # obp's loop: one RandomState.choice per replicate
    means = [np.mean(random.choice(samples, size=samples.shape[0])) for _ in range(n_bootstrap)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-bootstrap", type=int, default=10_000)
    parser.add_argument("--n-sim", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    started = time.perf_counter()
    result = open_bandit_protocol(estimators=("dm", "ips", "snips", "dr", "sndr"), n_sim=args.n_sim,
                                  seed=args.seed, n_bootstrap=args.n_bootstrap)
    total = time.perf_counter() - started
    obp_run = json.loads(REFERENCE.read_text())["obp_protocol"]["estimators"] if REFERENCE.exists() else {}

    print(f"Open Bandit protocol (campaign all, 10,000 random-policy rounds, n_sim={args.n_sim}, "
          f"n_bootstrap={args.n_bootstrap}, seed={args.seed})")
    print(f"  BTS on-policy CTR (truth) {result.on_policy_value:.6f}   random policy CTR {result.logging_value:.6f}")
    print(f"  {'estimator':9s} {'estimate':>9s} {'95% CI':>21s} {'V/V_true':>8s} {'rel.err':>8s} "
          f"{'obp same protocol':>17s} {'obp published':>13s} {'time s':>7s} {'x IPS':>6s}")
    ips_seconds = result.estimates["ips"].seconds
    rows = {}
    for name, row in result.estimates.items():
        ci = row.interval
        obp_same = obp_run.get(name, {}).get("relative_error")
        published = OBP_PUBLISHED.get(name)
        print(f"  {name:9s} {ci.estimate:9.6f} [{ci.lower:9.6f}, {ci.upper:9.6f}] "
              f"{ci.estimate / result.on_policy_value:8.3f} {row.relative_error:8.4f} "
              f"{'' if obp_same is None else f'{obp_same:.4f}':>17s} {'' if published is None else f'{published:.3f}':>13s} "
              f"{row.seconds:7.3f} {row.seconds / ips_seconds:6.2f}")
        rows[name] = {"estimate": ci.estimate, "lower": ci.lower, "upper": ci.upper,
                      "relative_error": row.relative_error, "obp_same_protocol_relative_error": obp_same,
                      "obp_published_relative_error": published, "seconds": row.seconds}
    print(f"  BTS action probabilities {result.action_dist_seconds:.2f}s, reward model (3-fold logistic) "
          f"{result.reward_model_seconds:.2f}s, whole protocol {total:.2f}s")

    # speed against naive per-round loops on the same inputs
    logs = load_open_bandit("random")
    action_dist = context_free_action_dist(bernoulli_ts_action_dist(n_sim=10_000, seed=args.seed), logs.n_rounds)
    q_hat = estimate_rewards_by_regression(logs.context, logs.action, logs.reward, logs.n_actions, logs.position,
                                           logs.len_list, seed=args.seed)
    inputs = dict(reward=logs.reward, action=logs.action, pscore=logs.pscore, position=logs.position,
                  action_dist=action_dist)
    as_lists = dict(reward=logs.reward.tolist(), action=logs.action.tolist(), pscore=logs.pscore.tolist(),
                    position=logs.position.tolist(), action_dist=np.asarray(action_dist).tolist())
    q_list = q_hat.tolist()
    fast_ips = best_of(lambda: round_rewards("ips", **inputs).mean())
    slow_ips = best_of(lambda: naive_ips(**as_lists), rounds=1)
    fast_dr = best_of(lambda: round_rewards("dr", **inputs, estimated_rewards_by_reg_model=q_hat).mean())
    slow_dr = best_of(lambda: naive_dr(**as_lists, q_hat=q_list), rounds=1)
    assert abs(round_rewards("ips", **inputs).mean() - naive_ips(**as_lists)) < 1e-12
    terms = round_rewards("dr", **inputs, estimated_rewards_by_reg_model=q_hat)
    n_boot = 1000
    fast_boot = best_of(lambda: bootstrap_interval(terms, n_bootstrap=n_boot, seed=1), rounds=1)
    slow_boot = best_of(lambda: naive_bootstrap(terms, n_boot, 1), rounds=1)
    assert np.allclose(bootstrap_interval(terms, n_bootstrap=n_boot, seed=1)[1:], naive_bootstrap(terms, n_boot, 1),
                       rtol=1e-12)
    print("Speed (10,000 rounds, 80 actions, 3 positions; baseline = per-round Python loop, same run)")
    print(f"  IPS       {fast_ips * 1e3:8.2f} ms   loop {slow_ips * 1e3:8.1f} ms   {slow_ips / fast_ips:6.0f}x faster")
    print(f"  DR        {fast_dr * 1e3:8.2f} ms   loop {slow_dr * 1e3:8.1f} ms   {slow_dr / fast_dr:6.0f}x faster")
    print(f"  bootstrap {fast_boot * 1e3:8.1f} ms   obp-style loop {slow_boot * 1e3:8.1f} ms   "
          f"{slow_boot / fast_boot:5.1f}x faster ({n_boot} replicates, identical interval)")
    if args.json:
        args.json.write_text(json.dumps({
            "on_policy_value": result.on_policy_value, "logging_value": result.logging_value, "estimators": rows,
            "speed": {"ips_s": fast_ips, "ips_loop_s": slow_ips, "dr_s": fast_dr, "dr_loop_s": slow_dr,
                      "bootstrap_s": fast_boot, "bootstrap_loop_s": slow_boot, "n_bootstrap": n_boot},
        }, indent=1))


if __name__ == "__main__":
    main()
