"""User response models: who answers the simulator's slates, and who scores its candidates.

Anything with ``predict(user, items) -> (pctr, pcvr)`` is a :class:`UserResponseModel`: the
top-slot click probability and the purchase probability given a click, one value per item. The
simulator asks one for the truth (how the simulated user responds) and one for the scores the
policy sees (what the learner would predict). Three implementations:

* :class:`GroundTruthUsers`: the synthetic world's known click/purchase model.
* :class:`NoisyOracle`: the truth seen through a fixed per-(user, item) error in logit space, a
  stand-in for a learned model when there is none (tests run without the learner).
* :class:`LearnedUsers`: the learner's multi-task model (``learner.model``), trained on logged
  events; a simulator built on it replays what the logs taught it.

>>> from policies.synthetic_world import SyntheticWorld, WorldConfig
>>> world = SyntheticWorld(WorldConfig(seed=1, n_users=5, n_items=8))
>>> truth, noisy = GroundTruthUsers(world), NoisyOracle(world, noise=0.5, seed=0)
>>> pctr, pcvr = truth.predict("u0001", ["i0000", "i0003"])
>>> bool((noisy.predict("u0001", ["i0000", "i0003"])[0] != pctr).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from policies.synthetic_world import SyntheticWorld


@runtime_checkable
class UserResponseModel(Protocol):
    def predict(self, user: str, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(P(click at the top slot), P(purchase | click))`` for each item."""
        ...


class GroundTruthUsers:
    """The synthetic world's truth."""

    def __init__(self, world: SyntheticWorld) -> None:
        self.world = world

    def predict(self, user: str, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.world.oracle(user, items, np.zeros(len(items), dtype=np.int64))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


class NoisyOracle:
    """The truth with a fixed error per (user, item): the same question always gets the same answer."""

    def __init__(self, world: SyntheticWorld, noise: float = 0.5, seed: int = 0) -> None:
        self.world, self.noise = world, float(noise)
        rng = np.random.default_rng([world.config.seed, 7, seed])
        shape = (world.config.n_users, world.config.n_items)
        self._ctr_error = rng.normal(0.0, self.noise, size=shape)
        self._cvr_error = rng.normal(0.0, self.noise, size=shape)

    def predict(self, user: str, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        pctr, pcvr = self.world.oracle(user, items, np.zeros(len(items), dtype=np.int64))
        u, i = self.world.user_index(user), self.world.item_indices(items)
        noisy_ctr = 1.0 / (1.0 + np.exp(-(_logit(pctr) + self._ctr_error[u, i])))
        noisy_cvr = 1.0 / (1.0 + np.exp(-(_logit(pcvr) + self._cvr_error[u, i])))
        return noisy_ctr, noisy_cvr


class LearnedUsers:
    """The learner's multi-task model as a user response model (``learner.model`` interface).

    ``recent_items`` (user -> recently clicked item ids) is passed through to the model, so a
    simulator can feed back what happened earlier in the session.
    """

    #: scores kept before the cache starts over (a simulator asks the same questions again and again)
    CACHE_LIMIT = 1_000_000

    def __init__(self, model, recent_items: Mapping[str, Sequence[str]] | None = None,
                 catalog: Sequence[str] = ()) -> None:
        self.model = model
        self.recent_items = recent_items if recent_items is not None else {}
        # (user, recent items, item) -> (pctr, pcvr): the model is frozen while it simulates, and a
        # session's history only changes on a click, so most steps ask what was asked before; with a
        # ``catalog``, a new (user, history) is scored against all of it in one batch
        self.catalog = list(catalog)
        self._scores: dict[tuple, tuple[float, float]] = {}

    def predict(self, user: str, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        from streaming.events import Impression

        recent = tuple(self.recent_items.get(user, ()))
        context = (user, recent)
        missing = list(dict.fromkeys(item for item in items if (*context, item) not in self._scores))
        if missing and self.catalog and len(missing) < len(self.catalog):
            missing = list(dict.fromkeys([*missing, *(i for i in self.catalog if (*context, i) not in self._scores)]))
        if missing:
            impressions = [Impression(event_time=0, request_id="simulated", user_id=user, item_id=item, position=0,
                                      slate_size=1, propensity=1.0, model_version=None, policy_version=None)
                           for item in missing]
            out = self.model.predict(impressions, recent_items={user: list(recent)})
            if len(self._scores) + len(missing) > self.CACHE_LIMIT:
                self._scores.clear()
            for item, pctr, pcvr in zip(missing, out["pctr"], out["pcvr"]):
                self._scores[(*context, item)] = (float(pctr), float(pcvr))
        scores = np.array([self._scores[(*context, item)] for item in items], dtype=np.float64).reshape(-1, 2)
        return scores[:, 0], scores[:, 1]


def load_learned_users(registry_root: str, version: str | None = None, catalog: Sequence[str] = ()) -> LearnedUsers:
    """The learner's published model (latest by default) as a user response model."""
    from learner.model import load_model  # the learner package provides it; imported late on purpose
    from learner.registry import ModelRegistry

    return LearnedUsers(load_model(ModelRegistry(registry_root).load("model", version)), catalog=catalog)
