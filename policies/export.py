"""The serving policy: a plain torch re-ranker with exploration, published through the registry.

A trained policy leaves Ray behind here. What serves is :class:`ServingPolicy`: a small network
that scores each candidate from its feature row (the learner's pCTR/pCVR and item features, built
by :func:`candidate_features`, the one function training and serving share), then turns the
scores into action probabilities with the exploration it was published with, so every slate it
serves carries the propensity of each item it shows.

* ``{"kind": "softmax", "temperature": T}``: ``softmax(logits / T)``; ``T = 1`` is exactly the
  distribution the RL policy was trained as.
* ``{"kind": "epsilon", "epsilon": e}``: the best-scored candidate with probability ``1 - e``,
  plus ``e`` spread uniformly over all candidates.

>>> import numpy as np
>>> policy = greedy_policy(exploration={"kind": "epsilon", "epsilon": 0.2})
>>> features = candidate_features({"pctr": np.array([0.1, 0.3]), "pcvr": np.array([0.5, 0.1])},
...                               [{}, {}], policy.feature_names)
>>> features.round(3).tolist()
[[0.1, 0.5, 0.05], [0.3, 0.1, 0.03]]
>>> policy.action_probabilities(features).round(3).tolist()
[0.9, 0.1]
>>> slots, propensities = policy.sample_slate(features, 2, np.random.default_rng(0))
>>> sorted(slots), len(propensities)
([0, 1], 2)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.registry import CorruptArtifact, LoadedArtifact, ModelRegistry, PublishedArtifact
from policies.config import DEFAULT_FEATURES, validate_exploration
from streaming.features import ITEM_CATALOG, ITEM_STATS, USER_ACTIVITY

POLICY_FORMAT = "streamrec-policy-v1"
SCORE_FEATURES: tuple[str, ...] = ("pctr", "pcvr", "pctcvr")
# Derived per-candidate features and what they are computed from.
DERIVED_FEATURES: dict[str, str] = {"pctcvr": "pctr * pcvr", "log_price": "log(1 + price)"}
_NUMERIC_KINDS = ("int", "float")
KNOWN_ITEM_FEATURES: frozenset[str] = frozenset(
    name for view in (ITEM_STATS, ITEM_CATALOG, USER_ACTIVITY) for name, kind in view.items() if kind in _NUMERIC_KINDS
)


def candidate_features(scores: Mapping[str, np.ndarray], item_features: Sequence[Mapping[str, float]],
                       feature_names: Sequence[str]) -> np.ndarray:
    """The ``[K, F]`` feature matrix of K candidates, one column per name in ``feature_names``.

    A name is looked up in ``scores`` (model outputs, one array of length K each) first, then
    derived (``pctcvr`` from ``pctr * pcvr``, ``log_price`` from ``price``), then read from each
    candidate's ``item_features`` (Feast values). A known feature that a candidate lacks (a
    brand-new item has no click statistics yet) is 0; a name nobody knows is an error.

    >>> candidate_features({"pctr": np.array([0.2])}, [{"price": 9.0}], ["pctr", "log_price"]).round(3).tolist()
    [[0.2, 2.303]]
    """
    score_arrays = {name: np.asarray(values, dtype=np.float64).reshape(-1) for name, values in scores.items()}
    lengths = {name: len(values) for name, values in score_arrays.items()}
    k = len(item_features) if item_features else (next(iter(lengths.values())) if lengths else 0)
    if any(n != k for n in lengths.values()):
        raise ValueError(f"scores and item_features disagree on the number of candidates: {lengths}, {len(item_features)} items")
    columns = []
    for name in feature_names:
        if name in score_arrays:
            column = score_arrays[name]
        elif name == "pctcvr" and "pctr" in score_arrays and "pcvr" in score_arrays:
            column = score_arrays["pctr"] * score_arrays["pcvr"]
        elif name == "log_price":
            column = np.log1p(np.maximum([_item_value(item, "price") for item in item_features], 0.0))
        elif name in KNOWN_ITEM_FEATURES or any(name in item for item in item_features):
            column = np.array([_item_value(item, name) for item in item_features], dtype=np.float64)
        else:
            raise ValueError(f"no value for candidate feature {name!r}: it is not in the scores ({sorted(score_arrays)}), "
                             f"not derived ({sorted(DERIVED_FEATURES)}) and not an item feature")
        columns.append(np.asarray(column, dtype=np.float64).reshape(k))
    return np.stack(columns, axis=1) if columns else np.zeros((k, 0))


def _item_value(item: Mapping[str, float], name: str) -> float:
    value = item.get(name)
    if value is None:
        return 0.0
    value = float(value)
    return value if math.isfinite(value) else 0.0


class ScoringNet(nn.Module):
    """One logit per candidate from its feature row; the same weights score every candidate.

    ``(x - shift) / scale`` puts features on a comparable range, then an MLP (``hidden`` may be
    empty: a linear scorer). Input ``[..., K, F]``, output ``[..., K]``.
    """

    def __init__(self, n_features: int, hidden: Sequence[int] = (64, 64),
                 shift: Sequence[float] | None = None, scale: Sequence[float] | None = None) -> None:
        super().__init__()
        self.n_features, self.hidden = int(n_features), [int(h) for h in hidden]
        self.register_buffer("shift", torch.as_tensor(shift if shift is not None else [0.0] * n_features, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale if scale is not None else [1.0] * n_features, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = self.n_features
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.shift) / self.scale).squeeze(-1)


class ServingPolicy:
    """A trained (or hand-made) re-ranking policy that runs with torch alone."""

    def __init__(self, scorer: ScoringNet, feature_names: Sequence[str], exploration: Mapping[str, Any],
                 *, version: str | None = None, name: str = "policy", info: Mapping[str, Any] | None = None) -> None:
        if scorer.n_features != len(feature_names):
            raise ValueError(f"the scorer reads {scorer.n_features} features but {len(feature_names)} names were given")
        self.scorer = scorer.eval()
        self.feature_names = list(feature_names)
        self.exploration = validate_exploration(exploration)
        self.version = version
        self.name = name
        self.info = dict(info or {})

    def with_exploration(self, exploration: Mapping[str, Any]) -> "ServingPolicy":
        """The same scorer with another exploration (shares the weights)."""
        return ServingPolicy(self.scorer, self.feature_names, exploration, version=self.version, name=self.name, info=self.info)

    def _check(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != len(self.feature_names) or features.shape[0] == 0:
            raise ValueError(f"candidate features must be [K >= 1, {len(self.feature_names)}] "
                             f"(columns {self.feature_names}), got shape {features.shape}")
        if not np.isfinite(features).all():
            raise ValueError("candidate features contain NaN or infinity; build them with candidate_features()")
        return features

    def logits(self, candidate_features: np.ndarray) -> np.ndarray:
        """The scorer's raw score of each of the K candidates (no exploration)."""
        features = self._check(candidate_features)
        with torch.no_grad():
            return self.scorer(torch.from_numpy(features)).double().numpy()

    def action_probabilities(self, candidate_features: np.ndarray) -> np.ndarray:
        """P(each candidate is put in the top slot), exploration included: ``[K]``, > 0, sums to 1."""
        return self._probabilities(self.logits(candidate_features))

    def _probabilities(self, logits: np.ndarray) -> np.ndarray:
        if self.exploration["kind"] == "softmax":
            z = logits / self.exploration["temperature"]
            z = np.exp(z - z.max())
            p = z / z.sum()
            # an extreme logit gap can underflow to 0; keep every propensity strictly positive
            p = np.maximum(p, 1e-12)
            return p / p.sum()
        epsilon = self.exploration["epsilon"]
        p = np.full(len(logits), epsilon / len(logits))
        p[int(np.argmax(logits))] += 1.0 - epsilon
        return p

    def sample_slate(self, candidate_features: np.ndarray, k: int, rng: np.random.Generator) -> tuple[list[int], list[float]]:
        """Plackett-Luce without replacement: ``k`` candidate indices in slot order, and each one's propensity.

        A slot's propensity is the probability of choosing that item there given the items above it
        (for slot 0 that is its plain probability), always > 0.
        """
        logits = self.logits(candidate_features)
        remaining = list(range(len(logits)))
        chosen, propensities = [], []
        for _ in range(min(int(k), len(logits))):
            p = self._probabilities(logits[remaining])
            j = int(rng.choice(len(remaining), p=p))
            chosen.append(remaining.pop(j))
            propensities.append(float(p[j]))
        return chosen, propensities

    def schema(self) -> dict[str, Any]:
        return {"format": POLICY_FORMAT, "name": self.name, "feature_names": self.feature_names,
                "exploration": self.exploration, "hidden": self.scorer.hidden, "info": self.info}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.scorer.state_dict().items()}


def greedy_policy(feature_names: Sequence[str] = DEFAULT_FEATURES,
                  exploration: Mapping[str, Any] | None = None, rank_by: str = "pctcvr") -> ServingPolicy:
    """The baseline: rank candidates by one feature (pCTCVR by default), as a publishable policy.

    With softmax exploration the logits are the feature's raw values, so pick the temperature in
    its units (e.g. 0.02 for pCTCVR).
    """
    names = list(feature_names)
    if rank_by not in names:
        raise ValueError(f"rank_by={rank_by!r} must be one of the policy's features {names}")
    scorer = ScoringNet(len(names), hidden=())
    with torch.no_grad():
        scorer.net[0].weight.zero_()
        scorer.net[0].weight[0, names.index(rank_by)] = 1.0
        scorer.net[0].bias.zero_()
    return ServingPolicy(scorer, names, exploration or {"kind": "epsilon", "epsilon": 0.1}, name=f"greedy-{rank_by}")


def publish_policy(registry: ModelRegistry, policy: ServingPolicy, *, metrics: Mapping[str, float] | None = None,
                   parent: str | None = None) -> PublishedArtifact:
    """Publish ``policy`` as a new ``kind="policy"`` version and stamp the version on it."""
    artifact = registry.publish("policy", policy.tensors(), schema=policy.schema(), parent=parent,
                                metrics=dict(metrics or {}))
    policy.version = artifact.version
    return artifact


def load_policy(artifact: LoadedArtifact) -> ServingPolicy:
    """Rebuild a :class:`ServingPolicy` from a verified artifact; CorruptArtifact on anything wrong."""
    where = f"policy {artifact.version}"
    if artifact.kind != "policy":
        raise CorruptArtifact(f"{where}: the artifact holds a {artifact.kind!r}, not a policy")
    schema = artifact.manifest.get("schema")
    if not isinstance(schema, dict) or schema.get("format") != POLICY_FORMAT:
        raise CorruptArtifact(f"{where}: schema format is not {POLICY_FORMAT!r}: {json.dumps(schema)[:200]}")
    try:
        names = [str(n) for n in schema["feature_names"]]
        hidden = [int(h) for h in schema["hidden"]]
        scorer = ScoringNet(len(names), hidden)
        scorer.load_state_dict({k: v.float() for k, v in artifact.tensors.items()}, strict=True)
        policy = ServingPolicy(scorer, names, schema["exploration"], version=artifact.version,
                               name=str(schema.get("name", "policy")), info=schema.get("info") or {})
        probe = policy.action_probabilities(np.zeros((3, len(names))))  # smoke test before anyone serves it
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CorruptArtifact(f"{where}: cannot rebuild the policy: {exc}") from None
    if not (np.isfinite(probe).all() and abs(probe.sum() - 1.0) < 1e-6 and (probe > 0).all()):
        raise CorruptArtifact(f"{where}: the policy gives invalid probabilities {probe}")
    return policy
