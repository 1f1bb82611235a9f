"""Run policies through simulated sessions and compare them on the same users and candidates.

A *session policy* is a function ``(env, rng) -> action`` that reads the environment's current
candidates; :func:`evaluate` runs it over sessions ``seed, seed + 1, ...`` so every policy meets
the same users and candidate sets (see :mod:`policies.env` on common random numbers).

>>> from policies.env import SessionEnv
>>> env = SessionEnv({"world": {"seed": 0, "n_users": 30, "n_items": 40}})
>>> r = evaluate(env, random_policy, n_sessions=200)
>>> o = evaluate(env, oracle_policy, n_sessions=200)
>>> bool(o.mean_reward > 2 * r.mean_reward)
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from policies.env import SessionEnv
from policies.export import ServingPolicy

SessionPolicy = Callable[[SessionEnv, np.random.Generator], int]


@dataclass(frozen=True)
class SessionResults:
    returns: np.ndarray  # reward of each session
    lengths: np.ndarray  # steps of each session

    @property
    def mean_reward(self) -> float:
        return float(self.returns.mean())

    @property
    def stderr(self) -> float:
        return float(self.returns.std(ddof=1) / np.sqrt(len(self.returns)))

    @property
    def mean_length(self) -> float:
        return float(self.lengths.mean())


def evaluate(env: SessionEnv, policy: SessionPolicy, n_sessions: int = 1000, seed: int = 10_000) -> SessionResults:
    rng = np.random.default_rng(seed)
    returns, lengths = np.zeros(n_sessions), np.zeros(n_sessions, dtype=np.int64)
    for s in range(n_sessions):
        env.reset(seed=seed + s)
        done = False
        while not done:
            _, reward, terminated, truncated, _ = env.step(policy(env, rng))
            returns[s] += reward
            lengths[s] += 1
            done = terminated or truncated
    return SessionResults(returns, lengths)


def random_policy(env: SessionEnv, rng: np.random.Generator) -> int:
    return int(rng.integers(env.n_candidates))


def oracle_policy(env: SessionEnv, rng: np.random.Generator) -> int:
    """The best immediate reward by the true click/purchase probabilities (what no model can know)."""
    return env.oracle_action()


def greedy(feature: str) -> SessionPolicy:
    """Rank by one of the candidate features (e.g. ``pctr`` or ``pctcvr``) and show the best."""

    def act(env: SessionEnv, rng: np.random.Generator) -> int:
        return int(np.argmax(env.candidate_feature_matrix[:, env.config.feature_names.index(feature)]))

    act.__name__ = f"greedy_{feature}"
    return act


def serving(policy: ServingPolicy, explore: bool = False) -> SessionPolicy:
    """A serving policy in the simulator: its best candidate, or a sample with its exploration."""

    def act(env: SessionEnv, rng: np.random.Generator) -> int:
        features = env.candidate_feature_matrix
        if explore:
            return int(rng.choice(env.n_candidates, p=policy.action_probabilities(features)))
        return int(np.argmax(policy.logits(features)))

    return act
