"""Crash faults on the live stack (`streamrec.chaos`): the stream worker and the learner SIGKILLed
mid-stream and restarted, serving probed throughout. Nothing is lost, nothing is learned twice,
Feast ends as after an uninterrupted run, serving answers every request.

The full-size run (100,000 events, 10 kills) is `benchmarks/chaos.py`; CI runs a few thousand
events and four kills.
"""

from __future__ import annotations

import pytest

from streamrec.chaos import ChaosConfig, chaos_log, chaos_world, clock_events, kill_plan, longest_outage, run_chaos
from streaming.events import Item


def test_the_log_has_the_asked_size_the_catalog_first_and_the_clocks_last():
    world = chaos_world(ChaosConfig(users=30, items=20, seed=4), start_ms=1_000_000)
    log = chaos_log(world, 1_500, partitions=3)
    assert len(log) == 1_500
    assert all(isinstance(e, Item) for e in log[:20]) and not any(isinstance(e, Item) for e in log[20:])
    stream = log[20:-9]
    assert [e.event_time for e in stream] == sorted(e.event_time for e in stream)
    assert log[-9:] == clock_events(3, log[-1].event_time)
    assert log[-1].event_time >= stream[-1].event_time + 24 * 3_600_000  # past every purchase window


def test_kills_take_the_targets_in_turn_at_seeded_points_inside_the_window():
    plan = kill_plan(10, 5_000, seed=3)
    assert [k.target for k in plan] == ["worker", "learner"] * 5
    points = [k.after_examples for k in plan]
    assert points == sorted(points) and 0.05 * 5_000 <= points[0] and points[-1] <= 0.9 * 5_000
    assert kill_plan(10, 5_000, seed=3) == plan and kill_plan(10, 5_000, seed=4) != plan
    assert {k.target for k in kill_plan(3, 100, targets=("learner",))} == {"learner"}


def test_longest_outage_spans_from_the_last_answer_to_the_next():
    assert longest_outage([(0.0, True), (0.05, True), (0.1, True)]) == 0.0
    assert longest_outage([(0.0, True), (0.1, False), (0.9, False), (1.0, True), (1.1, False), (1.3, True)]) == 1.0
    assert longest_outage([(0.0, False), (0.5, True)]) == 0.5  # down from the first probe
    assert longest_outage([(0.0, True), (0.2, False), (0.7, False)]) == 0.7  # still down at the end


@pytest.mark.kafka
def test_sigkilled_worker_and_learner_lose_nothing_learn_nothing_twice_and_serving_stays_up(kafka, tmp_path):
    config = ChaosConfig(events=3_000, kills=4, users=60, items=40, seed=1, stage_timeout_s=240)
    result = run_chaos(config, kafka, tmp_path, say=print)
    print(result.summary())

    assert result.kills == {"worker": 2, "learner": 2} and result.restarts == result.kills
    assert not result.crashes, result.samples.get("crashes")
    assert result.lost == 0, f"examples never learned: {result.samples.get('lost')}"
    assert result.duplicated == 0, f"examples learned twice: {result.samples.get('duplicated')}"
    assert result.missing_on_topic == result.unexpected == result.wrong_labels == 0, result.samples
    assert result.feature_mismatches == 0, result.samples.get("features")
    assert result.dead_letters == 0  # re-reads after a restart are repeats, not late data
    # serving was never killed: it answered every probe and every request throughout
    assert result.probe_failures == 0, result.samples.get("probe_failures")
    assert result.max_unavailable_s < 5.0
    assert result.recommends >= 20 and result.recommend_failures == 0, result.samples.get("recommend_failures")
    assert result.published_versions >= 1  # and it hot-swapped what the restarted learner published
