"""``streamrec demo --open-bandit``: learn from the Open Bandit sample, then estimate the learned policies off-policy.

The uniform-random logs of the Open Bandit Dataset sample (``streaming/data/open_bandit/random``:
10,000 impressions of 80 fashion items in 3 slots, 38 clicks) are replayed in event-time order
through the in-process event path: :func:`streaming.event_log.read_open_bandit` turns the CSV into
``Item``, ``Impression`` and ``Click`` events, :func:`streaming.replay.replay_in_process` orders
them, the label joiner (:class:`streaming.joiner.LabelJoiner`, the one the stream processor and
the Faust worker run) turns them into labelled ``Example`` s, and the learner's
:class:`~learner.trainer.IncrementalTrainer` learns pCTR (test-then-train) from the examples of
the first ``train_fraction`` of the log in time. The rest is held out.

Learned policies, all StreamRec :class:`~policies.export.ServingPolicy` objects that rank the 80
items once and fill the 3 slots in rank order with epsilon exploration (each slot: the best
remaining item with probability ``1 - epsilon``, else a uniformly random remaining one, as
:meth:`ServingPolicy.sample_slate` serves them):

* ``greedy-pctr``: ranks by the learner's pCTR for the round's user;
* ``marwil`` (optional, RLlib offline): a candidate scorer trained with MARWIL on the training
  rounds (candidate features: the learner's pCTR and the item's numeric feature).

Held-out rounds are the logged bandit feedback: each round is one (user, slot, item, click) with
the uniform logging propensity 1/80. As in :mod:`policies.ope` and obp, a policy's distribution
is per slot, ``action_dist[i, a, k]`` = P(item ``a`` in slot ``k``), and each round is scored at
its own slot. Every policy gets DM, IPS, SNIPS and DR with bootstrap intervals; DM and DR use the
cross-fitted logistic regression of :func:`policies.ope.estimate_rewards_by_regression` fitted on
the held-out rounds (independent of the learner). Next to them: the logging policy's observed CTR,
the Bernoulli Thompson sampling policy (ZOZOTOWN's prior) evaluated on the same rounds, and the
standard protocol (:func:`policies.ope.open_bandit_protocol`: BTS's CTR estimated from all random
logs vs. observed in its own logs).

A policy that is close to deterministic is only seen in the held-out rounds where the uniform
logger happened to show its choice (about 1 in 80); with ~10 held-out clicks the estimators then
rest on very few clicks, which the diagnostics (matched rounds and clicks, effective sample size)
make visible.

>>> slot_marginals(4, 2, epsilon=1.0).round(3).tolist()  # uniform: every rank equally likely in each slot
[[0.25, 0.25], [0.25, 0.25], [0.25, 0.25], [0.25, 0.25]]
>>> m = slot_marginals(80, 3, epsilon=0.1)
>>> bool(np.allclose(m.sum(axis=0), 1.0)), round(float(m[0, 0]), 5), round(float(m[1, 1]), 5)
(True, 0.90125, 0.81239)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.export import ServingPolicy, greedy_policy
from policies.ope import (
    OPEN_BANDIT_DIR, BanditFeedback, ConfidenceInterval, EstimatorName, bernoulli_ts_action_dist, bootstrap_interval,
    context_free_action_dist, estimate_interval, estimate_rewards_by_regression, open_bandit_protocol,
)
from streaming.events import Click, Event, Example, Impression, Item
from streaming.joiner import JoinerConfig, LabelJoiner

Progress = Callable[[str, int, int | None], None]  # (stage, done, total)
PROTOCOL_SEED = 12345  # open_bandit_protocol's default seed, so the protocol line is the one policies/ope.py reports
MARWIL_FEATURES = ("pctr", "item_feature_0")


class OpenBanditDemoConfig(BaseModel):
    """What one run does; ``streamrec demo --open-bandit`` sets the fields it has flags for."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(default=OPEN_BANDIT_DIR, description="holds <policy>/<campaign>/<campaign>.csv[.gz]")
    campaign: str = "all"
    rounds: int | None = Field(default=None, ge=100, description="replay only the first N rounds (time order)")
    train_fraction: float = Field(default=0.7, gt=0, lt=1, description="learn from this first share of the log in time")
    seed: int = 0
    model: str = Field(default="tiny", description="tiny, minilm or a Hugging Face model directory")
    device: str = "cpu"
    batch_size: int = Field(default=128, ge=1, description="examples per gradient step")
    epsilon: float = Field(default=0.1, gt=0, le=1, description="exploration of the learned policies, per slot")
    estimators: tuple[EstimatorName, ...] = ("dm", "ips", "snips", "dr")
    n_bootstrap: int = Field(default=1_000, ge=10)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    bts_n_sim: int = Field(default=100_000, ge=1_000, description="Monte-Carlo draws of BTS's slot probabilities")
    protocol: bool = Field(default=True, description="also run the standard Open Bandit protocol (BTS vs its own logs)")
    marwil: bool = Field(default=True, description="also train an offline RLlib policy (MARWIL) on the training rounds")
    marwil_iterations: int = Field(default=60, ge=1)
    num_cpus: int = Field(default=2, ge=1, description="CPUs of the local Ray for MARWIL")
    torch_threads: int = Field(default=1, ge=1, description="the tiny model gains nothing from threads; "
                                                            "on a busy 2-core machine two are ~20x slower")


@dataclass
class PolicyEvaluation:
    name: str
    description: str
    estimates: dict[str, ConfidenceInterval]
    diagnostics: dict[str, float]


@dataclass
class OpenBanditResult:
    config: OpenBanditDemoConfig
    data: dict[str, Any]
    learner: dict[str, Any]
    logging: ConfidenceInterval                 # the uniform logger's observed CTR on the held-out rounds
    policies: dict[str, PolicyEvaluation]
    protocol: dict[str, Any] | None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    feedback: BanditFeedback | None = field(default=None, repr=False)  # the held-out rounds (not in the JSON)
    log: LearnedLog | None = field(default=None, repr=False)           # examples and trainer (not in the JSON)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": json.loads(self.config.model_dump_json()),
            "data": self.data,
            "learner": self.learner,
            "logging_policy": {"name": "uniform random", **_ci_json(self.logging)},
            "policies": {name: {"description": p.description, "diagnostics": p.diagnostics,
                                "estimates": {k: _ci_json(ci) for k, ci in p.estimates.items()}}
                         for name, p in self.policies.items()},
            "protocol": self.protocol,
            "seconds": self.seconds,
            "notes": self.notes,
        }


def _ci_json(ci: ConfidenceInterval) -> dict[str, float]:
    return {"estimate": ci.estimate, "lower": ci.lower, "upper": ci.upper, "bootstrap_mean": ci.mean,
            "alpha": ci.alpha, "n_bootstrap": ci.n_bootstrap}


# -- the functional core: slates, action distributions, feedback ------------------------------------

def slot_marginals(n_actions: int, len_list: int, epsilon: float) -> np.ndarray:
    """``[rank, slot]``: P(the item ranked ``rank`` lands in ``slot``) under epsilon-greedy slate filling.

    Each slot takes the best remaining item with probability ``1 - epsilon`` and a uniformly random
    remaining item otherwise (:meth:`ServingPolicy.sample_slate` with epsilon exploration). That
    depends on the ranking only, so one exact table serves every round. Columns sum to 1.
    """
    if not 1 <= len_list <= min(n_actions, 4):
        raise ValueError(f"len_list must be between 1 and min(n_actions, 4), got {len_list} for {n_actions} actions")
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    out = np.zeros((n_actions, len_list))

    def fill(chosen: list[int], probability: float) -> None:
        slot = len(chosen)
        remaining = np.ones(n_actions, bool)
        remaining[chosen] = False
        step = np.where(remaining, epsilon / remaining.sum(), 0.0)
        step[int(np.argmax(remaining))] += 1.0 - epsilon  # the best remaining rank
        out[:, slot] += probability * step
        if slot + 1 < len_list:
            for rank in np.flatnonzero(step):
                fill(chosen + [int(rank)], probability * step[rank])

    fill([], 1.0)
    return out


def ranking_action_dist(scores: np.ndarray, len_list: int, epsilon: float) -> np.ndarray:
    """``[n, n_actions]`` scores (higher first) to obp's ``[n, n_actions, len_list]`` epsilon-greedy slates.

    >>> dist = ranking_action_dist(np.array([[0.1, 0.9, 0.5]]), len_list=2, epsilon=0.3)
    >>> dist[0].round(3).tolist()
    [[0.1, 0.135], [0.8, 0.17], [0.1, 0.695]]
    """
    scores = np.asarray(scores, dtype=float)
    n, n_actions = scores.shape
    marginals = slot_marginals(n_actions, len_list, epsilon)
    ranks = np.empty((n, n_actions), dtype=np.int64)
    order = np.argsort(-scores, axis=1, kind="stable")  # ties: the lower index first, as np.argmax in serving
    np.put_along_axis(ranks, order, np.arange(n_actions)[None, :], axis=1)
    return marginals[ranks]


def one_hot_contexts(contexts: Sequence[dict[str, str]]) -> np.ndarray:
    """One-hot user features, the first category of each dropped (as :func:`policies.ope.load_open_bandit`)."""
    if not contexts:
        return np.empty((0, 0))
    names = sorted({k for c in contexts for k in c if k.startswith("user_feature")},
                   key=lambda k: int(k.rsplit("_", 1)[1]) if k.rsplit("_", 1)[1].isdigit() else 0)
    columns = []
    for name in names:
        values = np.array([c.get(name, "") for c in contexts], dtype=str)
        categories, codes = np.unique(values, return_inverse=True)
        columns.append((codes[:, None] == np.arange(1, len(categories))[None, :]).astype(float))
    return np.hstack(columns) if columns else np.empty((len(contexts), 0))


def feedback_from_examples(examples: Sequence[Example], n_actions: int, len_list: int, policy: str = "random") -> BanditFeedback:
    """The joiner's labelled examples as obp-layout logged bandit feedback, in event-time order.

    Items are the Open Bandit item ids (``"0"``..``"79"``), rewards the joined click labels,
    propensities the logged ones.
    """
    ordered = sorted(examples, key=lambda e: (e.impression.event_time, e.impression.request_id))
    impressions = [e.impression for e in ordered]
    return BanditFeedback(
        policy=policy,
        action=np.array([int(i.item_id) for i in impressions], dtype=np.int64),
        position=np.array([i.position for i in impressions], dtype=np.int64),
        reward=np.array([int(e.clicked) for e in ordered], dtype=np.int64),
        pscore=np.array([i.propensity for i in impressions], dtype=float),
        context=one_hot_contexts([i.context for i in impressions]),
        action_context=np.zeros((n_actions, 0)),
        timestamp=np.array([i.event_time for i in impressions], dtype=np.int64),
        n_actions=n_actions,
        len_list=len_list,
    )


def policy_diagnostics(feedback: BanditFeedback, action_dist: np.ndarray) -> dict[str, float]:
    """How much of the held-out data speaks for a policy: weights, effective sample size, matched rounds."""
    rows = np.arange(feedback.n_rounds)
    weights = action_dist[rows, feedback.action, feedback.position] / feedback.pscore
    at_slot = action_dist[rows, :, feedback.position]
    has_favourite = at_slot.max(axis=1) > at_slot.min(axis=1) + 1e-12  # a uniform policy has no first choice
    matched = has_favourite & (at_slot.argmax(axis=1) == feedback.action)
    return {
        "rounds": float(feedback.n_rounds),
        "mean_weight": float(weights.mean()),
        "max_weight": float(weights.max()),
        "effective_sample_size": float(weights.sum() ** 2 / np.square(weights).sum()),
        "matched_rounds": float(matched.sum()) if has_favourite.any() else math.nan,
        "matched_clicks": float(feedback.reward[matched].sum()) if has_favourite.any() else math.nan,
    }


def evaluate(feedback: BanditFeedback, action_dist: np.ndarray, q_hat: np.ndarray | None,
             estimators: Sequence[EstimatorName], *, n_bootstrap: int, alpha: float, seed: int) -> dict[str, ConfidenceInterval]:
    inputs = dict(reward=feedback.reward, action=feedback.action, pscore=feedback.pscore, position=feedback.position,
                  action_dist=action_dist, estimated_rewards_by_reg_model=q_hat)
    return {name: estimate_interval(name, alpha=alpha, n_bootstrap=n_bootstrap, seed=seed, **inputs)
            for name in estimators}


# -- the learner: replay, join, learn, score --------------------------------------------------------

@dataclass
class LearnedLog:
    """What replaying the log through the joiner into the learner produced."""

    trainer: Any                  # learner.trainer.IncrementalTrainer (imported lazily: torch)
    train: list[Example]
    test: list[Example]
    items: list[Item]
    cut_ms: int                   # held-out rounds are the impressions at or after this event time
    events: int
    n_actions: int
    len_list: int


def open_bandit_events(config: OpenBanditDemoConfig, policy: str = "random") -> list[Event]:
    """The log's events (items, impressions, clicks), cut to the first ``config.rounds`` rounds in time."""
    from streaming.event_log import read_events

    folder = Path(config.data_dir) / policy / config.campaign
    path = next((p for p in (folder / f"{config.campaign}.csv", folder / f"{config.campaign}.csv.gz") if p.exists()), None)
    if path is None:
        raise FileNotFoundError(f"no Open Bandit log at {folder}/{config.campaign}.csv[.gz]; --open-bandit reads the "
                                "sample shipped in streaming/data/open_bandit")
    events = list(read_events(path, "obd"))
    if config.rounds is not None:
        impressions = sorted((e for e in events if isinstance(e, Impression)), key=lambda e: e.event_time)
        kept = {e.request_id for e in impressions[: config.rounds]}
        events = [e for e in events if isinstance(e, Item) or e.request_id in kept]  # type: ignore[attr-defined]
    return events


def replay_and_learn(config: OpenBanditDemoConfig, events: list[Event], progress: Progress) -> LearnedLog:
    """Replay in event-time order through the joiner; the learner learns the examples before the cut."""
    import torch

    from learner.config import LearnerSettings
    from learner.trainer import IncrementalTrainer
    from streamrec.closed_loop import model_config
    from streaming.replay import replay_in_process

    impression_times = sorted(e.event_time for e in events if isinstance(e, Impression))
    if len(impression_times) < 20:
        raise ValueError(f"the log has {len(impression_times)} impressions; off-policy evaluation needs more")
    cut_ms = impression_times[min(len(impression_times) - 1, int(len(impression_times) * config.train_fraction))]
    torch.manual_seed(config.seed)
    base = model_config(config.model)
    settings = LearnerSettings(model=base.model_copy(update={"seed": config.seed}), device=config.device,
                               batch_size=config.batch_size, label_delay_ms=0, history_lag_ms=0)
    trainer = IncrementalTrainer(settings)
    # OBD clicks are logged with their impression (the reader puts them 1 ms later) and there are no
    # purchases, so a one-second window attributes every click and settles each example quickly
    joiner = LabelJoiner(JoinerConfig(click_window_ms=1_000, purchase_window_ms=0, allowed_lateness_ms=0))
    train: list[Example] = []
    test: list[Example] = []
    items: list[Item] = []
    pending: list[tuple[None, Event]] = []

    def learn(settled: Iterable[Example]) -> None:
        for example in settled:
            if example.impression.event_time < cut_ms:
                train.append(example)
                pending.append((None, example))
            else:
                test.append(example)
        if len(pending) >= 8 * config.batch_size:
            trainer.learn_events(pending)
            pending.clear()

    total = len(events)
    for done, event in enumerate(replay_in_process(events), 1):
        if isinstance(event, Item):
            items.append(event)
            pending.append((None, event))
        elif isinstance(event, (Impression, Click)):
            result = joiner.process(event)
            if result.late:
                raise RuntimeError(f"{len(result.late)} events arrived behind the watermark in a time-ordered replay")
            learn(result.examples)
        if done % 500 == 0 or done == total:
            progress("replay → joiner → learner", done, total)
    learn(joiner.flush())
    trainer.learn_events(pending)
    for metrics in trainer.metrics.values():
        metrics.flush()
    n_actions = max(int(i.item_id) for i in items) + 1 if items else max(int(e.impression.item_id) for e in train + test) + 1
    len_list = max(e.impression.slate_size for e in train + test)
    return LearnedLog(trainer, train, test, items, cut_ms, total, n_actions, len_list)


def score_users(log: LearnedLog, user_ids: Sequence[str], progress: Progress) -> dict[str, np.ndarray]:
    """The frozen learner's pCTR of every item in every slot for each user: ``{user: [n_actions, len_list]}``.

    The model has learned up to the cut; each user's recent clicks are those before the cut. The
    score then depends on the user, item and slot only, so each user is scored once.
    """
    model = log.trainer.learner.model
    item_ids = [str(a) for a in range(log.n_actions)]
    slots = [k for k in range(log.len_list) for _ in item_ids]
    out = {}
    for done, user in enumerate(user_ids, 1):
        history = log.trainer.learner.history.before(user, log.cut_ms)
        n = len(slots)
        batch = model.make_batch([user] * n, item_ids * log.len_list, slots, [{}] * n, [history] * n)
        out[user] = model.scores(batch)["pctr"].reshape(log.len_list, log.n_actions).T.astype(float)
        if done % 20 == 0 or done == len(user_ids):
            progress("scoring users", done, len(user_ids))
    return out


def item_numeric_feature(config: OpenBanditDemoConfig, n_actions: int) -> np.ndarray:
    """``item_feature_0`` of ``item_context.csv`` (the one numeric item feature) per item id."""
    import csv

    path = Path(config.data_dir) / "random" / config.campaign / "item_context.csv"
    values = np.zeros(n_actions)
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            item = int(row["item_id"])
            if item < n_actions:
                values[item] = float(row["item_feature_0"])
    return values


# -- MARWIL (RLlib, offline) ----------------------------------------------------------------------

def train_marwil(features: np.ndarray, actions: np.ndarray, rewards: np.ndarray, pscore: np.ndarray,
                 config: OpenBanditDemoConfig, workdir: Path, progress: Progress) -> tuple[ServingPolicy, dict[str, Any]]:
    """MARWIL from one-step rounds: ``features`` ``[n, n_actions, F]``, the logged action, its click.

    The transitions go through RLlib's offline API (:func:`policies.train.offline_config`), the
    policy's network is :class:`policies.rl_module.CandidateRankingModule` and what comes back is
    a Ray-free :class:`ServingPolicy` with the demo's epsilon.
    """
    import gc

    import gymnasium as gym
    import ray
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from policies.config import PolicySettings, SessionConfig, TrainSettings
    from policies.env import USER_FEATURES
    from policies.rl_module import CandidateRankingModule, module_config, serving_policy_from_module
    from policies.train import LOG_COLUMNS, OPE_COLUMNS, ensure_ray, offline_config, write_transitions

    n, n_actions, n_features = features.shape
    obs = np.concatenate([features.reshape(n, -1), np.zeros((n, len(USER_FEATURES)))], axis=1).astype(np.float32)
    rows: dict[str, list] = {name: [] for name in (*LOG_COLUMNS, *OPE_COLUMNS)}
    for i in range(n):
        for name, value in (("obs", obs[i]), ("actions", int(actions[i])), ("rewards", float(rewards[i])),
                            ("new_obs", obs[i]), ("terminateds", True), ("truncateds", False), ("eps_id", f"round-{i}"),
                            ("action_prob", float(pscore[i])), ("position", 0), ("estimated_rewards", features[i, :, 0])):
            rows[name].append(value)
    path = workdir / "marwil-transitions.parquet"
    write_transitions(path, rows)
    flat = features.reshape(-1, n_features)
    shift, scale = flat.mean(axis=0).tolist(), np.maximum(flat.std(axis=0), 1e-6).tolist()
    train = TrainSettings(algorithm="marwil", iterations=config.marwil_iterations, seed=config.seed)
    session = SessionConfig(world={"seed": config.seed, "n_users": 10, "n_items": max(n_actions, 10)},
                            n_candidates=n_actions, feature_names=list(MARWIL_FEATURES))
    settings = PolicySettings(session=session, train=train, num_cpus=config.num_cpus,
                              exploration={"kind": "epsilon", "epsilon": config.epsilon})
    spec = RLModuleSpec(module_class=CandidateRankingModule,
                        observation_space=gym.spaces.Box(-np.inf, np.inf, shape=(obs.shape[1],), dtype=np.float32),
                        action_space=gym.spaces.Discrete(n_actions),
                        model_config=module_config(n_actions, n_features, len(USER_FEATURES), train.hidden, shift, scale))
    started = time.perf_counter()
    was_up = ray.is_initialized()
    losses = []
    with _quiet_ray():
        ensure_ray(None, config.num_cpus)
    try:
        with _quiet_ray():
            algo = offline_config(settings, [str(path)], "marwil", spec).build_algo()
        try:
            for i in range(config.marwil_iterations):
                with _quiet_ray():
                    result = algo.train()
                losses.append(float(result.get("learners", {}).get("default_policy", {}).get("policy_loss", math.nan)))
                progress("MARWIL (RLlib, offline)", i + 1, config.marwil_iterations)
            module = spec.build()
            module.set_state(algo.learner_group.get_weights()[DEFAULT_MODULE_ID])
            module.eval()
        finally:
            algo.stop()
            del algo
            gc.collect()  # close Ray Data's iterators while Ray is still up
    finally:
        if not was_up and ray.is_initialized():
            ray.shutdown()  # give the CPUs back
    info = {"algorithm": "marwil", "iterations": config.marwil_iterations, "rounds": n,
            "first_policy_loss": losses[0] if losses else math.nan, "last_policy_loss": losses[-1] if losses else math.nan,
            "seconds": time.perf_counter() - started}
    policy = serving_policy_from_module(module, list(MARWIL_FEATURES), settings.exploration, name="marwil", info=info)
    return policy, info


@contextmanager
def _quiet_ray():
    """Ray Data's progress logging and deprecation notices would bury the progress bars."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("ray", "ray.data", "ray.rllib", "ray.tune")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _policy_scores(policy: ServingPolicy, features_by_user: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {user: policy.logits(features) for user, features in features_by_user.items()}


# -- the run ----------------------------------------------------------------------------------------

@contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_open_bandit(config: OpenBanditDemoConfig, workdir: Path, progress: Progress | None = None) -> OpenBanditResult:
    """The whole mode without a terminal: replay and learn, build policies, estimate them, run the protocol."""
    progress = progress or (lambda stage, done, total: None)
    seconds: dict[str, float] = {}
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _torch_threads(config.torch_threads):
        events = open_bandit_events(config)
        seconds["read log"] = time.perf_counter() - started
        t = time.perf_counter()
        log = replay_and_learn(config, events, progress)
        seconds["replay, join, learn"] = time.perf_counter() - t
        if not log.test or not log.train:
            raise ValueError("the time split left no training or no held-out rounds; use more rounds")
        feedback = feedback_from_examples(log.test, log.n_actions, log.len_list)
        n = feedback.n_rounds
        t = time.perf_counter()
        test_users = [e.impression.user_id for e in sorted(log.test, key=lambda e: (e.impression.event_time, e.impression.request_id))]
        train_users = [e.impression.user_id for e in log.train]
        users = sorted(set(test_users) | (set(train_users) if config.marwil else set()))
        pctr = score_users(log, users, progress)
        seconds["score users"] = time.perf_counter() - t

        t = time.perf_counter()
        q_hat = estimate_rewards_by_regression(feedback.context, feedback.action, feedback.reward, feedback.n_actions,
                                               feedback.position, feedback.len_list, n_folds=3, seed=PROTOCOL_SEED)
        seconds["reward model (DM, DR)"] = time.perf_counter() - t

        dists: dict[str, tuple[str, np.ndarray]] = {}
        dists["random (logging)"] = ("the logging policy itself: IPS and SNIPS must return its observed CTR",
                                             context_free_action_dist(np.full((log.n_actions, log.len_list), 1 / log.n_actions), n))
        greedy = greedy_policy(feature_names=["pctr"], rank_by="pctr",
                               exploration={"kind": "epsilon", "epsilon": config.epsilon})
        greedy_scores = _policy_scores(greedy, {u: pctr[u][:, :1] for u in set(test_users)})
        dists["greedy-pctr"] = (f"the learner's pCTR ranks the items, slots filled in rank order, epsilon {config.epsilon}",
                                ranking_action_dist(np.stack([greedy_scores[u] for u in test_users]), log.len_list, config.epsilon))
        marwil_info = None
        if config.marwil:
            t = time.perf_counter()
            item_feature = item_numeric_feature(config, log.n_actions)
            features = {u: np.column_stack([pctr[u][:, 0], item_feature]) for u in users}
            ordered_train = sorted(log.train, key=lambda e: (e.impression.event_time, e.impression.request_id))
            policy, marwil_info = train_marwil(
                np.stack([features[e.impression.user_id] for e in ordered_train]),
                np.array([int(e.impression.item_id) for e in ordered_train]),
                np.array([float(e.clicked) for e in ordered_train]),
                np.array([e.impression.propensity for e in ordered_train]), config, workdir, progress)
            scores = _policy_scores(policy, {u: features[u] for u in set(test_users)})
            dists["marwil"] = (f"RLlib MARWIL on the training rounds (features: {', '.join(MARWIL_FEATURES)}), "
                               f"epsilon {config.epsilon}",
                               ranking_action_dist(np.stack([scores[u] for u in test_users]), log.len_list, config.epsilon))
            seconds["MARWIL (RLlib)"] = time.perf_counter() - t
        t = time.perf_counter()
        bts = bernoulli_ts_action_dist(len_list=log.len_list, n_sim=config.bts_n_sim, seed=PROTOCOL_SEED)
        dists["bts (prior)"] = ("Bernoulli Thompson sampling with ZOZOTOWN's production prior, on the same held-out rounds",
                                         context_free_action_dist(bts, n))
        seconds["BTS slot probabilities"] = time.perf_counter() - t

        t = time.perf_counter()
        evaluations: dict[str, PolicyEvaluation] = {}
        for i, (name, (description, dist)) in enumerate(dists.items(), 1):
            estimates = evaluate(feedback, dist, q_hat, config.estimators, n_bootstrap=config.n_bootstrap,
                                 alpha=config.alpha, seed=config.seed)
            evaluations[name] = PolicyEvaluation(name, description, estimates, policy_diagnostics(feedback, dist))
            progress("off-policy estimates", i, len(dists))
        if marwil_info is not None:
            evaluations["marwil"].diagnostics.update(
                {f"training_{k}": v for k, v in marwil_info.items() if isinstance(v, (int, float))})
        mean, lower, upper = bootstrap_interval(feedback.reward.astype(float), alpha=config.alpha,
                                                n_bootstrap=config.n_bootstrap, seed=config.seed)
        logging_ctr = ConfidenceInterval("observed", float(feedback.reward.mean()), mean, lower, upper, config.alpha,
                                         config.n_bootstrap)
        seconds["estimates"] = time.perf_counter() - t

        protocol = None
        if config.protocol:
            t = time.perf_counter()
            progress("Open Bandit protocol (BTS)", 0, 1)
            result = open_bandit_protocol(config.data_dir, estimators=config.estimators, campaign=config.campaign,
                                          n_sim=config.bts_n_sim, seed=PROTOCOL_SEED, n_bootstrap=config.n_bootstrap,
                                          alpha=config.alpha)
            protocol = {"on_policy_value": result.on_policy_value, "logging_value": result.logging_value,
                        "estimates": {k: {**_ci_json(e.interval), "relative_error": e.relative_error}
                                      for k, e in result.estimates.items()}}
            progress("Open Bandit protocol (BTS)", 1, 1)
            seconds["protocol"] = time.perf_counter() - t

    trainer = log.trainer
    metric = {name: m.summary() for name, m in trainer.metrics.items()}
    learner = {"examples_learned": trainer.examples_learned, "model": config.model, "device": config.device,
               **{f"{name}_click_auc": metric[name].get("ctr_auc_overall", math.nan) for name in metric},
               "distinct_users": len(set(train_users)), "users_scored": len(users)}
    data = {
        "log": str(Path(config.data_dir) / "random" / config.campaign),
        "events": log.events, "rounds": len(log.train) + len(log.test), "items": log.n_actions, "slots": log.len_list,
        "train_rounds": len(log.train), "train_clicks": int(sum(e.clicked for e in log.train)),
        "test_rounds": n, "test_clicks": int(feedback.reward.sum()),
        "cut_time_ms": log.cut_ms,
    }
    seconds["total"] = time.perf_counter() - started
    notes = _notes(data, evaluations, config)
    return OpenBanditResult(config, data, learner, logging_ctr, evaluations, protocol, seconds, notes, feedback, log)


def _notes(data: dict[str, Any], evaluations: dict[str, PolicyEvaluation], config: OpenBanditDemoConfig) -> list[str]:
    notes = [f"Learned from the first {data['train_rounds']:,} rounds ({data['train_clicks']} clicks) of the uniform-random "
             f"log in event time; estimated on the last {data['test_rounds']:,} rounds ({data['test_clicks']} clicks). "
             "Each round is one slot of a 3-slot slate; every estimate is a CTR per slot impression.",
             "DM and DR use a cross-fitted logistic regression on the held-out rounds (user features, item, slot), "
             "independent of the learner; DM's interval ignores that model's own error."]
    for name in ("greedy-pctr", "marwil"):
        if name in evaluations:
            d = evaluations[name].diagnostics
            notes.append(f"{name}: the logger showed this policy's first choice in {d['matched_rounds']:.0f} held-out rounds "
                         f"({d['matched_clicks']:.0f} clicks there); effective sample size {d['effective_sample_size']:.0f} "
                         f"of {d['rounds']:.0f}. With so few matched clicks IPS and DR rest mostly on the epsilon "
                         f"({config.epsilon}) share, and their bootstrap intervals cannot see clicks that did not happen.")
    return notes


# -- the shell: terminal, HTML, JSON --------------------------------------------------------------

def run_open_bandit_demo(config: OpenBanditDemoConfig, out_dir: Path, console, progress: bool = True) -> tuple[OpenBanditResult, Path, Path]:
    """Run the mode with progress bars, print the tables, write ``report.html`` and ``results.json`` to ``out_dir``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeElapsedColumn

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"Open Bandit sample: learn from the first {config.train_fraction:.0%} of the uniform-random log "
                  f"({config.data_dir}), estimate the learned policies off-policy on the rest; model {config.model!r} "
                  f"on {config.device}, seed {config.seed}")
    with Bars(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
              console=console, disable=not progress, transient=False) as bars:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        result = run_open_bandit(config, out_dir / "work", report)
    print_result(result, console)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(_finite(result.to_json()), indent=2, default=_json_default, allow_nan=False) + "\n",
                         encoding="utf-8")
    html_path = write_open_bandit_report(result, out_dir / "report.html")
    console.print(f"report: {html_path}\nfigures: {json_path}")
    return result, html_path, json_path


def _finite(value: Any) -> Any:
    """NaN and infinities as null: strict JSON has no other spelling for "not defined"."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def print_result(result: OpenBanditResult, console) -> None:
    from rich.table import Table

    level = f"{1 - result.config.alpha:.0%}"
    logging = result.logging.estimate
    d = result.data
    console.print(f"held-out: {d['test_rounds']:,} rounds, {d['test_clicks']} clicks; logging policy (uniform random) "
                  f"observed CTR {logging:.5f} [{result.logging.lower:.5f}, {result.logging.upper:.5f}]; learner: "
                  f"{result.learner['examples_learned']:,} examples, click AUC model {result.learner.get('model_click_auc', math.nan):.3f}, "
                  f"popularity {result.learner.get('popularity_click_auc', math.nan):.3f}", soft_wrap=True)
    table = Table(title=f"Off-policy CTR estimates on the held-out rounds ({level} bootstrap intervals)")
    for column in ("policy", "estimator", "estimate", f"{level} interval", "x logging"):
        table.add_column(column, justify="left" if column in ("policy", "estimator") else "right", no_wrap=True)
    table.add_row("logging policy", "observed", f"{logging:.5f}",
                  f"{result.logging.lower:.5f}-{result.logging.upper:.5f}", "1.00", end_section=True)
    for name, evaluation in result.policies.items():
        for i, (estimator, ci) in enumerate(evaluation.estimates.items()):
            table.add_row(name if i == 0 else "", estimator, f"{ci.estimate:.5f}", f"{ci.lower:.5f}-{ci.upper:.5f}",
                          f"{ci.estimate / logging:.2f}" if logging > 0 else "-", end_section=i == len(evaluation.estimates) - 1)
    console.print(table)
    diagnostics = Table(title="How much of the held-out data speaks for each policy")
    for column in ("policy", "effective sample size", "matched rounds", "matched clicks", "max weight"):
        diagnostics.add_column(column, justify="left" if column == "policy" else "right")
    for name, evaluation in result.policies.items():
        dg = evaluation.diagnostics
        diagnostics.add_row(name, f"{dg['effective_sample_size']:,.0f}", _count(dg["matched_rounds"]),
                            _count(dg["matched_clicks"]), f"{dg['max_weight']:.1f}")
    console.print(diagnostics)
    if result.protocol:
        p = result.protocol
        protocol = Table(title=f"Open Bandit protocol: BTS's CTR estimated from all random logs vs. observed "
                               f"{p['on_policy_value']:.5f} in its own logs")
        for column in ("estimator", "estimate", f"{level} interval", "relative error"):
            protocol.add_column(column, justify="left" if column == "estimator" else "right")
        for name, row in p["estimates"].items():
            protocol.add_row(name, f"{row['estimate']:.5f}", f"{row['lower']:.5f}-{row['upper']:.5f}",
                             f"{row['relative_error']:.1%}")
        console.print(protocol)
    console.print("wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()), soft_wrap=True)


def _count(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def interval_chart(title: str, intervals: dict[str, tuple[float, float, float]], *, y_label: str = "",
                   references: dict[str, float] | None = None) -> str:
    """One SVG chart of point estimates with (asymmetric) intervals, and horizontal reference lines.

    >>> svg = interval_chart("CTR", {"ips": (0.004, 0.002, 0.007)}, references={"logging": 0.0038})
    >>> svg.startswith("<svg") and "ips" in svg and "logging" in svg
    True
    """
    import html

    from streamrec.report import HEIGHT, MARGIN, PALETTE, WIDTH, _fmt, _frame

    references = references or {}
    values = [v for triple in intervals.values() for v in triple] + list(references.values())
    lo, hi = min(values + [0.0]), max(values + [0.0])
    pad = (hi - lo) * 0.08 or 0.001
    parts, _, sy = _frame(title, (0, 1), (min(0.0, lo - pad), hi + pad), "", y_label, x_ticks=False)
    slot = (WIDTH - 2 * MARGIN) / max(len(intervals), 1)
    for i, (name, (estimate, lower, upper)) in enumerate(intervals.items()):
        cx = MARGIN + (i + 0.5) * slot
        colour = PALETTE[i % len(PALETTE)]
        parts.append(f'<line x1="{cx:.1f}" y1="{sy(lower):.1f}" x2="{cx:.1f}" y2="{sy(upper):.1f}" stroke="{colour}" stroke-width="3"/>'
                     f'<line x1="{cx - 8:.1f}" y1="{sy(lower):.1f}" x2="{cx + 8:.1f}" y2="{sy(lower):.1f}" stroke="{colour}"/>'
                     f'<line x1="{cx - 8:.1f}" y1="{sy(upper):.1f}" x2="{cx + 8:.1f}" y2="{sy(upper):.1f}" stroke="{colour}"/>'
                     f'<circle cx="{cx:.1f}" cy="{sy(estimate):.1f}" r="5" fill="{colour}"/>'
                     f'<text x="{cx + 10:.1f}" y="{sy(estimate) + 4:.1f}" font-size="10">{_fmt(estimate)}</text>'
                     f'<text x="{cx:.1f}" y="{HEIGHT - MARGIN + 14}" text-anchor="middle" font-size="11">{html.escape(name)}</text>')
    for j, (name, value) in enumerate(references.items()):
        y = sy(value)
        parts.append(f'<line x1="{MARGIN}" y1="{y:.1f}" x2="{WIDTH - MARGIN}" y2="{y:.1f}" stroke="#555" '
                     f'stroke-dasharray="{6 - 2 * j},4"/>'
                     f'<text x="{WIDTH - MARGIN - 4}" y="{y - 4:.1f}" text-anchor="end" font-size="10">'
                     f'{html.escape(name)} {_fmt(value)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def write_open_bandit_report(result: OpenBanditResult, path: Path) -> Path:
    from streamrec.report import bar_chart, write_report

    level = f"{1 - result.config.alpha:.0%}"
    logging = result.logging
    charts = []
    for name, evaluation in result.policies.items():
        charts.append(interval_chart(f"{name}: estimated CTR ({level} intervals)",
                                     {k: (ci.estimate, ci.lower, ci.upper) for k, ci in evaluation.estimates.items()},
                                     y_label="clicks per slot impression",
                                     references={"logging observed": logging.estimate}))
    summary_points = {name: ev.estimates["dr"] for name, ev in result.policies.items() if "dr" in ev.estimates}
    if summary_points:
        charts.append(interval_chart(f"Doubly robust estimate per policy ({level} intervals)",
                                     {k: (ci.estimate, ci.lower, ci.upper) for k, ci in summary_points.items()},
                                     y_label="clicks per slot impression",
                                     references={"logging observed": logging.estimate}))
    charts.append(bar_chart("Effective sample size of the held-out rounds per policy",
                            {k: ev.diagnostics["effective_sample_size"] for k, ev in result.policies.items()},
                            y_label="rounds"))
    if result.protocol:
        p = result.protocol
        charts.append(interval_chart(f"Open Bandit protocol: BTS estimated from the random logs ({level} intervals)",
                                     {k: (r["estimate"], r["lower"], r["upper"]) for k, r in p["estimates"].items()},
                                     y_label="clicks per slot impression",
                                     references={"BTS observed": p["on_policy_value"], "random observed": p["logging_value"]}))
    summary: dict[str, object] = {
        "held-out rounds": result.data["test_rounds"], "held-out clicks": result.data["test_clicks"],
        "training rounds": result.data["train_rounds"], "training clicks": result.data["train_clicks"],
        "logging policy observed CTR": logging.estimate,
        f"logging CTR {level} interval": f"[{logging.lower:.5f}, {logging.upper:.5f}]",
        "learner click AUC (prequential)": result.learner.get("model_click_auc", math.nan),
        "popularity click AUC (prequential)": result.learner.get("popularity_click_auc", math.nan),
    }
    for name, evaluation in result.policies.items():
        for estimator, ci in evaluation.estimates.items():
            summary[f"{name}: {estimator}"] = f"{ci.estimate:.5f} [{ci.lower:.5f}, {ci.upper:.5f}]"
    if result.protocol:
        for estimator, row in result.protocol["estimates"].items():
            summary[f"protocol BTS {estimator} (observed {result.protocol['on_policy_value']:.4f})"] = \
                f"{row['estimate']:.5f}, relative error {row['relative_error']:.1%}"
    summary["wall seconds"] = result.seconds.get("total", math.nan)
    return write_report(path, "StreamRec: off-policy evaluation on the Open Bandit sample", summary, charts, result.notes)
