"""``streamrec learn``: the trainer as a long-running Kafka consumer (the imperative shell).

It reads the ``examples`` and ``items`` topics with its own consumer group, feeds the records to
:class:`~learner.trainer.IncrementalTrainer`, and commits the consumer's offsets only after a
checkpoint holding the weights *and* those offsets is durable. After a crash it restores the
newest checkpoint and skips records below the checkpointed offsets (the group may have
committed less), so every example is learned exactly once. Published versions are announced on
``model-updates``. SIGTERM/SIGINT finish the batch in hand, checkpoint, commit and exit.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learner.config import LearnerSettings
from learner.online import resolve_device
from learner.registry import ModelRegistry
from learner.trainer import IncrementalTrainer
from streaming.config import KafkaSettings
from streaming.events import ModelUpdate
from streaming.kafka_io import EventConsumer, EventProducer, ensure_topics

log = logging.getLogger(__name__)


@dataclass
class LearnerPaths:
    checkpoints: Path
    registry: Path


def learner_paths(settings: LearnerSettings, data_dir: Path) -> LearnerPaths:
    registry = settings.registry or str(data_dir / "registry")
    return LearnerPaths(
        checkpoints=Path(settings.checkpoint_dir or data_dir / "learner" / "checkpoints"),
        registry=Path(registry.removeprefix("file://")),
    )


def run_learner(kafka: KafkaSettings, settings: LearnerSettings, data_dir: Path,
                until: Callable[[IncrementalTrainer], bool] | None = None,
                on_progress: Callable[[dict[str, Any]], None] | None = None,
                progress_every_s: float = 10.0) -> dict[str, Any]:
    """Consume, learn, checkpoint, commit and publish until stopped; returns the final report."""
    ensure_topics(kafka, ["examples", "items", "model-updates", "dlq"])
    paths = learner_paths(settings, data_dir)
    producer = EventProducer(kafka)

    def announce(update: ModelUpdate) -> None:
        producer.send(update)
        producer.flush()

    trainer = IncrementalTrainer(settings, checkpoint_dir=paths.checkpoints, registry=ModelRegistry(paths.registry),
                                 announce=announce)
    resumed = trainer.restore()
    log.info("learner on %s: %s, %d examples learned so far", resolve_device(settings.device),
             f"resumed from checkpoint {trainer.checkpoint_seq}" if resumed else "fresh start", trainer.examples_learned)
    overrides = {"group_instance_id": settings.instance_id} if settings.instance_id else {}
    consumer = EventConsumer(kafka, ["examples", "items"], group_id=settings.group_id, dead_letters=producer, **overrides)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            # consumer.stop() too: a commit waiting for an unreachable broker gives up instead of holding the exit
            previous[sig] = signal.signal(sig, lambda *_: (stop.set(), consumer.stop()))
    last_progress = time.monotonic()
    try:
        while not stop.is_set() and not (until and until(trainer)):
            records = consumer.poll()
            if records:
                trainer.learn_events((f"{r.topic}:{r.partition}:{r.offset}", r.event) for r in records)
            if trainer.checkpoint_due():
                trainer.checkpoint()
                consumer.commit()  # only now: the checkpoint holds everything polled so far
            if trainer.publish_due():
                trainer.publish()
            if on_progress and time.monotonic() - last_progress >= progress_every_s:
                on_progress(trainer.report())
                last_progress = time.monotonic()
        if trainer.dirty:
            trainer.checkpoint()
        consumer.commit()
        return trainer.report()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        consumer.close()
        producer.close()
