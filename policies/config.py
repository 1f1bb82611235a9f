"""Settings of the policy layer: the simulated session, RLlib training, export and promotion.

``SessionConfig`` is the whole description of a simulator (it travels to Ray's env runners as a
plain dict); ``PolicySettings`` is the ``policy`` section of StreamRec's settings tree.

>>> SessionConfig().n_candidates, PolicySettings().train.algorithm
(10, 'ppo')
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_FEATURES: tuple[str, ...] = ("pctr", "pcvr", "pctcvr")


def validate_exploration(exploration: Mapping[str, Any]) -> dict[str, Any]:
    """A clean copy of an exploration spec, or ValueError saying what is wrong."""
    if not isinstance(exploration, Mapping):
        raise ValueError(f"exploration must be a mapping like {{'kind': 'softmax', 'temperature': 1.0}}, got {exploration!r}")
    kind = exploration.get("kind")
    if kind == "softmax":
        temperature = float(exploration.get("temperature", 1.0))
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"softmax temperature must be finite and > 0 (every item needs a propensity > 0), got {temperature}")
        return {"kind": "softmax", "temperature": temperature}
    if kind == "epsilon":
        epsilon = float(exploration.get("epsilon", 0.1))
        if not 0.0 < epsilon <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1] so every item has a propensity > 0, got {epsilon}")
        return {"kind": "epsilon", "epsilon": epsilon}
    raise ValueError(f"unknown exploration kind {kind!r}; use 'softmax' (with temperature) or 'epsilon' (with epsilon)")


class SessionConfig(BaseModel):
    """One simulated user session: who arrives, what is offered, how they respond and when they leave.

    Leaving depends on how the session went: after a click the user leaves with
    ``leave_after_click``, after a step without one with
    ``leave_after_miss + leave_per_miss * (misses in a row - 1)``, so ranking that keeps a user
    clicking earns more steps (and more reward) later.
    """

    model_config = ConfigDict(extra="forbid")

    world: dict[str, Any] = Field(default_factory=lambda: {"seed": 0, "n_users": 200, "n_items": 200},
                                  description="WorldConfig fields of the synthetic world (catalog, users, truth)")
    user_model: Literal["ground_truth", "learned"] = Field(
        default="ground_truth", description="who responds: the world's truth, or the learner's model fitted to logs")
    scorer: Literal["noisy_oracle", "model"] = Field(
        default="noisy_oracle", description="where candidates' pCTR/pCVR come from: the truth plus noise, or the learner's model")
    scorer_noise: float = Field(default=0.3, ge=0, description="std of the noisy oracle's error, in logits")
    model_registry: str | None = Field(default=None, description="registry with the learner's model (user_model/scorer 'model')")
    model_version: str | None = Field(default=None, description="model version to load (default: latest)")
    n_candidates: int = Field(default=10, ge=2, description="K: candidates offered per request (the action space)")
    slate_size: int = Field(default=1, ge=1, description="slots shown; slots after the top are filled by the scorer's pCTCVR order")
    feature_names: list[str] = Field(default_factory=lambda: list(DEFAULT_FEATURES),
                                     description="per-candidate features the policy sees")
    purchase_weight: float = Field(default=1.0, ge=0, description="w in reward = click + w * purchase")
    revenue_weight: float = Field(default=0.0, ge=0, description="extra reward per unit of log(1 + revenue) of a purchase")
    max_steps: int = Field(default=20, ge=1, description="a session is truncated after this many requests")
    leave_after_click: float = Field(default=0.05, ge=0, le=1)
    leave_after_miss: float = Field(default=0.2, ge=0, le=1)
    leave_per_miss: float = Field(default=0.15, ge=0, le=1)

    @model_validator(mode="after")
    def _fits(self) -> "SessionConfig":
        n_items = int(self.world.get("n_items", 300))
        if self.n_candidates > n_items:
            raise ValueError(f"n_candidates {self.n_candidates} is larger than the catalog ({n_items} items)")
        if self.slate_size > self.n_candidates:
            raise ValueError(f"slate_size {self.slate_size} is larger than n_candidates {self.n_candidates}")
        if "learned" in (self.user_model,) or self.scorer == "model":
            if self.model_registry is None:
                raise ValueError("user_model='learned' or scorer='model' needs model_registry (where the learner publishes)")
        return self


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["ppo", "bc", "marwil"] = "ppo"
    iterations: int = Field(default=30, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [32, 32], description="the candidate scorer's hidden layers")
    lr: float = Field(default=3e-3, gt=0)
    gamma: float = Field(default=0.9, ge=0, le=1, description="discount: how much later steps of a session count")
    train_batch_size: int = Field(default=2000, ge=32, description="PPO: env steps per iteration")
    minibatch_size: int = Field(default=250, ge=16)
    num_epochs: int = Field(default=6, ge=1)
    entropy_coeff: float = Field(default=0.003, ge=0)
    marwil_beta: float = Field(default=1.0, ge=0, description="MARWIL's advantage weight; 0 is behaviour cloning")
    offline_batch_size: int = Field(default=512, ge=16)
    num_env_runners: int = Field(default=0, ge=0, description="0 samples in the driver (fastest on 2 CPUs)")
    seed: int = 0


class PolicySettings(BaseModel):
    """The ``policy`` section of the settings tree."""

    model_config = ConfigDict(extra="forbid")

    session: SessionConfig = Field(default_factory=SessionConfig)
    train: TrainSettings = Field(default_factory=TrainSettings)
    ray_address: str | None = Field(default=None, description="a Ray cluster ('auto', 'ray://host:10001'); None: local Ray")
    num_cpus: int = Field(default=2, ge=1, description="CPUs of the local Ray (ignored with ray_address)")
    exploration: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "epsilon", "epsilon": 0.1},
        description="exploration the published policy serves with; epsilon does not depend on the logits' scale, "
        "softmax with temperature 1 is the trained policy's own distribution")
    registry: Path | None = Field(default=None, description="model registry (default: <data_dir>/registry)")
    eval_sessions: int = Field(default=2000, ge=10, description="simulated sessions for evaluation")
    bootstrap: int = Field(default=200, ge=10, description="bootstrap resamples for OPE confidence intervals")
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)

    @model_validator(mode="after")
    def _exploration(self) -> "PolicySettings":
        self.exploration = validate_exploration(self.exploration)
        return self


def registry_path(settings: PolicySettings, data_dir: Path) -> Path:
    return settings.registry if settings.registry is not None else data_dir / "registry"
