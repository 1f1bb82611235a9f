"""The RLlib side of the re-ranker: an RLModule whose policy is exactly the exportable scorer.

The action logits come from :class:`policies.export.ScoringNet` applied to each candidate's row of
the observation, and nothing else, so the trained policy exports to a :class:`ServingPolicy`
with identical action probabilities and no Ray. The value head (PPO, MARWIL) also sees the
user's session state and a summary of the candidate set; it is used in training only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from policies.export import ScoringNet, ServingPolicy


class CandidateRankingModule(TorchRLModule, ValueFunctionAPI):
    """``model_config``: n_candidates, n_features, n_user_features, hidden, and optional shift/scale."""

    def setup(self) -> None:
        cfg = self.model_config
        self.n_candidates, self.n_features = int(cfg["n_candidates"]), int(cfg["n_features"])
        self.n_user_features = int(cfg["n_user_features"])
        expected = self.n_candidates * self.n_features + self.n_user_features
        if self.observation_space is not None and self.observation_space.shape != (expected,):
            raise ValueError(f"observation space {self.observation_space.shape} does not match "
                             f"{self.n_candidates} candidates x {self.n_features} features + {self.n_user_features}")
        self.scorer = ScoringNet(self.n_features, cfg.get("hidden", (32, 32)), cfg.get("shift"), cfg.get("scale"))
        width = int(cfg.get("value_hidden", 64))
        self.value_net = nn.Sequential(
            nn.Linear(self.n_user_features + 2 * self.n_features + 1, width), nn.Tanh(),
            nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

    def _split(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cut = self.n_candidates * self.n_features
        return obs[..., :cut].reshape(*obs.shape[:-1], self.n_candidates, self.n_features), obs[..., cut:]

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        candidates, _ = self._split(batch[Columns.OBS].float())
        return {Columns.ACTION_DIST_INPUTS: self.scorer(candidates)}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        candidates, user = self._split(batch[Columns.OBS].float())
        normalised = (candidates - self.scorer.shift) / self.scorer.scale
        with torch.no_grad():
            best = self.scorer(candidates).max(dim=-1, keepdim=True).values
        summary = torch.cat([user, normalised.mean(dim=-2), normalised.max(dim=-2).values, best], dim=-1)
        return self.value_net(summary).squeeze(-1)


def module_config(n_candidates: int, n_features: int, n_user_features: int, hidden: list[int],
                  shift: list[float] | None = None, scale: list[float] | None = None) -> dict[str, Any]:
    return {"n_candidates": n_candidates, "n_features": n_features, "n_user_features": n_user_features,
            "hidden": list(hidden), "shift": shift, "scale": scale}


def serving_policy_from_module(module: CandidateRankingModule, feature_names: list[str], exploration: dict,
                               *, name: str = "policy", info: dict | None = None) -> ServingPolicy:
    """Copy the module's scorer weights into a Ray-free :class:`ServingPolicy`."""
    scorer = ScoringNet(module.n_features, module.scorer.hidden)
    scorer.load_state_dict({k: v.detach().cpu().clone() for k, v in module.scorer.state_dict().items()})
    return ServingPolicy(scorer, feature_names, exploration, name=name, info=info)
