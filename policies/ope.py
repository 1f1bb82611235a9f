"""Off-policy evaluation: how would a policy have done on logs that another policy collected?

Plain numpy, with the inputs and formulas of the ``obp`` package (Open Bandit Pipeline), so
results can be checked against it to 1e-9 (``tests/data/ope/`` holds obp's own outputs):

* ``reward``, ``action``, ``pscore`` (the logging policy's probability of the logged action) and
  optionally ``position`` (0-based slot), one entry per logged round, shape ``(n,)``;
* ``action_dist``: the evaluation policy's probabilities, shape ``(n, n_actions, len_list)``,
  ``action_dist[i, a, k]`` = P(action ``a`` at position ``k`` in round ``i``). A policy that
  outputs one distribution per round (``(n, n_actions)``) goes through
  :func:`action_dist_from_probabilities`; a context-free one (``(n_actions, len_list)``) through
  :func:`context_free_action_dist`;
* ``estimated_rewards_by_reg_model``: a reward model's ``q(x_i, a, k)``, same shape as
  ``action_dist``, for the direct method and doubly robust (:func:`estimate_rewards_by_regression`
  gives a cross-fitted logistic regression).

Estimators (each returns a float): :func:`direct_method`, :func:`inverse_propensity_score`
(optionally clipped), :func:`self_normalized_ips`, :func:`doubly_robust` (optionally clipped),
:func:`switch_doubly_robust`, :func:`self_normalized_doubly_robust`. :func:`estimate_interval`
adds a bootstrap confidence interval that reproduces obp's ``estimate_interval`` for the same
seed; :func:`evaluate_policy` runs several estimators at once.

>>> action = np.array([0, 1, 1, 0]); reward = np.array([1.0, 0.0, 1.0, 0.0])
>>> pscore = np.full(4, 0.5)                       # logged by a uniform policy over 2 actions
>>> always_1 = action_dist_from_probabilities(np.tile([0.0, 1.0], (4, 1)))
>>> inverse_propensity_score(reward, action, pscore, always_1)
0.5
>>> q_hat = np.tile([[[0.6], [0.4]]], (4, 1, 1))   # a reward model: action 1 clicks 40% of the time
>>> round(doubly_robust(reward, action, pscore, always_1, q_hat), 6)
0.5
>>> ci = estimate_interval("ips", reward=reward, action=action, pscore=pscore, action_dist=always_1,
...                        n_bootstrap=200, seed=0)
>>> ci.lower <= ci.estimate <= ci.upper
True

The Open Bandit protocol (:func:`open_bandit_protocol`) estimates the Bernoulli Thompson sampling
policy's CTR from the uniform-random logs of the Open Bandit Dataset sample shipped in
``streaming/data/open_bandit`` and compares it with the CTR that policy obtained in its own logs.
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

EstimatorName = Literal["dm", "ips", "snips", "dr", "switch-dr", "sndr"]
ESTIMATORS: tuple[EstimatorName, ...] = ("dm", "ips", "snips", "dr", "switch-dr", "sndr")
_NEEDS_REWARD_MODEL = {"dm", "dr", "switch-dr", "sndr"}
_NEEDS_LOGS = {"ips", "snips", "dr", "switch-dr", "sndr"}

OPEN_BANDIT_DIR = Path(__file__).resolve().parent.parent / "streaming" / "data" / "open_bandit"


class OPEInputError(ValueError):
    """Inputs to an estimator that do not fit together (shapes, ranges, probabilities)."""


# -- action distributions -------------------------------------------------------------------------

def action_dist_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """``(n, n_actions)`` per-round action probabilities as obp's ``(n, n_actions, 1)``.

    >>> action_dist_from_probabilities(np.array([[0.2, 0.8]])).shape
    (1, 2, 1)
    """
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2:
        raise OPEInputError(f"probabilities must have shape (n_rounds, n_actions), got {probabilities.shape}")
    return probabilities[:, :, None]


def context_free_action_dist(probabilities: np.ndarray, n_rounds: int) -> np.ndarray:
    """A context-free policy's ``(n_actions, len_list)`` probabilities repeated for ``n_rounds``.

    Returns a read-only broadcast view (no copy), shape ``(n_rounds, n_actions, len_list)``.

    >>> context_free_action_dist(np.array([[0.5], [0.5]]), n_rounds=3).shape
    (3, 2, 1)
    """
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim == 1:
        probabilities = probabilities[:, None]
    if probabilities.ndim != 2:
        raise OPEInputError(f"probabilities must have shape (n_actions, len_list), got {probabilities.shape}")
    return np.broadcast_to(probabilities, (n_rounds, *probabilities.shape))


# -- input checks ---------------------------------------------------------------------------------

def _check_1d(name: str, array: np.ndarray | None, n: int | None) -> None:
    if array is None:
        raise OPEInputError(f"{name} is required for this estimator")
    if array.ndim != 1:
        raise OPEInputError(f"{name} must be 1-dimensional, got shape {array.shape}")
    if n is not None and array.shape[0] != n:
        raise OPEInputError(f"{name} has {array.shape[0]} rounds but action_dist has {n}")


def _check_inputs(
    action_dist: np.ndarray,
    position: np.ndarray | None,
    reward: np.ndarray | None = None,
    action: np.ndarray | None = None,
    pscore: np.ndarray | None = None,
    estimated_rewards_by_reg_model: np.ndarray | None = None,
    needs_logs: bool = True,
    needs_reward_model: bool = False,
) -> None:
    if action_dist.ndim != 3:
        raise OPEInputError(
            f"action_dist must have shape (n_rounds, n_actions, len_list), got {action_dist.shape}; "
            "use action_dist_from_probabilities or context_free_action_dist to adapt a 2-D array")
    n, n_actions, len_list = action_dist.shape
    # a context-free policy broadcast over rounds (stride 0) needs checking once, not n times
    distinct = action_dist[:1] if action_dist.strides[0] == 0 else action_dist
    if not np.allclose(distinct.sum(axis=1), 1.0):
        raise OPEInputError("action_dist must sum to 1 over actions (axis 1) for every round and position")
    if np.any(distinct < 0):
        raise OPEInputError("action_dist has negative probabilities")
    if position is not None:
        _check_1d("position", position, n)
        if not np.issubdtype(position.dtype, np.integer) or position.min() < 0 or position.max() >= len_list:
            raise OPEInputError(f"position must hold integers in [0, {len_list}) (len_list of action_dist)")
    elif len_list != 1:
        raise OPEInputError(f"position is required when action_dist has len_list={len_list} > 1")
    if needs_logs:
        _check_1d("reward", reward, n)
        _check_1d("action", action, n)
        _check_1d("pscore", pscore, n)
        if not np.issubdtype(action.dtype, np.integer) or action.min() < 0 or action.max() >= n_actions:
            raise OPEInputError(f"action must hold integers in [0, {n_actions}) (n_actions of action_dist)")
        if np.any(pscore <= 0):
            raise OPEInputError("pscore (the logging policy's propensities) must be > 0")
    if needs_reward_model:
        if estimated_rewards_by_reg_model is None:
            raise OPEInputError("estimated_rewards_by_reg_model is required for DM and DR estimators; "
                                "see estimate_rewards_by_regression")
        if estimated_rewards_by_reg_model.shape != action_dist.shape:
            raise OPEInputError(f"estimated_rewards_by_reg_model has shape {estimated_rewards_by_reg_model.shape}, "
                                f"action_dist has {action_dist.shape}; they must match")


def _positions(position: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, dtype=int) if position is None else position


def _as_float(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.asarray(array, dtype=float)


def _as_int(array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    array = np.asarray(array)
    if array.dtype.kind == "f" and np.all(array == np.round(array)):
        array = array.astype(int)
    return array


# -- round-wise rewards (the terms each estimator averages) ---------------------------------------

def _importance_weights(action, pscore, action_dist, position) -> np.ndarray:
    return action_dist[np.arange(action.shape[0]), action, position] / pscore


def _dm_terms(action_dist, q_hat, position) -> np.ndarray:
    n = position.shape[0]
    rows = np.arange(n)
    # np.average (not a plain dot product) to match obp bit for bit
    return np.average(q_hat[rows, :, position], weights=action_dist[rows, :, position], axis=1)


def round_rewards(
    estimator: EstimatorName,
    *,
    action_dist: np.ndarray,
    reward: np.ndarray | None = None,
    action: np.ndarray | None = None,
    pscore: np.ndarray | None = None,
    position: np.ndarray | None = None,
    estimated_rewards_by_reg_model: np.ndarray | None = None,
    clip: float = np.inf,
    switch_threshold: float = np.inf,
) -> np.ndarray:
    """The per-round terms whose mean is ``estimator``'s estimate (obp's ``_estimate_round_rewards``).

    ``clip`` caps importance weights for ``ips`` and ``dr`` (obp's ``lambda_``); ``switch_threshold``
    is switch-DR's threshold (rounds with a weight above it fall back to the reward model).
    """
    if estimator not in ESTIMATORS:
        raise OPEInputError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    action_dist = np.asarray(action_dist, dtype=float)
    reward, pscore = _as_float(reward), _as_float(pscore)
    action, position = _as_int(action), _as_int(position)
    q_hat = _as_float(estimated_rewards_by_reg_model)
    if not clip >= 0 or not switch_threshold >= 0:
        raise OPEInputError("clip and switch_threshold must be >= 0 (np.inf: no clipping / switching)")
    _check_inputs(action_dist, position, reward, action, pscore, q_hat,
                  needs_logs=estimator in _NEEDS_LOGS, needs_reward_model=estimator in _NEEDS_REWARD_MODEL)
    position = _positions(position, action_dist.shape[0])
    if estimator == "dm":
        return _dm_terms(action_dist, q_hat, position)
    iw = _importance_weights(action, pscore, action_dist, position)
    if estimator == "ips":
        return reward * np.minimum(iw, clip)
    if estimator == "snips":
        return reward * iw / iw.mean()
    rows = np.arange(action.shape[0])
    residual = reward - q_hat[rows, action, position]
    terms = _dm_terms(action_dist, q_hat, position)
    if estimator == "dr":
        return terms + np.minimum(iw, clip) * residual
    if estimator == "switch-dr":
        return terms + (iw <= switch_threshold).astype(int) * iw * residual
    return terms + iw * residual / iw.mean()  # sndr


# -- point estimates ------------------------------------------------------------------------------

def direct_method(action_dist: np.ndarray, estimated_rewards_by_reg_model: np.ndarray,
                  position: np.ndarray | None = None) -> float:
    """DM: ``mean_i sum_a pi_e(a|x_i) q_hat(x_i, a)`` at each round's position."""
    return float(round_rewards("dm", action_dist=action_dist, position=position,
                               estimated_rewards_by_reg_model=estimated_rewards_by_reg_model).mean())


def inverse_propensity_score(reward: np.ndarray, action: np.ndarray, pscore: np.ndarray, action_dist: np.ndarray,
                             position: np.ndarray | None = None, *, clip: float = np.inf) -> float:
    """IPS: ``mean_i min(w_i, clip) r_i`` with ``w_i = pi_e(a_i|x_i) / pscore_i``; unbiased when unclipped."""
    return float(round_rewards("ips", reward=reward, action=action, pscore=pscore, action_dist=action_dist,
                               position=position, clip=clip).mean())


def self_normalized_ips(reward: np.ndarray, action: np.ndarray, pscore: np.ndarray, action_dist: np.ndarray,
                        position: np.ndarray | None = None) -> float:
    """SNIPS: ``sum_i w_i r_i / sum_i w_i``; invariant to scaling the weights, consistent, slightly biased."""
    return float(round_rewards("snips", reward=reward, action=action, pscore=pscore, action_dist=action_dist,
                               position=position).mean())


def doubly_robust(reward: np.ndarray, action: np.ndarray, pscore: np.ndarray, action_dist: np.ndarray,
                  estimated_rewards_by_reg_model: np.ndarray, position: np.ndarray | None = None, *,
                  clip: float = np.inf) -> float:
    """DR: DM plus the importance-weighted residual ``min(w_i, clip) (r_i - q_hat(x_i, a_i))``."""
    return float(round_rewards("dr", reward=reward, action=action, pscore=pscore, action_dist=action_dist,
                               position=position, estimated_rewards_by_reg_model=estimated_rewards_by_reg_model,
                               clip=clip).mean())


def switch_doubly_robust(reward: np.ndarray, action: np.ndarray, pscore: np.ndarray, action_dist: np.ndarray,
                         estimated_rewards_by_reg_model: np.ndarray, position: np.ndarray | None = None, *,
                         switch_threshold: float = np.inf) -> float:
    """Switch-DR: DR's correction only where ``w_i <= switch_threshold``, plain DM elsewhere."""
    return float(round_rewards("switch-dr", reward=reward, action=action, pscore=pscore, action_dist=action_dist,
                               position=position, estimated_rewards_by_reg_model=estimated_rewards_by_reg_model,
                               switch_threshold=switch_threshold).mean())


def self_normalized_doubly_robust(reward: np.ndarray, action: np.ndarray, pscore: np.ndarray,
                                  action_dist: np.ndarray, estimated_rewards_by_reg_model: np.ndarray,
                                  position: np.ndarray | None = None) -> float:
    """SNDR: DR with the residual weights normalised by their mean."""
    return float(round_rewards("sndr", reward=reward, action=action, pscore=pscore, action_dist=action_dist,
                               position=position, estimated_rewards_by_reg_model=estimated_rewards_by_reg_model).mean())


def estimate_policy_value(estimator: EstimatorName, **inputs) -> float:
    """Any estimator by name; ``inputs`` are :func:`round_rewards`' keyword arguments."""
    return float(round_rewards(estimator, **inputs).mean())


# -- confidence intervals -------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfidenceInterval:
    """A point estimate with its bootstrap interval (obp's ``estimate_interval`` plus the estimate)."""

    estimator: str
    estimate: float          # the estimator's value on the full sample
    mean: float              # mean of the bootstrap replicates (obp's "mean")
    lower: float
    upper: float
    alpha: float
    n_bootstrap: int

    def to_obp(self) -> dict[str, float]:
        """The dict obp's ``estimate_interval`` returns."""
        level = 100 * (1.0 - self.alpha)
        return {"mean": self.mean, f"{level}% CI (lower)": self.lower, f"{level}% CI (upper)": self.upper}

    def relative_error(self, truth: float) -> float:
        return abs(self.estimate - truth) / abs(truth)


def bootstrap_interval(samples: np.ndarray, *, alpha: float = 0.05, n_bootstrap: int = 10_000,
                       seed: int | None = None) -> tuple[float, float, float]:
    """``(mean, lower, upper)`` of the mean of ``samples`` by the percentile bootstrap.

    Resamples with ``np.random.RandomState(seed)`` in the same order as obp's
    ``estimate_confidence_interval_by_bootstrap``, so the same seed gives obp's numbers.

    >>> bootstrap_interval(np.arange(10.0), n_bootstrap=500, seed=1)[1] < 4.5 < bootstrap_interval(
    ...     np.arange(10.0), n_bootstrap=500, seed=1)[2]
    True
    """
    samples = np.asarray(samples, dtype=float)
    if samples.ndim != 1 or samples.shape[0] == 0:
        raise OPEInputError(f"samples must be a non-empty 1-D array, got shape {samples.shape}")
    if not 0.0 < alpha < 1.0:
        raise OPEInputError(f"alpha must be in (0, 1), got {alpha}")
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 1:
        raise OPEInputError(f"n_bootstrap must be a positive integer, got {n_bootstrap}")
    random = np.random.RandomState(seed)
    n = samples.shape[0]
    means = np.empty(int(n_bootstrap))
    chunk = max(1, 2_000_000 // n)  # the legacy stream is sequential, so chunked draws equal obp's loop
    for start in range(0, int(n_bootstrap), chunk):
        stop = min(int(n_bootstrap), start + chunk)
        idx = random.randint(0, n, size=(stop - start, n))
        means[start:stop] = samples[idx].mean(axis=1)
    lower = np.percentile(means, 100 * (alpha / 2))
    upper = np.percentile(means, 100 * (1.0 - alpha / 2))
    return float(np.mean(means)), float(lower), float(upper)


def estimate_interval(estimator: EstimatorName, *, alpha: float = 0.05, n_bootstrap: int = 10_000,
                      seed: int | None = None, **inputs) -> ConfidenceInterval:
    """``estimator``'s estimate and a ``1 - alpha`` bootstrap interval over logged rounds.

    As in obp, the round-wise terms are computed once on the full sample and resampled (for SNIPS
    and SNDR the normalising mean weight is the full sample's).
    """
    terms = round_rewards(estimator, **inputs)
    mean, lower, upper = bootstrap_interval(terms, alpha=alpha, n_bootstrap=n_bootstrap, seed=seed)
    return ConfidenceInterval(estimator=estimator, estimate=float(terms.mean()), mean=mean, lower=lower,
                              upper=upper, alpha=alpha, n_bootstrap=int(n_bootstrap))


def evaluate_policy(
    feedback: "BanditFeedback",
    action_dist: np.ndarray,
    estimated_rewards_by_reg_model: np.ndarray | None = None,
    *,
    estimators: Sequence[EstimatorName] = ("dm", "ips", "snips", "dr"),
    alpha: float = 0.05,
    n_bootstrap: int = 10_000,
    seed: int | None = 0,
    clip: float = np.inf,
    switch_threshold: float = np.inf,
) -> dict[str, ConfidenceInterval]:
    """Every estimator in ``estimators`` with its interval, on ``feedback``'s logged rounds."""
    inputs = dict(reward=feedback.reward, action=feedback.action, pscore=feedback.pscore,
                  position=feedback.position, action_dist=action_dist,
                  estimated_rewards_by_reg_model=estimated_rewards_by_reg_model,
                  clip=clip, switch_threshold=switch_threshold)
    return {name: estimate_interval(name, alpha=alpha, n_bootstrap=n_bootstrap, seed=seed, **inputs)
            for name in estimators}


# -- reward model for DM / DR ---------------------------------------------------------------------

def fit_logistic_regression(features: np.ndarray, target: np.ndarray, *, l2: float = 1.0,
                            max_iter: int = 50, tol: float = 1e-10) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method; returns weights, intercept last.

    The intercept is not penalised. Deterministic: the same inputs give the same weights.

    >>> x = np.array([[0.0], [0.0], [1.0], [1.0]]); y = np.array([0.0, 1.0, 1.0, 1.0])
    >>> w = fit_logistic_regression(x, y, l2=1e-6)
    >>> [round(float(p), 3) for p in predict_logistic(w, np.array([[0.0], [1.0]]))]
    [0.5, 1.0]
    """
    features = np.asarray(features, dtype=float)
    target = np.asarray(target, dtype=float)
    design = np.hstack([features, np.ones((features.shape[0], 1))])
    d = design.shape[1]
    penalty = np.full(d, float(l2))
    penalty[-1] = 0.0
    weights = np.zeros(d)
    rate = np.clip(target.mean(), 1e-6, 1 - 1e-6)
    weights[-1] = np.log(rate / (1 - rate))
    for _ in range(max_iter):
        p = _sigmoid(design @ weights)
        # einsum, not BLAS: these matrices are small, and threaded BLAS stalls on a busy machine
        gradient = np.einsum("nd,n->d", design, p - target) + penalty * weights
        hessian = np.einsum("ni,nj->ij", design * (p * (1 - p))[:, None], design) + np.diag(penalty) + 1e-12 * np.eye(d)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.max(np.abs(step)) < tol:
            break
    return weights


def predict_logistic(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    return _sigmoid(np.asarray(features, dtype=float) @ weights[:-1] + weights[-1])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def estimate_rewards_by_regression(
    context: np.ndarray,
    action: np.ndarray,
    reward: np.ndarray,
    n_actions: int,
    position: np.ndarray | None = None,
    len_list: int = 1,
    *,
    n_folds: int = 3,
    l2: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Cross-fitted ``q_hat(x_i, a, k)`` for every round, action and position: ``(n, n_actions, len_list)``.

    The model is a logistic regression on the round's context, a one-hot of the item (action) and
    a one-hot of the position (additive logits). With ``n_folds > 1`` each round's estimates come
    from a model fitted on the other folds (cross-fitting, as obp's ``RegressionModel.fit_predict``),
    so DR's correction term is not fitted to its own residuals.
    """
    context = np.asarray(context, dtype=float)
    if context.ndim == 1:
        context = context[:, None]
    action = _as_int(action)
    reward = np.asarray(reward, dtype=float)
    n = action.shape[0]
    position = _positions(_as_int(position), n)
    if context.shape[0] != n or reward.shape[0] != n or position.shape[0] != n:
        raise OPEInputError("context, action, reward and position must have one entry per round")
    if n_folds < 1 or n_folds > n:
        raise OPEInputError(f"n_folds must be between 1 and the number of rounds ({n}), got {n_folds}")
    d_x = context.shape[1]

    def features(rows: np.ndarray) -> np.ndarray:
        one_hot_action = np.eye(n_actions)[action[rows]]
        one_hot_position = np.eye(len_list)[position[rows]][:, 1:]  # first position is the baseline
        return np.hstack([context[rows], one_hot_action, one_hot_position])

    def predict_all(weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
        w_x, w_a, w_p, bias = weights[:d_x], weights[d_x:d_x + n_actions], weights[d_x + n_actions:-1], weights[-1]
        w_pos = np.concatenate([[0.0], w_p])
        logits = (context[rows] @ w_x)[:, None, None] + w_a[None, :, None] + w_pos[None, None, :] + bias
        return _sigmoid(logits)

    out = np.empty((n, n_actions, len_list))
    if n_folds == 1:
        every = np.arange(n)
        out[:] = predict_all(fit_logistic_regression(features(every), reward, l2=l2), every)
        return out
    folds = np.array_split(np.random.default_rng(seed).permutation(n), n_folds)
    for k, held_out in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        weights = fit_logistic_regression(features(train), reward[train], l2=l2)
        out[held_out] = predict_all(weights, held_out)
    return out


# -- Open Bandit Dataset --------------------------------------------------------------------------

@dataclass(frozen=True)
class BanditFeedback:
    """Logged bandit rounds in obp's layout (``obtain_batch_bandit_feedback``), sorted by time."""

    policy: str
    action: np.ndarray          # (n,) item index
    position: np.ndarray        # (n,) 0-based slot
    reward: np.ndarray          # (n,) click 0/1
    pscore: np.ndarray          # (n,) the logging policy's propensity of the logged action
    context: np.ndarray         # (n, d) one-hot user features (first category of each dropped)
    action_context: np.ndarray  # (n_actions, 4) label-encoded item features 1..3, then item_feature_0
    timestamp: np.ndarray = field(repr=False)  # (n,) ISO strings as in the file
    n_actions: int = 0
    len_list: int = 0

    @property
    def n_rounds(self) -> int:
        return int(self.action.shape[0])

    def on_policy_value(self) -> float:
        """The logging policy's own value: its mean reward (obp's ``calc_on_policy_policy_value_estimate``)."""
        return float(self.reward.mean())


def load_open_bandit(policy: Literal["random", "bts"], campaign: str = "all",
                     data_dir: str | Path = OPEN_BANDIT_DIR) -> BanditFeedback:
    """Read ``{data_dir}/{policy}/{campaign}/{campaign}.csv[.gz]`` and its ``item_context.csv``.

    Same arrays as obp's ``OpenBanditDataset(...).obtain_batch_bandit_feedback()``: rows sorted by
    timestamp, dense-ranked 0-based positions, ``click`` as reward, ``propensity_score`` as pscore.

    >>> logs = load_open_bandit("random")
    >>> logs.n_rounds, logs.n_actions, logs.len_list, float(logs.pscore[0])
    (10000, 80, 3, 0.0125)
    """
    folder = Path(data_dir) / policy / campaign
    candidates = [folder / f"{campaign}.csv", folder / f"{campaign}.csv.gz"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise FileNotFoundError(f"no Open Bandit log at {candidates[0]} or {candidates[1]}; "
                                f"data_dir should hold <policy>/<campaign>/<campaign>.csv[.gz]")
    table = _read_csv(path)
    names = table.column_names
    required = {"timestamp", "item_id", "position", "click", "propensity_score"}
    if not required <= set(names):
        raise OPEInputError(f"{path} is not an Open Bandit log: missing columns {sorted(required - set(names))}")
    timestamp = np.asarray(table.column("timestamp").to_pylist(), dtype=object)
    order = np.argsort(timestamp.astype(str), kind="stable")
    raw_position = np.asarray(table.column("position").to_numpy(), dtype=np.int64)[order]
    position = np.unique(raw_position, return_inverse=True)[1].astype(int)  # dense rank, 0-based
    user_columns = [c for c in names if c.startswith("user_feature")]
    context = np.hstack([_one_hot_drop_first(np.asarray(table.column(c).to_pylist(), dtype=str)[order])
                         for c in user_columns]) if user_columns else np.empty((len(order), 0))
    action = np.asarray(table.column("item_id").to_numpy(), dtype=np.int64)[order]
    items = _read_csv(folder / "item_context.csv")
    action_context = _item_context(items)
    return BanditFeedback(
        policy=policy,
        action=action,
        position=position,
        reward=np.asarray(table.column("click").to_numpy(), dtype=np.int64)[order],
        pscore=np.asarray(table.column("propensity_score").to_numpy(), dtype=float)[order],
        context=context,
        action_context=action_context,
        timestamp=timestamp[order],
        n_actions=int(action.max() + 1),
        len_list=int(position.max() + 1),
    )


def _read_csv(path: Path) -> pa.Table:
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
        columns = f.readline().decode("utf-8").strip().split(",")
    string_columns = {c: pa.string() for c in columns
                      if c == "timestamp" or c.startswith(("user_feature", "item_feature_1", "item_feature_2",
                                                           "item_feature_3"))}
    return pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types=string_columns))


def _one_hot_drop_first(values: np.ndarray) -> np.ndarray:
    categories, codes = np.unique(values, return_inverse=True)
    return (codes[:, None] == np.arange(1, len(categories))[None, :]).astype(float)


def _item_context(items: pa.Table) -> np.ndarray:
    item_id = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
    if not np.array_equal(item_id, np.arange(len(item_id))):
        raise OPEInputError("item_context.csv must list item_id 0..n_items-1 in order")
    categorical = [c for c in items.column_names if c.startswith("item_feature_") and c != "item_feature_0"]
    encoded = [np.unique(np.asarray(items.column(c).to_pylist(), dtype=str), return_inverse=True)[1]
               for c in categorical]
    return np.column_stack([*encoded, np.asarray(items.column("item_feature_0").to_numpy(), dtype=float)]).astype(float)


# -- the Bernoulli Thompson sampling policy of the Open Bandit Dataset ----------------------------

# The Beta prior ZOZOTOWN's BTS policy ran with in the "all" campaign, from obp's
# policy/conf/prior_bts.yaml (Copyright ZOZO Technologies, Apache License 2.0).
ZOZOTOWN_BTS_PRIOR_ALL_ALPHA = np.array([
    47, 8, 62, 142, 3, 14, 7, 857, 12, 15, 6, 100, 48, 23, 71, 61, 13, 16, 518, 30, 7, 4, 23, 8, 10, 11, 11,
    18, 121, 11, 11, 10, 14, 9, 204, 58, 3, 19, 42, 1013, 2, 328, 15, 31, 14, 138, 45, 55, 23, 38, 10, 401,
    52, 6, 3, 6, 5, 32, 35, 133, 52, 820, 43, 195, 8, 42, 40, 4, 32, 30, 9, 22, 6, 23, 5, 54, 8, 22, 65, 246,
], dtype=float)
ZOZOTOWN_BTS_PRIOR_ALL_BETA = np.array([
    12198, 3566, 15993, 35522, 2367, 4609, 3171, 181745, 4372, 4951, 3100, 24665, 13210, 7061, 18061, 17449,
    5644, 6787, 111326, 8776, 3334, 2271, 7389, 2659, 3665, 4724, 3561, 5085, 27407, 4601, 4756, 4120, 4736,
    3788, 45292, 14719, 2189, 5589, 11995, 222255, 2308, 70034, 4801, 8274, 5421, 31912, 12213, 13576, 6230,
    10382, 4141, 85731, 12811, 2707, 2250, 2668, 2886, 9581, 9465, 28336, 12062, 162793, 12107, 41240, 3162,
    11604, 10818, 2923, 8897, 8654, 4000, 6580, 3174, 6766, 2602, 14506, 3968, 7523, 16532, 51964,
], dtype=float)


def bernoulli_ts_action_dist(alpha: np.ndarray = ZOZOTOWN_BTS_PRIOR_ALL_ALPHA,
                             beta: np.ndarray = ZOZOTOWN_BTS_PRIOR_ALL_BETA, *, len_list: int = 3,
                             n_sim: int = 100_000, seed: int | None = 12345) -> np.ndarray:
    """Monte-Carlo ``(n_actions, len_list)`` slot probabilities of Bernoulli Thompson sampling.

    Each simulation draws ``theta_a ~ Beta(alpha_a, beta_a)`` and ranks items by ``theta``; slot
    ``k`` gets the ``k``-th best. Same draws as obp's ``BernoulliTS(..., random_state=seed)
    .compute_batch_action_dist(n_sim=n_sim)`` (before any update), so the same seed gives obp's
    array. Feed it to :func:`context_free_action_dist`.

    >>> dist = bernoulli_ts_action_dist(n_sim=1000, seed=0)
    >>> dist.shape, bool(np.allclose(dist.sum(axis=0), 1.0))
    ((80, 3), True)
    """
    alpha = np.asarray(alpha, dtype=float)
    beta = np.asarray(beta, dtype=float)
    n_actions = alpha.shape[0]
    if beta.shape != alpha.shape or not 1 <= len_list <= n_actions:
        raise OPEInputError("alpha and beta need one entry per action and 1 <= len_list <= n_actions")
    random = np.random.RandomState(seed)
    counts = np.zeros((n_actions, len_list))
    chunk = 10_000
    for start in range(0, n_sim, chunk):
        size = min(chunk, n_sim - start)
        theta = random.beta(alpha, beta, size=(size, n_actions))
        ranked = np.argsort(theta, axis=1)[:, ::-1][:, :len_list]  # obp: argsort()[::-1][:len_list]
        for k in range(len_list):
            counts[:, k] += np.bincount(ranked[:, k], minlength=n_actions)
    return counts / n_sim


# -- the standard protocol ------------------------------------------------------------------------

@dataclass(frozen=True)
class ProtocolEstimate:
    interval: ConfidenceInterval
    relative_error: float       # |estimate - on-policy value| / on-policy value
    seconds: float              # time for the estimate and its interval


@dataclass(frozen=True)
class ProtocolResult:
    """The Open Bandit protocol: BTS's value estimated from the random logs vs. its own logs."""

    on_policy_value: float      # BTS's observed CTR in its own logs (the ground truth)
    logging_value: float        # the random policy's CTR
    estimates: dict[str, ProtocolEstimate]
    reward_model_seconds: float
    action_dist_seconds: float


def open_bandit_protocol(
    data_dir: str | Path = OPEN_BANDIT_DIR,
    *,
    estimators: Sequence[EstimatorName] = ("dm", "ips", "snips", "dr"),
    campaign: str = "all",
    n_sim: int = 100_000,
    seed: int = 12345,
    n_bootstrap: int = 1_000,
    alpha: float = 0.05,
    n_folds: int = 3,
    l2: float = 1.0,
) -> ProtocolResult:
    """Estimate BTS's CTR from the uniform-random logs and compare with BTS's observed CTR."""
    if campaign != "all":
        raise OPEInputError("only the 'all' campaign's BTS prior is shipped; use campaign='all'")
    logs = load_open_bandit("random", campaign, data_dir)
    truth = load_open_bandit("bts", campaign, data_dir).on_policy_value()
    started = time.perf_counter()
    action_dist = context_free_action_dist(
        bernoulli_ts_action_dist(len_list=logs.len_list, n_sim=n_sim, seed=seed), logs.n_rounds)
    action_dist_seconds = time.perf_counter() - started
    started = time.perf_counter()
    q_hat = None
    if _NEEDS_REWARD_MODEL & set(estimators):
        q_hat = estimate_rewards_by_regression(logs.context, logs.action, logs.reward, logs.n_actions,
                                               logs.position, logs.len_list, n_folds=n_folds, l2=l2, seed=seed)
    reward_model_seconds = time.perf_counter() - started
    estimates = {}
    for name in estimators:
        started = time.perf_counter()
        interval = evaluate_policy(logs, action_dist, q_hat, estimators=(name,), alpha=alpha,
                                   n_bootstrap=n_bootstrap, seed=seed)[name]
        estimates[name] = ProtocolEstimate(interval, interval.relative_error(truth), time.perf_counter() - started)
    return ProtocolResult(on_policy_value=truth, logging_value=logs.on_policy_value(), estimates=estimates,
                          reward_model_seconds=reward_model_seconds, action_dist_seconds=action_dist_seconds)
