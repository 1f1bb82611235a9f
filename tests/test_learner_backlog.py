"""The learner working off a backlog on the real broker keeps a bounded amount in memory.

What is structurally true, counted while ``run_learner`` (what ``streamrec learn`` runs) consumes
30,000 examples: one poll hands it at most ``max_poll_records`` records, the trainer holds at most
``batch_size`` examples waiting for a step, so never more than their sum at once; what it keeps
across batches (de-duplication window, ids learned since the last checkpoint) stays within its
settings; and the process's RSS hardly grows from a third of the backlog to the end (a decoded
example is ~4 KB, so keeping each one would add ~80 MB). ``benchmarks/learner_backlog.py``
measures the same with 1,000,000 examples.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import learner.service
from learner.config import LearnerSettings, tiny_model_config
from learner.model import FEATURE_NAMES
from learner.trainer import IncrementalTrainer
from policies.synthetic_world import SyntheticWorld, WorldConfig
from streaming.kafka_io import EventConsumer, EventProducer
from streaming.stream_processor import StreamProcessor

pytestmark = pytest.mark.kafka
N, MAX_POLL_RECORDS, BATCH, DEDUP, CHECKPOINT_EVERY = 30_000, 500, 128, 5_000, 8_000


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def backlog(world: SyntheticWorld, n: int, users: int = 3_000):
    """``n`` examples: the world's own, copied with new ids, users, later times and serving-time features."""
    rng = random.Random(0)
    base = [e for out in StreamProcessor().run(world.generate_log(600)) for e in out.examples]
    span = max(e.event_time for e in base) - min(e.impression.event_time for e in base) + 1
    for i in range(n):
        copy, template = divmod(i, len(base))
        e, shift = base[template], copy * span
        impression = e.impression.model_copy(update={
            "event_id": f"b{i}", "user_id": f"u{rng.randrange(users)}", "event_time": e.impression.event_time + shift,
            "features": {name: rng.random() for name in FEATURE_NAMES}})
        yield e.model_copy(update={
            "event_id": f"b{i}", "impression": impression, "event_time": e.event_time + shift,
            "click_time": e.click_time and e.click_time + shift, "purchase_time": e.purchase_time and e.purchase_time + shift})


class CountingConsumer(EventConsumer):
    largest_poll = 0

    def poll(self, *args, **kwargs):
        records = super().poll(*args, **kwargs)
        CountingConsumer.largest_poll = max(CountingConsumer.largest_poll, len(records))
        return records


class CountingTrainer(IncrementalTrainer):
    most_pending = 0
    largest_step = 0

    def _flush_pending(self) -> None:
        CountingTrainer.most_pending = max(CountingTrainer.most_pending, len(self._pending_examples))
        super()._flush_pending()

    def learn_batch(self, examples):
        CountingTrainer.largest_step = max(CountingTrainer.largest_step, len(examples))
        return super().learn_batch(examples)


def test_the_learner_holds_a_bounded_number_of_examples_while_working_off_a_backlog(kafka, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    world = SyntheticWorld(WorldConfig(seed=4, n_users=200, n_items=150))
    with EventProducer(kafka) as producer:
        for item in world.item_events():
            producer.send(item)
        for example in backlog(world, N):
            producer.send(example)

    CountingConsumer.largest_poll = CountingTrainer.most_pending = CountingTrainer.largest_step = 0
    monkeypatch.setattr(learner.service, "EventConsumer", CountingConsumer)
    monkeypatch.setattr(learner.service, "IncrementalTrainer", CountingTrainer)
    kafka = kafka.model_copy(update={"max_poll_records": MAX_POLL_RECORDS})
    settings = LearnerSettings(model=tiny_model_config(), device="cpu", batch_size=BATCH, dedup_ids=DEDUP,
                               checkpoint_every_examples=CHECKPOINT_EVERY, group_id=kafka.group_id + "-learner",
                               instance_id=None, checkpoint_dir=tmp_path / "checkpoints", registry=str(tmp_path / "registry"))
    seen = {"rss_third": None, "most_since_checkpoint": 0, "most_dedup": 0}

    def until(trainer: IncrementalTrainer) -> bool:
        seen["most_since_checkpoint"] = max(seen["most_since_checkpoint"], len(trainer.learned_since_checkpoint))
        seen["most_dedup"] = max(seen["most_dedup"], len(trainer.recent_ids))
        if seen["rss_third"] is None and trainer.examples_learned >= N // 3:
            seen["rss_third"] = rss_mb()
        return trainer.examples_learned >= N

    report = learner.service.run_learner(kafka, settings, tmp_path, until=until)
    rss_end = rss_mb()

    assert report["examples"] == N and report["duplicates_skipped"] == 0, "every example learned once"
    assert 0 < CountingConsumer.largest_poll <= MAX_POLL_RECORDS
    assert 0 < CountingTrainer.most_pending <= BATCH and CountingTrainer.largest_step <= BATCH
    assert CountingConsumer.largest_poll + CountingTrainer.most_pending <= MAX_POLL_RECORDS + BATCH
    assert seen["most_dedup"] == DEDUP, "the de-duplication window fills up to its bound and no further"
    assert seen["most_since_checkpoint"] <= CHECKPOINT_EVERY + MAX_POLL_RECORDS
    growth = rss_end - seen["rss_third"]
    assert growth < 40, f"RSS grew by {growth:.0f} MB over the last 20,000 examples (from {seen['rss_third']:.0f} MB)"
