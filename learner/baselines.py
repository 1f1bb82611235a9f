"""Baselines that speak the same protocol as the network: popularity/CTR and logistic regression.

* :class:`PopularityModel`: each item's smoothed click-through and purchase rates, counted from
  the examples learned so far, shrunk toward the global rates (a new item scores the global rate).
* :class:`LogisticRegressionModel`: one logistic regression for pCTR and one for pCTCVR over the
  network's inputs (hashed user, item and category ids, position, price, Feast features, the
  item's cached text embedding), trained with the same fake-negative weighting.

>>> from streaming.events import Example, Impression
>>> imp = Impression(event_time=0, request_id="r", user_id="u", item_id="a", position=0, slate_size=1,
...                  propensity=1.0, model_version=None, policy_version=None)
>>> pop = PopularityModel(prior_strength=1.0)
>>> pop.learn_many([Example(event_time=1, impression=imp, clicked=True, purchased=False, click_time=1)], {})
{}
>>> round(float(pop.predict_many([Example(event_time=2, impression=imp, clicked=False, purchased=False)])["pctr"][0]), 3)
0.591
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.model import FEATURE_NAMES, RecommenderModel
from learner.online import Scores, load_optimizer_state, optimizer_state, task_targets
from streaming.events import Example, Item


class PopularityModel:
    """Per-item CTR and CVR with a Beta prior at the global rates."""

    name = "popularity"

    def __init__(self, prior_strength: float = 20.0) -> None:
        self.prior_strength = prior_strength
        self.counts: dict[str, list[float]] = {}  # item -> [impressions, clicks, purchases]
        self.total = [0.0, 0.0, 0.0]

    def observe_items(self, items: Sequence[Item]) -> None:
        pass

    def predict_many(self, examples: Sequence[Example]) -> Scores:
        impressions, clicks, purchases = self.total
        global_ctr = (clicks + 1.0) / (impressions + 10.0)
        global_cvr = (purchases + 1.0) / (clicks + 10.0)
        k = self.prior_strength
        pctr, pcvr = np.empty(len(examples)), np.empty(len(examples))
        for i, e in enumerate(examples):
            n, c, p = self.counts.get(e.impression.item_id, (0.0, 0.0, 0.0))
            pctr[i] = (c + k * global_ctr) / (n + k)
            pcvr[i] = (p + k * global_cvr) / (c + k)
        return {"pctr": pctr, "pcvr": pcvr, "pctcvr": pctr * pcvr}

    def learn_many(self, examples: Sequence[Example], predictions: Scores) -> dict[str, float]:
        for e in examples:
            counts = self.counts.setdefault(e.impression.item_id, [0.0, 0.0, 0.0])
            if e.label_mode == "windowed":
                delta = (1.0, float(e.clicked), float(e.clicked and e.purchased))
            else:  # each streaming copy adds what it reveals
                delta = {"impression": (1.0, 0.0, 0.0), "click": (0.0, 1.0, 0.0), "purchase": (0.0, 0.0, 1.0)}[e.emitted_on]
            for j in range(3):
                counts[j] += delta[j]
                self.total[j] += delta[j]
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        ids = list(self.counts)
        counts = torch.tensor([self.counts[i] for i in ids], dtype=torch.float64).reshape(-1, 3)
        return {"counts": counts}, {"ids": ids, "total": self.total}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.counts = {i: row for i, row in zip(meta["ids"], tensors["counts"].tolist())}
        self.total = list(meta["total"])


class _Logistic(nn.Module):
    def __init__(self, buckets: int, categories: int, positions: int, dense: int) -> None:
        super().__init__()
        self.ids = nn.Embedding(buckets, 2, sparse=True)  # user and item ids share one hashed table
        self.categories = nn.Embedding(categories, 2)
        self.positions = nn.Embedding(positions, 2)
        self.linear = nn.Linear(dense, 2)
        for table in (self.ids, self.categories, self.positions):
            nn.init.zeros_(table.weight)
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, -2.0)


class LogisticRegressionModel:
    """Two logistic regressions (click, click-and-purchase) over the network's own inputs."""

    name = "logistic"

    def __init__(self, inputs: RecommenderModel, learning_rate: float = 0.05) -> None:
        self.inputs = inputs  # shares the network's catalog, text cache and hashing
        cfg = inputs.config
        self.module = _Logistic(cfg.id_buckets, cfg.category_buckets, cfg.positions,
                                inputs.encoder.dim + 2 + 2 * len(FEATURE_NAMES))
        self.sparse = torch.optim.SparseAdam([self.module.ids.weight], lr=learning_rate)
        self.dense = torch.optim.Adam([p for n, p in self.module.named_parameters() if n != "ids.weight"], lr=learning_rate)

    def observe_items(self, items: Sequence[Item]) -> None:
        pass  # the network owns the catalog; it has seen these items already

    def _logits(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        imps = [e.impression for e in examples]
        batch = self.inputs.make_batch([i.user_id for i in imps], [i.item_id for i in imps], [i.position for i in imps],
                                       [i.features for i in imps], [() for _ in imps])
        m = self.module
        ids = torch.cat([batch.user_hash, batch.item_hash[batch.target]], dim=1)
        dense = torch.cat([batch.item_text[batch.target], batch.item_price[batch.target], batch.features], dim=1)
        logits = (m.ids(ids).sum(1) + m.categories(batch.item_category[batch.target]) + m.positions(batch.position)
                  + m.linear(dense))
        return logits[:, 0], logits[:, 1]

    def predict_many(self, examples: Sequence[Example]) -> Scores:
        with torch.no_grad():
            click, buy = self._logits(examples)
        pctr, pctcvr = torch.sigmoid(click).numpy(), torch.sigmoid(buy).numpy()
        pctcvr = np.minimum(pctcvr, pctr)
        return {"pctr": pctr, "pcvr": pctcvr / np.maximum(pctr, 1e-7), "pctcvr": pctcvr}

    def learn_many(self, examples: Sequence[Example], predictions: Scores) -> dict[str, float]:
        targets = {k: torch.from_numpy(v) for k, v in task_targets(examples, predictions).items()}
        click, buy = self._logits(examples)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        loss = (bce(click, targets["click"], weight=targets["click_weight"])
                + bce(buy, targets["buy"], weight=targets["buy_weight"]))
        self.sparse.zero_grad(set_to_none=True)
        self.dense.zero_grad(set_to_none=True)
        loss.backward()
        self.sparse.step()
        self.dense.step()
        return {"loss": float(loss.detach())}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"weights.{k}": v.detach().clone() for k, v in self.module.state_dict().items()}
        meta: dict[str, Any] = {}
        for name, optimizer in (("sparse", self.sparse), ("dense", self.dense)):
            t, meta[name] = optimizer_state(f"optim.{name}", optimizer)
            tensors.update(t)
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.module.load_state_dict({k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")})
        for name, optimizer in (("sparse", self.sparse), ("dense", self.dense)):
            load_optimizer_state(f"optim.{name}", optimizer, tensors, meta[name])
