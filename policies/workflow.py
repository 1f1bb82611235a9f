"""What ``streamrec policy train`` and ``streamrec policy evaluate`` do, minus the printing.

``train``: fit a policy (PPO online against the simulator, or BC/MARWIL from logs), compare it
with the baselines in the simulator, then put it through the promotion gate on an evaluation log
and publish it (and announce it) only if the gate passes. ``evaluate``: the simulator comparison
and off-policy estimates for a published (or greedy) policy on a log.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from learner.registry import ModelRegistry, VersionNotFound
from policies.config import PolicySettings
from policies.env import SessionEnv
from policies.evaluation import evaluate, greedy, oracle_policy, random_policy, serving
from policies.export import ServingPolicy, greedy_policy, load_policy
from policies.train import (
    LoggedBandit, TrainedPolicy, is_transition_log, read_transitions, record_sessions, train_offline, train_ppo,
    transitions_from_events,
)

DEFAULT_LOGGING_EXPLORATION = {"kind": "epsilon", "epsilon": 0.3}


@dataclass
class SimulatorComparison:
    rewards: dict[str, float]   # mean reward per session of each policy, same sessions
    stderr: dict[str, float]
    n_sessions: int

    def ratios(self, name: str) -> dict[str, float]:
        return {f"{name}/{other}": self.rewards[name] / self.rewards[other]
                for other in self.rewards if other != name and self.rewards[other] > 0}


def compare_in_simulator(settings: PolicySettings, policies: dict[str, ServingPolicy], n_sessions: int | None = None,
                         seed: int = 10_000) -> SimulatorComparison:
    """The policies (greedy, i.e. without exploration, and with it) next to random, greedy and oracle."""
    env = SessionEnv(settings.session)
    n = n_sessions or settings.eval_sessions
    runs = {"random": random_policy, "greedy_pctr": greedy("pctr"), "greedy_pctcvr": greedy("pctcvr"),
            "oracle": oracle_policy}
    for name, policy in policies.items():
        runs[name] = serving(policy)
        runs[f"{name}+exploration"] = serving(policy, explore=True)
    results = {name: evaluate(env, act, n, seed) for name, act in runs.items()}
    return SimulatorComparison({k: r.mean_reward for k, r in results.items()},
                               {k: r.stderr for k, r in results.items()}, n)


def load_log(settings: PolicySettings, path: str | Path, workdir: Path) -> tuple[Path, LoggedBandit]:
    """A transition log as is, or an event log converted to one (written under ``workdir``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"log {path} does not exist")
    if not is_transition_log(path):
        from streaming.event_log import read_events

        converted = workdir / f"{path.stem}.transitions.parquet"
        transitions_from_events(read_events(path), settings.session, converted)
        path = converted
    return path, read_transitions(path, settings.session.n_candidates, len(settings.session.feature_names))


def current_policy(registry: ModelRegistry) -> ServingPolicy | None:
    try:
        return load_policy(registry.load("policy"))
    except VersionNotFound:
        return None


def record_evaluation_log(settings: PolicySettings, registry: ModelRegistry, path: Path, n_sessions: int,
                          seed: int = 7) -> Path:
    """Log sessions served by the current policy (or epsilon-greedy pCTCVR if none) with their propensities."""
    logging_policy = current_policy(registry) or greedy_policy(settings.session.feature_names, DEFAULT_LOGGING_EXPLORATION)
    record_sessions(settings.session, logging_policy, n_sessions, path, seed=seed)
    return path


@dataclass
class TrainReport:
    trained: TrainedPolicy
    comparison: SimulatorComparison
    decision: object | None = None  # policies.promotion.PromotionDecision
    logs: list[str] = field(default_factory=list)


def train(settings: PolicySettings, registry: ModelRegistry, *, algorithm: str, iterations: int | None,
          logs: list[Path], eval_log: Path | None, publish: bool, announce: Callable | None,
          on_iteration: Callable[[int, dict], None] | None = None, eval_sessions: int | None = None) -> TrainReport:
    with tempfile.TemporaryDirectory(prefix="streamrec-policy-") as tmp:
        workdir = Path(tmp)
        if algorithm == "ppo":
            trained = train_ppo(settings, iterations, on_iteration)
        else:
            if not logs:
                raise ValueError(f"{algorithm} trains from logs: pass --log (an event log or a transition log)")
            paths = [str(load_log(settings, p, workdir)[0]) for p in logs]
            trained = train_offline(settings, paths, algorithm, iterations, on_iteration)
        comparison = compare_in_simulator(settings, {algorithm: trained.policy}, eval_sessions)
        report = TrainReport(trained, comparison, logs=[str(p) for p in logs])
        if publish:
            from policies.promotion import promote

            log_path = eval_log or record_evaluation_log(settings, registry, workdir / "eval.parquet",
                                                         max(200, settings.eval_sessions // 2))
            _, log = load_log(settings, log_path, workdir)
            metrics = {"sim_reward": comparison.rewards[algorithm],
                       "sim_reward_explore": comparison.rewards[f"{algorithm}+exploration"],
                       "sim_oracle_ratio": comparison.rewards[algorithm] / comparison.rewards["oracle"]}
            report.decision = promote(registry, trained.policy, log, metrics=metrics, announce=announce,
                                      alpha=1 - settings.confidence, n_bootstrap=settings.bootstrap)
    return report


@dataclass
class EvaluateReport:
    policy_name: str
    version: str | None
    comparison: SimulatorComparison
    ope: dict[str, object]  # estimator -> policies.ope.ConfidenceInterval
    logged_reward: float | None


def evaluate_policy(settings: PolicySettings, registry: ModelRegistry, *, version: str | None, log: Path | None,
                    eval_sessions: int | None = None) -> EvaluateReport:
    """Simulator comparison and DM/IPS/SNIPS/DR estimates on ``log`` for a published policy."""
    from policies.ope import action_dist_from_probabilities, estimate_interval
    from policies.promotion import action_probabilities

    try:
        policy = load_policy(registry.load("policy", version))
    except VersionNotFound:
        if version is not None:
            raise
        policy = greedy_policy(settings.session.feature_names, settings.exploration
                               if settings.exploration["kind"] == "epsilon" else DEFAULT_LOGGING_EXPLORATION)
    comparison = compare_in_simulator(settings, {policy.name: policy}, eval_sessions)
    ope, logged_reward = {}, None
    if log is not None:
        with tempfile.TemporaryDirectory(prefix="streamrec-policy-") as tmp:
            _, logged = load_log(settings, log, Path(tmp))
        dist = action_dist_from_probabilities(action_probabilities(policy, logged))
        inputs = dict(reward=logged.rewards, action=logged.actions, pscore=logged.pscore, action_dist=dist,
                      estimated_rewards_by_reg_model=logged.estimated_rewards[:, :, None])
        for name in ("dm", "ips", "snips", "dr"):
            ope[name] = estimate_interval(name, alpha=1 - settings.confidence, n_bootstrap=settings.bootstrap,
                                          seed=0, **inputs)
        logged_reward = float(np.mean(logged.rewards))
    return EvaluateReport(policy.name, policy.version, comparison, ope, logged_reward)
