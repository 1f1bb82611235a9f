"""Safe promotion: a new policy is published only if the logs say it is at least as good.

The gate estimates each policy's value per request off-policy, with the doubly robust estimator
of :mod:`policies.ope` on logged requests (candidates, the logged action, its propensity and the
reward), and publishes the candidate only when the *lower* bound of its DR confidence interval is
not below the current policy's DR estimate. With no published policy yet, the current policy is
the one that logged the data and its value is the logged mean reward.

This is a one-step (per request) estimate: it scores what a policy would earn on the logged
requests, not the longer sessions it may cause.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from learner.registry import ModelRegistry, PublishedArtifact, VersionNotFound
from policies.export import ServingPolicy, load_policy, publish_policy
from policies.ope import ConfidenceInterval, action_dist_from_probabilities, estimate_interval
from policies.train import LoggedBandit
from streaming.events import ModelUpdate


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    candidate: ConfidenceInterval          # DR interval of the new policy
    current_value: float                   # the current policy's estimate the bound must reach
    current_version: str | None            # None: the logging policy (nothing published yet)
    artifact: PublishedArtifact | None = None
    announcement: ModelUpdate | None = None


def action_probabilities(policy: ServingPolicy, log: LoggedBandit) -> np.ndarray:
    """``[n, K]``: the policy's probabilities (exploration included) on every logged request."""
    return np.stack([policy.action_probabilities(features) for features in log.features])


def dr_interval(policy: ServingPolicy, log: LoggedBandit, *, alpha: float = 0.05, n_bootstrap: int = 1000,
                seed: int = 0) -> ConfidenceInterval:
    """The doubly robust estimate of ``policy``'s reward per request on ``log``, with a bootstrap interval."""
    action_dist = action_dist_from_probabilities(action_probabilities(policy, log))
    return estimate_interval("dr", reward=log.rewards, action=log.actions, pscore=log.pscore, action_dist=action_dist,
                             estimated_rewards_by_reg_model=log.estimated_rewards[:, :, None],
                             alpha=alpha, n_bootstrap=n_bootstrap, seed=seed)


def promote(registry: ModelRegistry, candidate: ServingPolicy, log: LoggedBandit, *,
            current: ServingPolicy | None = None, metrics: dict[str, float] | None = None,
            announce: Callable[[ModelUpdate], None] | None = None, alpha: float = 0.05,
            n_bootstrap: int = 1000, seed: int = 0) -> PromotionDecision:
    """Publish ``candidate`` (and announce it) if its DR lower bound reaches the current policy's estimate.

    ``current`` defaults to the latest published policy in ``registry``.
    """
    if not np.isfinite(log.pscore).all() or (log.pscore <= 0).any():
        raise ValueError("the log has missing or zero propensities; off-policy evaluation needs the logging "
                         "policy's probability of every logged action")
    if current is None:
        try:
            current = load_policy(registry.load("policy"))
        except VersionNotFound:
            current = None
    new = dr_interval(candidate, log, alpha=alpha, n_bootstrap=n_bootstrap, seed=seed)
    if current is None:
        current_value, current_version = float(log.rewards.mean()), None
        against = "the logging policy's observed reward"
    else:
        current_value = dr_interval(current, log, alpha=alpha, n_bootstrap=n_bootstrap, seed=seed).estimate
        current_version = current.version
        against = f"policy {current.version}'s DR estimate"
    level = f"{100 * (1 - alpha):g}%"
    if new.lower < current_value:
        return PromotionDecision(False, f"refused: the {level} DR lower bound {new.lower:.4f} is below {against} "
                                        f"{current_value:.4f}", new, current_value, current_version)
    all_metrics = {"ope_dr": new.estimate, "ope_dr_lower": new.lower, "ope_dr_upper": new.upper,
                   "ope_baseline": current_value, **(metrics or {})}
    artifact = publish_policy(registry, candidate, metrics=all_metrics, parent=current_version)
    update = registry.announcement(artifact)
    if announce is not None:
        announce(update)
    return PromotionDecision(True, f"published {artifact.version}: the {level} DR lower bound {new.lower:.4f} "
                                   f"reaches {against} {current_value:.4f}", new, current_value, current_version,
                             artifact, update)
