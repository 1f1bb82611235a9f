"""Training the re-ranker with Ray RLlib: PPO online against a simulator, BC/MARWIL offline from logs.

This module is the Ray shell around the plain-Python core (:mod:`policies.env`,
:mod:`policies.rl_module`): it builds RLlib configs on the new API stack, runs them on a local
Ray (``num_cpus`` CPUs) or any cluster by address, and hands back a Ray-free
:class:`~policies.export.ServingPolicy`.

Offline logs are parquet files of transitions, one row per served request, in RLlib's column
layout (``obs``, ``actions``, ``rewards``, ``new_obs``, ``terminateds``, ``truncateds``,
``eps_id``) plus ``action_prob`` (the logging policy's propensity of the logged action) and
``estimated_rewards`` (the scorer's estimate of each candidate's immediate reward, for OPE).
:func:`record_sessions` writes them from a simulator; :func:`transitions_from_events` builds
them from StreamRec's own event logs (impressions joined with clicks and purchases).
"""

from __future__ import annotations

import gc
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from policies.config import PolicySettings, SessionConfig, TrainSettings
from policies.env import USER_FEATURES, SessionEnv
from policies.evaluation import SessionPolicy
from policies.export import ServingPolicy

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("obs", "actions", "rewards", "new_obs", "terminateds", "truncateds", "eps_id")
OPE_COLUMNS = ("action_prob", "estimated_rewards", "position")


@dataclass
class TrainedPolicy:
    policy: ServingPolicy
    algorithm: str
    iterations: int
    wall_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    module: Any = None  # the RLModule (kept for checks that compare with RLlib)


# ---- Ray ----------------------------------------------------------------------------------------

def ensure_ray(address: str | None = None, num_cpus: int = 2) -> None:
    """Connect to ``address`` (a cluster) or start a local Ray with ``num_cpus``; reuse one that is up."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                 configure_logging=True, logging_level=logging.WARNING)


def feature_normalisation(session: SessionConfig, n_sessions: int = 100, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-feature shift and scale of the candidate features, measured on random sessions."""
    env = SessionEnv(session)
    rows, rng = [], np.random.default_rng(seed)
    for s in range(n_sessions):
        env.reset(seed=seed + s)
        done = False
        while not done:
            rows.append(env.candidate_feature_matrix)
            _, _, terminated, truncated, _ = env.step(int(rng.integers(env.n_candidates)))
            done = terminated or truncated
    features = np.concatenate(rows)
    return features.mean(axis=0).tolist(), np.maximum(features.std(axis=0), 1e-3).tolist()


def _spaces(session: SessionConfig):
    import gymnasium as gym

    size = session.n_candidates * len(session.feature_names) + len(USER_FEATURES)
    return (gym.spaces.Box(-np.inf, np.inf, shape=(size,), dtype=np.float32), gym.spaces.Discrete(session.n_candidates))


def _module_spec(session: SessionConfig, train: TrainSettings):
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from policies.rl_module import CandidateRankingModule, module_config

    shift, scale = feature_normalisation(session, seed=train.seed)
    observation_space, action_space = _spaces(session)
    return RLModuleSpec(module_class=CandidateRankingModule, observation_space=observation_space,
                        action_space=action_space, model_config=module_config(
                            session.n_candidates, len(session.feature_names), len(USER_FEATURES), train.hidden,
                            shift, scale))


def _to_serving(algo, spec, session: SessionConfig, exploration: dict, name: str, info: dict):
    """The learner's current weights in a fresh RLModule, and as a Ray-free serving policy."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    from policies.rl_module import serving_policy_from_module

    module = spec.build()
    module.set_state(algo.learner_group.get_weights()[DEFAULT_MODULE_ID])
    module.eval()
    return serving_policy_from_module(module, session.feature_names, exploration, name=name, info=info), module


# ---- online: PPO --------------------------------------------------------------------------------

def ppo_config(settings: PolicySettings, spec=None):
    """The PPO config (new API stack) for ``settings``; tweak it further before ``build_algo()``."""
    from ray.rllib.algorithms.ppo import PPOConfig

    session, train = settings.session, settings.train
    return (
        PPOConfig()
        .api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .environment(SessionEnv, env_config=session.model_dump(mode="json"))
        .framework("torch")
        .env_runners(num_env_runners=train.num_env_runners, num_envs_per_env_runner=1,
                     num_cpus_per_env_runner=1, rollout_fragment_length="auto")
        .learners(num_learners=0)
        .training(lr=train.lr, gamma=train.gamma, lambda_=0.95, train_batch_size_per_learner=train.train_batch_size,
                  minibatch_size=train.minibatch_size, num_epochs=train.num_epochs, entropy_coeff=train.entropy_coeff,
                  vf_loss_coeff=0.5, clip_param=0.2, vf_clip_param=50.0)
        .rl_module(rl_module_spec=spec or _module_spec(session, train))
        .debugging(seed=train.seed, log_level="ERROR")
        .reporting(metrics_num_episodes_for_smoothing=200)
    )


def train_ppo(settings: PolicySettings, iterations: int | None = None,
              on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> TrainedPolicy:
    """Train a re-ranking policy online with PPO against the configured simulator."""
    ensure_ray(settings.ray_address, settings.num_cpus)
    iterations = iterations or settings.train.iterations
    start = time.perf_counter()
    spec = _module_spec(settings.session, settings.train)
    algo = ppo_config(settings, spec).build_algo()
    history: list[dict[str, float]] = []
    try:
        for i in range(iterations):
            result = algo.train()
            runners = result.get("env_runners", {})
            row = {"iteration": i + 1, "episode_return_mean": float(runners.get("episode_return_mean", float("nan"))),
                   "episode_len_mean": float(runners.get("episode_len_mean", float("nan"))),
                   "env_steps": float(runners.get("num_env_steps_sampled_lifetime", float("nan"))),
                   "wall_s": time.perf_counter() - start}
            history.append(row)
            if on_iteration:
                on_iteration(i + 1, row)
        info = {"algorithm": "ppo", "iterations": iterations, "session": settings.session.model_dump(mode="json")}
        policy, module = _to_serving(algo, spec, settings.session, settings.exploration, "ppo", info)
    finally:
        algo.stop()
    return TrainedPolicy(policy, "ppo", iterations, time.perf_counter() - start, history, module)


# ---- offline logs -------------------------------------------------------------------------------

def estimated_rewards(features: np.ndarray, feature_names: list[str], purchase_weight: float) -> np.ndarray:
    """The scorer's estimate of each candidate's immediate reward, ``pctr * (1 + w * pcvr)`` (the DM model)."""
    pctr = features[..., feature_names.index("pctr")]
    pcvr = features[..., feature_names.index("pcvr")] if "pcvr" in feature_names else 0.0
    return pctr * (1.0 + purchase_weight * pcvr)


def record_sessions(session: SessionConfig, logging_policy: ServingPolicy | SessionPolicy, n_sessions: int,
                    path: str | Path, seed: int = 0) -> int:
    """Run ``logging_policy`` (sampling with its exploration) in the simulator and log every step as parquet.

    Returns the number of logged transitions. ``action_prob`` is the probability the logging
    policy gave the action it took (exact, so OPE can trust it).
    """
    env, rng = SessionEnv(session), np.random.default_rng([seed, 99])
    rows: dict[str, list] = {name: [] for name in (*LOG_COLUMNS, *OPE_COLUMNS)}
    for s in range(n_sessions):
        obs, _ = env.reset(seed=seed + s)
        eps_id, t, done = uuid.UUID(int=rng.integers(2**63)).hex, 0, False
        while not done:
            features = env.candidate_feature_matrix
            if isinstance(logging_policy, ServingPolicy):
                p = logging_policy.action_probabilities(features)
                action = int(rng.choice(env.n_candidates, p=p))
                prob = float(p[action])
            else:
                action, prob = int(logging_policy(env, rng)), float("nan")
            next_obs, reward, terminated, truncated, _ = env.step(action)
            for name, value in (("obs", obs), ("actions", action), ("rewards", float(reward)), ("new_obs", next_obs),
                                ("terminateds", terminated), ("truncateds", truncated), ("eps_id", eps_id),
                                ("action_prob", prob), ("position", t),
                                ("estimated_rewards", estimated_rewards(features, session.feature_names,
                                                                        session.purchase_weight))):
                rows[name].append(value)
            obs, t, done = next_obs, t + 1, terminated or truncated
    write_transitions(path, rows)
    return len(rows["actions"])


def write_transitions(path: str | Path, rows: dict[str, list]) -> None:
    def vectors(values: list) -> pa.Array:
        return pa.array([np.asarray(v, dtype=np.float32).tolist() for v in values], type=pa.list_(pa.float32()))

    table = pa.table({
        "obs": vectors(rows["obs"]), "actions": pa.array(rows["actions"], pa.int64()),
        "rewards": pa.array(rows["rewards"], pa.float32()), "new_obs": vectors(rows["new_obs"]),
        "terminateds": pa.array(rows["terminateds"], pa.bool_()), "truncateds": pa.array(rows["truncateds"], pa.bool_()),
        "eps_id": pa.array(rows["eps_id"], pa.string()), "action_prob": pa.array(rows["action_prob"], pa.float64()),
        "estimated_rewards": vectors(rows["estimated_rewards"]), "position": pa.array(rows["position"], pa.int64()),
    })
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path))


def transitions_from_events(events: Iterable, session: SessionConfig, path: str | Path,
                            scorer: Any = None) -> dict[str, int]:
    """Turn StreamRec's event log (impressions, clicks, purchases) into a one-step transition log.

    Each request whose slate has ``session.n_candidates`` items becomes one bandit round: the
    candidates are the slate's items (in item-id order, so the action is not always 0), the
    action is the item the logging policy put in the top slot, the reward is that item's
    ``click + w * purchase`` (+ the revenue term). pCTR/pCVR come from the impression's
    serving-time features when they are there, otherwise from ``scorer`` (default: the session's
    noisy oracle of the synthetic world that wrote the log). The propensity is the top
    impression's logged one, except for uniformly random slates (``policy_version == "random"``, or
    propensities that show a uniform draw from the candidates), where every ordering of the slate
    is equally likely and, given the slate, it is exactly 1/K.
    Returns counts of rounds written and requests skipped.
    """
    from policies.env import build_simulator
    from policies.export import candidate_features
    from streaming.events import Click, Impression, Purchase

    slates: dict[str, list] = {}
    clicked, bought = set(), {}
    for event in events:
        if isinstance(event, Impression):
            slates.setdefault(event.request_id, []).append(event)
        elif isinstance(event, Click) and event.request_id:
            clicked.add((event.request_id, event.item_id))
        elif isinstance(event, Purchase) and event.request_id:
            bought[(event.request_id, event.item_id)] = event.revenue
    if scorer is None:
        world, _, scorer = build_simulator(session)
    k, names = session.n_candidates, session.feature_names
    user_state = np.zeros(len(USER_FEATURES), dtype=np.float32)
    rows: dict[str, list] = {name: [] for name in (*LOG_COLUMNS, *OPE_COLUMNS)}
    skipped = 0
    for request_id, impressions in slates.items():
        if len(impressions) != k or len({i.item_id for i in impressions}) != k:
            skipped += 1
            continue
        top = min(impressions, key=lambda i: i.position)
        ordered = sorted(impressions, key=lambda i: i.item_id)
        items = [i.item_id for i in ordered]
        if all("pctr" in i.features and "pcvr" in i.features for i in ordered):
            scores = {"pctr": np.array([i.features["pctr"] for i in ordered]),
                      "pcvr": np.array([i.features["pcvr"] for i in ordered])}
        else:
            try:
                pctr, pcvr = scorer.predict(top.user_id, items)
            except (KeyError, IndexError):
                skipped += 1
                continue
            scores = {"pctr": np.asarray(pctr), "pcvr": np.asarray(pcvr)}
        features = candidate_features(scores, [dict(i.features) for i in ordered], names).astype(np.float32)
        obs = np.concatenate([features.reshape(-1), user_state])
        key = (request_id, top.item_id)
        purchased = key in bought
        reward = float(key in clicked) + session.purchase_weight * purchased \
            + session.revenue_weight * (np.log1p(bought[key]) if purchased else 0.0)
        pscore = 1.0 / k if top.policy_version == "random" or _uniform_slate(impressions) else float(top.propensity)
        for name, value in (("obs", obs), ("actions", items.index(top.item_id)), ("rewards", reward),
                            ("new_obs", obs), ("terminateds", True), ("truncateds", False), ("eps_id", request_id),
                            ("action_prob", pscore), ("position", 0),
                            ("estimated_rewards", estimated_rewards(features, names, session.purchase_weight))):
            rows[name].append(value)
    if not rows["actions"]:
        raise ValueError(f"no request in the log has a slate of {k} distinct items; set policy.session.n_candidates "
                         "to the logged slate size")
    write_transitions(path, rows)
    return {"rounds": len(rows["actions"]), "skipped": skipped}


def _uniform_slate(impressions: list) -> bool:
    """Whether a slate was drawn uniformly from its candidates: then every ordering of it is equally likely.

    Uniform Plackett-Luce over N candidates gives the item at position j the propensity 1/(N - j);
    a serving policy that explores with epsilon 1.0 logs exactly that.

    >>> from types import SimpleNamespace as I
    >>> _uniform_slate([I(position=0, propensity=1 / 40), I(position=1, propensity=1 / 39)])
    True
    >>> _uniform_slate([I(position=0, propensity=0.5), I(position=1, propensity=1 / 39)])
    False
    """
    top = min(impressions, key=lambda i: i.position)
    if not 0 < top.propensity <= 1:
        return False
    n = round(1 / top.propensity)
    return all(n - i.position > 0 and abs(i.propensity * (n - i.position) - 1) < 1e-6 for i in impressions)


def is_transition_log(path: str | Path) -> bool:
    """Whether ``path`` is a transition log (as opposed to a StreamRec event log)."""
    if not str(path).endswith(".parquet"):
        return False
    names = set(pq.read_schema(str(path)).names)
    return {"obs", "actions", "rewards"} <= names


@dataclass(frozen=True)
class LoggedBandit:
    """A transition log as arrays, the inputs of off-policy evaluation."""

    features: np.ndarray           # [n, K, F] candidate features
    actions: np.ndarray            # [n]
    rewards: np.ndarray            # [n] immediate rewards
    pscore: np.ndarray             # [n] logging propensity of the logged action
    estimated_rewards: np.ndarray  # [n, K] the DM model's reward estimate per candidate


def read_transitions(path: str | Path, n_candidates: int, n_features: int) -> LoggedBandit:
    table = pq.read_table(str(path))
    obs = np.asarray(table.column("obs").to_pylist(), dtype=np.float64)
    cut = n_candidates * n_features
    if obs.ndim != 2 or obs.shape[1] < cut:
        raise ValueError(f"{path}: observations have {obs.shape[-1]} values, fewer than {n_candidates} x {n_features}")
    return LoggedBandit(
        features=obs[:, :cut].reshape(-1, n_candidates, n_features),
        actions=np.asarray(table.column("actions").to_numpy(), dtype=np.int64),
        rewards=np.asarray(table.column("rewards").to_numpy(), dtype=np.float64),
        pscore=np.asarray(table.column("action_prob").to_numpy(), dtype=np.float64),
        estimated_rewards=np.asarray(table.column("estimated_rewards").to_pylist(), dtype=np.float64),
    )


# ---- offline: BC and MARWIL ---------------------------------------------------------------------

def offline_config(settings: PolicySettings, log_paths: list[str], algorithm: str, spec=None):
    """A BC or MARWIL config (new API stack) reading transition parquet files."""
    from ray.rllib.algorithms.bc import BCConfig
    from ray.rllib.algorithms.marwil import MARWILConfig

    session, train = settings.session, settings.train
    observation_space, action_space = _spaces(session)
    config = BCConfig() if algorithm == "bc" else MARWILConfig()
    config = (
        config.api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .environment(observation_space=observation_space, action_space=action_space)
        .framework("torch")
        .env_runners(num_env_runners=0)
        .learners(num_learners=0)
        .offline_data(input_=[str(Path(p).resolve()) for p in log_paths],
                      input_read_method_kwargs={"columns": list(LOG_COLUMNS), "override_num_blocks": 2},
                      map_batches_kwargs={"concurrency": 1, "num_cpus": 1},
                      iter_batches_kwargs={"prefetch_batches": 1},
                      dataset_num_iters_per_learner=1)
        .training(lr=train.lr, gamma=train.gamma, train_batch_size_per_learner=train.offline_batch_size)
        .rl_module(rl_module_spec=spec or _module_spec(session, train))
        .debugging(seed=train.seed, log_level="ERROR")
    )
    if algorithm == "marwil":
        config = config.training(beta=train.marwil_beta)
    return config


def train_offline(settings: PolicySettings, log_paths: Iterable[str | Path], algorithm: str = "marwil",
                  iterations: int | None = None,
                  on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> TrainedPolicy:
    """Train from logged transitions with BC or MARWIL (RLlib's offline API)."""
    if algorithm not in ("bc", "marwil"):
        raise ValueError(f"offline training supports 'bc' and 'marwil', not {algorithm!r}")
    paths = [str(p) for p in log_paths]
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"offline log {p} does not exist; write one with `streamrec policy record` "
                                    "or policies.train.record_sessions")
    ensure_ray(settings.ray_address, settings.num_cpus)
    iterations = iterations or settings.train.iterations
    start = time.perf_counter()
    spec = _module_spec(settings.session, settings.train)
    algo = offline_config(settings, paths, algorithm, spec).build_algo()
    history: list[dict[str, float]] = []
    try:
        for i in range(iterations):
            result = algo.train()
            learner = result.get("learners", {}).get("default_policy", {})
            row = {"iteration": i + 1, "policy_loss": float(learner.get("policy_loss", float("nan"))),
                   "wall_s": time.perf_counter() - start}
            history.append(row)
            if on_iteration:
                on_iteration(i + 1, row)
        info = {"algorithm": algorithm, "iterations": iterations, "logs": paths}
        policy, module = _to_serving(algo, spec, settings.session, settings.exploration, algorithm, info)
    finally:
        algo.stop()
        del algo
        gc.collect()  # close Ray Data's batch iterators while Ray is still up
    return TrainedPolicy(policy, algorithm, iterations, time.perf_counter() - start, history, module)
