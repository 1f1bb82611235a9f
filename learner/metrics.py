"""Prequential (test-then-train) metrics: AUC, log loss and calibration, windowed and overall.

:class:`TaskMetrics` scores one task's predictions against its labels, over a sliding window of
the last N examples (exact AUC) and over the whole stream (AUC from a fine histogram of the
predictions, log loss and calibration from running sums). Calibration is mean prediction over
mean label: 1.0 is calibrated, above 1 over-predicts.

:class:`PrequentialMetrics` holds the three tasks (``ctr``: pCTR vs click; ``ctcvr``: pCTCVR vs
click-and-purchase over impressions; ``cvr``: pCVR vs purchase over clicked impressions) and
respects label delay. In ``windowed`` label mode an example carries its final labels, so its
prediction is scored at once. In ``streaming`` mode the impression copy is predicted when it
arrives but scored only once its impression is ``label_delay_ms`` old in event time, with the
click and purchase copies that arrived in between setting its labels, as River's
``progressive_val_score`` does with its ``delay``.

>>> m = TaskMetrics(window=4)
>>> m.update(np.array([0.9, 0.2, 0.7, 0.1]), np.array([1.0, 0.0, 1.0, 0.0]))
>>> m.summary()["auc"], round(m.summary()["calibration"], 3)
(1.0, 0.95)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from streaming.events import Example

TASKS = ("ctr", "ctcvr", "cvr")
BINS = 4096
_EPS = 1e-7


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC with ties counted half; NaN when one class is missing."""
    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    averaged = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks[order] = averaged
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _histogram_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    n_pos, n_neg = positives.sum(), negatives.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(negatives) - negatives  # negatives strictly below each bin
    return float((positives * (below + 0.5 * negatives)).sum() / (n_pos * n_neg))


class TaskMetrics:
    """One task's metrics over a sliding window and overall; all state is numbers and arrays."""

    def __init__(self, window: int = 10_000) -> None:
        self.window = window
        self.scores = np.zeros(window, dtype=np.float64)
        self.labels = np.zeros(window, dtype=np.float64)
        self.filled = 0
        self.head = 0
        self.positives = np.zeros(BINS, dtype=np.int64)
        self.negatives = np.zeros(BINS, dtype=np.int64)
        self.count = 0
        self.sum_scores = 0.0
        self.sum_labels = 0.0
        self.sum_log_loss = 0.0

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scores = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1 - _EPS)
        labels = np.asarray(labels, dtype=np.float64)
        if scores.size == 0:
            return
        for start in range(0, len(scores), self.window):  # a batch larger than the window keeps its tail
            s, y = scores[start: start + self.window], labels[start: start + self.window]
            idx = (self.head + np.arange(len(s))) % self.window
            self.scores[idx], self.labels[idx] = s, y
            self.head = int((self.head + len(s)) % self.window)
            self.filled = min(self.window, self.filled + len(s))
        bins = np.minimum((scores * BINS).astype(np.int64), BINS - 1)
        self.positives += np.bincount(bins[labels > 0.5], minlength=BINS)
        self.negatives += np.bincount(bins[labels <= 0.5], minlength=BINS)
        self.count += len(scores)
        self.sum_scores += float(scores.sum())
        self.sum_labels += float(labels.sum())
        self.sum_log_loss += float(-(labels * np.log(scores) + (1 - labels) * np.log(1 - scores)).sum())

    def summary(self) -> dict[str, float]:
        s, y = self.scores[: self.filled], self.labels[: self.filled]
        nan = float("nan")
        return {
            "auc": auc(s, y) if self.filled else nan,
            "log_loss": float(-(y * np.log(s) + (1 - y) * np.log(1 - s)).mean()) if self.filled else nan,
            "calibration": float(s.mean() / y.mean()) if self.filled and y.sum() > 0 else nan,
            "mean_prediction": float(s.mean()) if self.filled else nan,
            "rate": float(y.mean()) if self.filled else nan,
            "auc_overall": _histogram_auc(self.positives, self.negatives),
            "log_loss_overall": self.sum_log_loss / self.count if self.count else nan,
            "calibration_overall": self.sum_scores / self.sum_labels if self.sum_labels > 0 else nan,
            "count": float(self.count),
        }

    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{prefix}.scores": torch.from_numpy(self.scores.copy()),
                   f"{prefix}.labels": torch.from_numpy(self.labels.copy()),
                   f"{prefix}.positives": torch.from_numpy(self.positives.copy()),
                   f"{prefix}.negatives": torch.from_numpy(self.negatives.copy())}
        meta = {"window": self.window, "filled": self.filled, "head": self.head, "count": self.count,
                "sum_scores": self.sum_scores, "sum_labels": self.sum_labels, "sum_log_loss": self.sum_log_loss}
        return tensors, meta

    def load_state(self, prefix: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        if meta["window"] != self.window:
            raise ValueError(f"metric window {meta['window']} in the checkpoint is not the configured {self.window}")
        self.scores = tensors[f"{prefix}.scores"].numpy().copy()
        self.labels = tensors[f"{prefix}.labels"].numpy().copy()
        self.positives = tensors[f"{prefix}.positives"].numpy().copy()
        self.negatives = tensors[f"{prefix}.negatives"].numpy().copy()
        for key in ("filled", "head", "count", "sum_scores", "sum_labels", "sum_log_loss"):
            setattr(self, key, meta[key])


class PrequentialMetrics:
    """The three tasks of one model, with label delay for ``streaming``-mode examples."""

    def __init__(self, window: int = 10_000, label_delay_ms: int = 30 * 60_000) -> None:
        self.tasks = {task: TaskMetrics(window) for task in TASKS}
        self.label_delay_ms = label_delay_ms
        self.pending: OrderedDict[str, list] = OrderedDict()  # impression id -> [time, pctr, pcvr, pctcvr, click, buy]
        self.watermark = -1

    def record(self, predictions: Mapping[str, np.ndarray], examples: Sequence[Example]) -> None:
        """Score predictions made before learning on ``examples`` (test, then train)."""
        windowed = [i for i, e in enumerate(examples) if e.label_mode == "windowed"]
        if windowed:
            idx = np.array(windowed)
            click = np.array([examples[i].clicked for i in windowed], dtype=np.float64)
            buy = np.array([examples[i].clicked and examples[i].purchased for i in windowed], dtype=np.float64)
            self._score(predictions["pctr"][idx], predictions["pcvr"][idx], predictions["pctcvr"][idx], click, buy)
        if len(windowed) == len(examples):
            return
        for i, example in enumerate(examples):
            if example.label_mode != "streaming":
                continue
            key = example.impression.event_id
            if example.emitted_on == "impression":
                self.pending[key] = [example.impression.event_time, float(predictions["pctr"][i]),
                                     float(predictions["pcvr"][i]), float(predictions["pctcvr"][i]), 0.0, 0.0]
                self.watermark = max(self.watermark, example.impression.event_time)
            elif key in self.pending:  # a label copy: it fixes the labels of the scored impression
                entry = self.pending[key]
                entry[4] = 1.0
                if example.emitted_on == "purchase":
                    entry[5] = 1.0
        self._settle(self.watermark - self.label_delay_ms)

    def flush(self) -> None:
        """Score every pending prediction with the labels known now (end of a finite stream)."""
        self._settle(None)

    def _settle(self, before: int | None) -> None:
        done = []
        while self.pending:
            key, entry = next(iter(self.pending.items()))
            if before is not None and entry[0] >= before:
                break
            done.append(entry)
            self.pending.popitem(last=False)
        if done:
            rows = np.array(done, dtype=np.float64)
            self._score(rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4], rows[:, 5])

    def _score(self, pctr, pcvr, pctcvr, click, buy) -> None:
        self.tasks["ctr"].update(pctr, click)
        self.tasks["ctcvr"].update(pctcvr, buy)
        clicked = click > 0.5
        self.tasks["cvr"].update(pcvr[clicked], buy[clicked])

    def summary(self) -> dict[str, float]:
        """Flat ``{task}_{metric}`` numbers, e.g. ``ctr_auc``, ``ctcvr_calibration_overall``."""
        return {f"{task}_{k}": v for task, metrics in self.tasks.items() for k, v in metrics.summary().items()}

    def state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"watermark": self.watermark, "tasks": {}}
        for task, metrics in self.tasks.items():
            t, m = metrics.state(f"{prefix}.{task}")
            tensors.update(t)
            meta["tasks"][task] = m
        meta["pending_ids"] = list(self.pending)
        tensors[f"{prefix}.pending"] = torch.tensor([v for v in self.pending.values()], dtype=torch.float64).reshape(-1, 6)
        return tensors, meta

    def load_state(self, prefix: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.watermark = meta["watermark"]
        for task, metrics in self.tasks.items():
            metrics.load_state(f"{prefix}.{task}", tensors, meta["tasks"][task])
        rows = tensors[f"{prefix}.pending"].tolist()
        self.pending = OrderedDict((key, row) for key, row in zip(meta["pending_ids"], rows))
        if not all(math.isfinite(r[0]) for r in rows):
            raise ValueError("pending metric entries are corrupt")
