"""The incremental trainer: batch in, predict, score, learn, checkpoint, publish.

For every micro-batch of examples, each model (the network and the baselines, all speaking
:class:`~learner.online.OnlineModel`) first predicts, the predictions are scored against the
labels (:class:`~learner.metrics.PrequentialMetrics`, test-then-train), and only then does it
take its gradient step. Catalog events (``Item``) go to the models before the examples that
follow them.

Exactly-once: the trainer tracks the next offset of every (topic, partition) it has learned
from, and checkpoints it with the weights; a record below that offset (redelivered after a
crash, because the consumer commits only after a checkpoint) is skipped, and an example whose
event id was learned recently (re-emitted upstream) is dropped.

>>> from learner.config import LearnerSettings, tiny_model_config
>>> from policies.synthetic_world import SyntheticWorld, WorldConfig
>>> from streaming.stream_processor import StreamProcessor
>>> world = SyntheticWorld(WorldConfig(n_users=30, n_items=20))
>>> examples = [e for out in StreamProcessor().run(world.generate_log(200)) for e in out.examples]
>>> trainer = IncrementalTrainer(LearnerSettings(model=tiny_model_config(), batch_size=64, device="cpu"))
>>> report = trainer.learn_stream(world.item_events() + examples)
>>> report["examples"], sorted(report["models"])
(1000, ['logistic', 'model', 'popularity'])
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from learner.baselines import LogisticRegressionModel, PopularityModel
from learner.checkpoint import CheckpointStore
from learner.config import LearnerSettings
from learner.metrics import PrequentialMetrics
from learner.model import publish_model
from learner.online import MultiTaskLearner, OnlineModel
from learner.registry import ModelRegistry, PublishedArtifact
from streaming.events import Event, Example, Item, ModelUpdate

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


class IncrementalTrainer:
    """Trains the network and the baselines on one stream; checkpoints and publishes the network."""

    def __init__(self, settings: LearnerSettings, *, learner: MultiTaskLearner | None = None,
                 baselines: Sequence[str] = ("popularity", "logistic"),
                 checkpoint_dir: str | Path | None = None, registry: ModelRegistry | None = None,
                 announce: Callable[[ModelUpdate], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.learner = learner or MultiTaskLearner(settings)
        self.models: dict[str, OnlineModel] = {"model": self.learner}
        for name in baselines:
            if name == "popularity":
                self.models[name] = PopularityModel()
            elif name == "logistic":
                self.models[name] = LogisticRegressionModel(self.learner.model)
            else:
                raise ValueError(f"unknown baseline {name!r}; StreamRec has 'popularity' and 'logistic'")
        self.metrics = {name: PrequentialMetrics(settings.metrics_window, settings.label_delay_ms) for name in self.models}
        self.store = CheckpointStore(checkpoint_dir, settings.checkpoints_kept, settings.ledger) if checkpoint_dir else None
        self.registry = registry
        self.announce = announce
        self.clock = clock
        self.offsets: dict[str, int] = {}
        self.examples_learned = 0
        self.duplicates_skipped = 0
        self.recent_ids: OrderedDict[str, None] = OrderedDict()
        self.learned_since_checkpoint: list[str] = []
        self.published: dict[str, Any] | None = None  # version, ctr_auc, examples
        self.checkpoint_seq = 0
        self._last_checkpoint = clock()
        self._last_publish = clock()
        self._examples_at_checkpoint = 0
        self._offsets_at_checkpoint: dict[str, int] = {}
        self._pending_examples: list[Example] = []
        self._pending_ids: list[str] = []

    # -- learning ----------------------------------------------------------------------------------
    def observe_items(self, items: Sequence[Item]) -> None:
        if items:
            for model in self.models.values():
                model.observe_items(items)

    def learn_batch(self, examples: Sequence[Example]) -> dict[str, float]:
        """Test-then-train on one micro-batch (already de-duplicated); returns the network's losses."""
        if not examples:
            return {}
        losses: dict[str, float] = {}
        for name, model in self.models.items():
            predictions = model.predict_many(examples)
            self.metrics[name].record(predictions, examples)
            out = model.learn_many(examples, predictions)
            if name == "model":
                losses = out
        self.examples_learned += len(examples)
        self.learned_since_checkpoint += [e.event_id for e in examples]
        return losses

    def _is_new(self, example: Example) -> bool:
        if example.event_id in self.recent_ids:
            self.duplicates_skipped += 1
            return False
        if self.settings.dedup_ids:
            self.recent_ids[example.event_id] = None
            if len(self.recent_ids) > self.settings.dedup_ids:
                self.recent_ids.popitem(last=False)
        return True

    def learn_events(self, events: Iterable[tuple[str | None, Event]]) -> int:
        """Learn from (source position, event) pairs in order; a position is "topic:partition:offset".

        Records at positions already learned are skipped; examples are batched by ``batch_size``.
        Returns the number of examples learned.
        """
        before = self.examples_learned
        size = self.settings.batch_size
        items: list[Item] = []
        for position, event in events:
            if position is not None:
                source, _, offset_text = position.rpartition(":")
                offset = int(offset_text)
                if offset < self.offsets.get(source, 0):
                    continue
                self.offsets[source] = offset + 1
            if isinstance(event, Item):
                if self._pending_examples:
                    self._flush_pending()
                items.append(event)
                continue
            if items:
                self.observe_items(items)
                items = []
            if isinstance(event, Example) and self._is_new(event):
                self._pending_examples.append(event)
                if len(self._pending_examples) >= size:
                    self._flush_pending()
        if items:
            self.observe_items(items)
        self._flush_pending()
        return self.examples_learned - before

    def _flush_pending(self) -> None:
        size = self.settings.batch_size
        pending, self._pending_examples = self._pending_examples, []
        for start in range(0, len(pending), size):
            self.learn_batch(pending[start: start + size])

    def learn_stream(self, events: Iterable[Event]) -> dict[str, Any]:
        """In-process entry point: learn from examples and catalog items in order; returns the report.

        Other event types (impressions, clicks, ...) are ignored; the stream processor turns them
        into examples first. Metrics of streaming-mode predictions still waiting for labels are
        settled at the end.
        """
        chunk: list[tuple[None, Event]] = []
        for event in events:
            chunk.append((None, event))
            if len(chunk) >= 16 * self.settings.batch_size:
                self.learn_events(chunk)
                chunk = []
        self.learn_events(chunk)
        for metrics in self.metrics.values():
            metrics.flush()
        return self.report()

    def report(self) -> dict[str, Any]:
        return {
            "examples": self.examples_learned,
            "duplicates_skipped": self.duplicates_skipped,
            "steps": self.learner.steps,
            "published": self.published,
            "models": {name: metrics.summary() for name, metrics in self.metrics.items()},
        }

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        """Whether anything was consumed since the last checkpoint."""
        return self.offsets != self._offsets_at_checkpoint or self.examples_learned != self._examples_at_checkpoint

    def checkpoint_due(self) -> bool:
        return self.store is not None and (
            self.examples_learned - self._examples_at_checkpoint >= self.settings.checkpoint_every_examples
            or (self.clock() - self._last_checkpoint >= self.settings.checkpoint_every_s and self.dirty))

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "offsets": dict(self.offsets),
                                "examples_learned": self.examples_learned, "duplicates_skipped": self.duplicates_skipped,
                                "recent_ids": list(self.recent_ids), "published": self.published,
                                "models": {}, "metrics": {}}
        for name, model in self.models.items():
            t, m = model.state()
            tensors.update({f"{name}.{k}": v for k, v in t.items()})
            meta["models"][name] = m
        for name, metrics in self.metrics.items():
            t, m = metrics.state(f"metrics.{name}")
            tensors.update(t)
            meta["metrics"][name] = m
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {meta.get('format')!r} is not {CHECKPOINT_FORMAT}")
        if set(meta["models"]) != set(self.models):
            raise ValueError(f"the checkpoint holds models {sorted(meta['models'])}, this trainer runs {sorted(self.models)}")
        for name, model in self.models.items():
            prefix = f"{name}."
            model.load_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["models"][name])
        for name, metrics in self.metrics.items():
            metrics.load_state(f"metrics.{name}", tensors, meta["metrics"][name])
        self.offsets = dict(meta["offsets"])
        self.examples_learned = meta["examples_learned"]
        self.duplicates_skipped = meta["duplicates_skipped"]
        self.recent_ids = OrderedDict((i, None) for i in meta["recent_ids"])
        self.published = meta["published"]
        self._examples_at_checkpoint = self.examples_learned
        self._offsets_at_checkpoint = dict(self.offsets)
        self.learned_since_checkpoint = []

    def checkpoint(self) -> int:
        """Write a checkpoint (weights, optimizers, metrics, offsets); return its sequence number."""
        if self.store is None:
            raise RuntimeError("this trainer has no checkpoint directory")
        self._flush_pending()
        tensors, meta = self.state()
        self.checkpoint_seq = self.store.save(tensors, meta, self.learned_since_checkpoint)
        self.learned_since_checkpoint = []
        self._examples_at_checkpoint = self.examples_learned
        self._offsets_at_checkpoint = dict(self.offsets)
        self._last_checkpoint = self.clock()
        return self.checkpoint_seq

    def restore(self) -> bool:
        """Resume from the newest good checkpoint; False when there is none (a fresh start)."""
        if self.store is None:
            return False
        checkpoint = self.store.latest()
        if checkpoint is None:
            return False
        self.load_state(checkpoint.tensors, checkpoint.meta)
        self.checkpoint_seq = checkpoint.seq
        log.info("resumed from checkpoint %d: %d examples learned, offsets %s", checkpoint.seq,
                 self.examples_learned, self.offsets)
        return True

    # -- publishing --------------------------------------------------------------------------------
    def publish_due(self) -> bool:
        learned = self.examples_learned - (self.published or {}).get("examples", 0)
        return (self.registry is not None and learned >= self.settings.publish_min_examples
                and self.clock() - self._last_publish >= self.settings.publish_every_s)

    def publish(self, force: bool = False) -> PublishedArtifact | None:
        """Publish the network if it passes the quality gate, then announce it; None when gated."""
        if self.registry is None:
            raise RuntimeError("this trainer has no registry to publish to")
        self._last_publish = self.clock()
        summary = self.metrics["model"].summary()
        auc = summary["ctr_auc"]
        if not force:
            if math.isnan(auc):
                log.info("not publishing: the click AUC is undefined so far (no clicks in the window)")
                return None
            if self.published is not None and auc < self.published["ctr_auc"] - self.settings.quality_gate_margin:
                log.warning("not publishing: click AUC %.4f is below the last version's %.4f by more than %.3f",
                            auc, self.published["ctr_auc"], self.settings.quality_gate_margin)
                return None
        self.learner.refresh_cache()
        metrics = {k: v for k, v in summary.items() if not math.isnan(v)}
        metrics["examples"] = float(self.examples_learned)
        # lineage: the next offset of every source, so anyone can tell which records a version has learned
        artifact = publish_model(self.registry, self.learner.model, metrics=metrics,
                                 parent=(self.published or {}).get("version"),
                                 lineage={"offsets": dict(self.offsets), "examples": self.examples_learned})
        self.published = {"version": artifact.version, "ctr_auc": auc, "examples": self.examples_learned}
        if self.announce is not None:
            self.announce(self.registry.announcement(artifact))
        log.info("published model %s (click AUC %.4f after %d examples)", artifact.version, auc, self.examples_learned)
        return artifact
