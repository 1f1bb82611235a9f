"""A user session as a gymnasium environment: pick the top item, see a click (or not), keep the user.

Each step the simulated user requests a slate. The observation holds the K candidates' feature
rows (the learner's pCTR/pCVR and item features, built by :func:`policies.export.candidate_features`)
followed by the user's session state; the action picks which candidate goes into the top slot;
the reward is ``click + w * purchase`` (plus an optional revenue term). The session ends when the
user leaves, and leaving depends on how the session went (see :class:`SessionConfig`), so what a
policy shows now changes how much it can earn later.

Randomness is split so policies can be compared on common random numbers: the user and every
step's candidate set depend only on the reset seed and the step, and the click/purchase draws of
step t are uniform numbers fixed by (seed, t).

>>> env = SessionEnv({"world": {"seed": 0, "n_users": 20, "n_items": 30}, "n_candidates": 4})
>>> obs, info = env.reset(seed=3)
>>> obs.shape, env.action_space
((17,), Discrete(4))
>>> obs, reward, terminated, truncated, info = env.step(0)
>>> sorted(info)
['clicked', 'item', 'p_click', 'p_purchase', 'purchased', 'user']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from policies.config import SessionConfig
from policies.export import candidate_features
from policies.synthetic_world import SyntheticWorld, WorldConfig
from policies.users import GroundTruthUsers, NoisyOracle, UserResponseModel, load_learned_users

USER_FEATURES: tuple[str, ...] = ("step", "clicks", "purchases", "misses_in_row", "clicked_last")


class SessionState:
    __slots__ = ("user", "step", "clicks", "purchases", "misses_in_row", "clicked_last")

    def __init__(self, user: str) -> None:
        self.user, self.step, self.clicks, self.purchases, self.misses_in_row, self.clicked_last = user, 0, 0, 0, 0, 0

    def vector(self, max_steps: int) -> np.ndarray:
        return np.array([self.step / max_steps, self.clicks / max_steps, self.purchases / max_steps,
                         min(self.misses_in_row, 5) / 5.0, float(self.clicked_last)], dtype=np.float32)


def build_simulator(config: SessionConfig) -> tuple[SyntheticWorld, UserResponseModel, UserResponseModel]:
    """The world (catalog and users), the responding user model and the candidate scorer of a config."""
    world = SyntheticWorld(WorldConfig(**config.world))
    learned = None
    if config.user_model == "learned" or config.scorer == "model":
        learned = load_learned_users(str(config.model_registry), config.model_version, catalog=world.item_ids)
    users = GroundTruthUsers(world) if config.user_model == "ground_truth" else learned
    scorer = NoisyOracle(world, config.scorer_noise) if config.scorer == "noisy_oracle" else learned
    return world, users, scorer


class SessionEnv(gym.Env):
    """One user session per episode; ``Discrete(K)`` picks the candidate for the top slot."""

    metadata = {"render_modes": []}

    def __init__(self, config: SessionConfig | Mapping[str, Any] | None = None,
                 simulator: tuple[SyntheticWorld, UserResponseModel, UserResponseModel] | None = None) -> None:
        self.config = config if isinstance(config, SessionConfig) else SessionConfig(**dict(config or {}))
        self.world, self.users, self.scorer = simulator or build_simulator(self.config)
        cfg = self.config
        self.n_candidates, self.n_features = cfg.n_candidates, len(cfg.feature_names)
        self.n_user_features = len(USER_FEATURES)
        size = self.n_candidates * self.n_features + self.n_user_features
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(size,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(self.n_candidates)
        self._prices = [{"price": float(p)} for p in self.world.item_price]
        self._state: SessionState | None = None
        self._clicked: dict[str, list[str]] = {}
        self._session_key = 0
        self.candidates = np.zeros(self.n_candidates, dtype=np.int64)
        self.candidate_scores: dict[str, np.ndarray] = {}
        self._features = np.zeros((self.n_candidates, self.n_features), dtype=np.float32)

    # ---- gymnasium API -------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._session_key = int(self.np_random.integers(2**62))
        rng = np.random.default_rng([self._session_key, 0])
        user = self.world.user_ids[int(rng.choice(self.world.config.n_users, p=self.world.user_activity))]
        self._state = SessionState(user)
        self._history().clear()
        self._offer()
        return self._observation(), {"user": user}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not a candidate index in 0..{self.n_candidates - 1}")
        cfg, state = self.config, self._state
        slate = self._slate(int(action))
        items = [self.world.item_ids[i] for i in slate]
        p_top, p_purchase = self.users.predict(state.user, items)
        p_click = p_top * self.world.examination(np.arange(len(slate)))
        draws = np.random.default_rng([self._session_key, state.step + 1, 1]).random((3, len(slate)))
        clicks = draws[0] < p_click
        purchases = clicks & (draws[1] < p_purchase)
        revenue = np.where(purchases, self.world.item_price[slate], 0.0)
        reward = float(clicks.sum() + cfg.purchase_weight * purchases.sum()
                       + cfg.revenue_weight * np.log1p(revenue).sum())
        clicked = bool(clicks.any())
        self._history().setdefault(state.user, []).extend(item for item, c in zip(items, clicks) if c)
        state.step += 1
        state.clicks += int(clicks.sum())
        state.purchases += int(purchases.sum())
        state.misses_in_row = 0 if clicked else state.misses_in_row + 1
        state.clicked_last = int(clicked)
        p_leave = cfg.leave_after_click if clicked else min(
            1.0, cfg.leave_after_miss + cfg.leave_per_miss * (state.misses_in_row - 1))
        terminated = bool(draws[2, 0] < p_leave)
        truncated = not terminated and state.step >= cfg.max_steps
        info = {"user": state.user, "item": items[0], "clicked": bool(clicks[0]), "purchased": bool(purchases[0]),
                "p_click": float(p_click[0]), "p_purchase": float(p_purchase[0])}
        self._offer()
        return self._observation(), reward, terminated, truncated, info

    # ---- internals -----------------------------------------------------------------------------

    def _history(self) -> dict[str, list[str]]:
        """Items clicked this session, fed back to a learned user model (its ``recent_items``)."""
        for model in (self.users, self.scorer):
            if isinstance(getattr(model, "recent_items", None), dict):
                return model.recent_items
        return self._clicked


    def _offer(self) -> None:
        """Draw this step's candidate set and score it as the learner would."""
        rng = np.random.default_rng([self._session_key, self._state.step + 1, 0])
        self.candidates = rng.choice(self.world.config.n_items, size=self.n_candidates, replace=False)
        items = [self.world.item_ids[i] for i in self.candidates]
        pctr, pcvr = self.scorer.predict(self._state.user, items)
        self.candidate_scores = {"pctr": np.asarray(pctr), "pcvr": np.asarray(pcvr)}
        self._features = candidate_features(self.candidate_scores, [self._prices[i] for i in self.candidates],
                                            self.config.feature_names).astype(np.float32)

    def _observation(self) -> np.ndarray:
        return np.concatenate([self._features.reshape(-1), self._state.vector(self.config.max_steps)])

    def _slate(self, top: int) -> np.ndarray:
        """The top pick, then the scorer's pCTCVR order of the others for the remaining slots."""
        if self.config.slate_size == 1:
            return self.candidates[[top]]
        pctcvr = self.candidate_scores["pctr"] * self.candidate_scores["pcvr"]
        rest = [i for i in np.argsort(-pctcvr, kind="stable") if i != top][: self.config.slate_size - 1]
        return self.candidates[[top, *rest]]

    # ---- what baselines and evaluation need ----------------------------------------------------

    @property
    def candidate_feature_matrix(self) -> np.ndarray:
        """The current ``[K, F]`` candidate features (what a serving policy reads)."""
        return self._features.copy()

    def oracle_action(self) -> int:
        """The candidate with the highest true expected immediate reward at the top slot."""
        items = [self.world.item_ids[i] for i in self.candidates]
        p_click, p_purchase = self.users.predict(self._state.user, items)
        value = p_click * (1.0 + self.config.purchase_weight * p_purchase)
        if self.config.revenue_weight:
            value = value + self.config.revenue_weight * p_click * p_purchase * np.log1p(self.world.item_price[self.candidates])
        return int(np.argmax(value))


def split_observation(obs: np.ndarray, n_candidates: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """``(candidate features [..., K, F], user state [..., U])`` of (a batch of) observations."""
    obs = np.asarray(obs)
    cut = n_candidates * n_features
    return obs[..., :cut].reshape(*obs.shape[:-1], n_candidates, n_features), obs[..., cut:]
