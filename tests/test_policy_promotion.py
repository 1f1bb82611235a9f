"""The promotion gate: off-policy DR on simulator logs publishes a better policy and refuses a worse one."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from learner.registry import ModelRegistry
from policies.config import SessionConfig
from policies.env import SessionEnv
from policies.evaluation import evaluate, serving
from policies.export import ScoringNet, ServingPolicy, greedy_policy, load_policy
from policies.promotion import dr_interval, promote
from policies.train import read_transitions, record_sessions
from streaming.events import ModelUpdate

SESSION = SessionConfig(world={"seed": 2, "n_users": 80, "n_items": 100}, n_candidates=6)
LOGGING = greedy_policy(exploration={"kind": "epsilon", "epsilon": 0.6}, rank_by="pctcvr")


def ranking_policy(weight: float, epsilon: float = 0.1) -> ServingPolicy:
    """Rank by ``weight * pctr``: weight > 0 is a good policy, weight < 0 a bad one."""
    scorer = ScoringNet(3, hidden=())
    with torch.no_grad():
        scorer.net[0].weight.copy_(torch.tensor([[weight, 0.0, 0.0]]))
        scorer.net[0].bias.zero_()
    return ServingPolicy(scorer, ["pctr", "pcvr", "pctcvr"], {"kind": "epsilon", "epsilon": epsilon},
                         name=f"pctr-x{weight:g}")


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    path = tmp_path_factory.mktemp("logs") / "sessions.parquet"
    n = record_sessions(SESSION, LOGGING, 1500, path, seed=5)
    logged = read_transitions(path, SESSION.n_candidates, 3)
    assert len(logged.actions) == n
    return logged


def test_logged_propensities_are_the_logging_policys(log):
    expected = np.array([LOGGING.action_probabilities(x)[a] for x, a in zip(log.features, log.actions)])
    np.testing.assert_allclose(log.pscore, expected)
    assert set(np.round(np.unique(log.pscore), 6)) == {round(0.6 / 6, 6), round(0.4 + 0.6 / 6, 6)}


def test_dr_estimate_ranks_policies_like_the_simulator(log):
    good, bad = ranking_policy(1.0), ranking_policy(-1.0)
    dr_good, dr_bad = dr_interval(good, log, n_bootstrap=300), dr_interval(bad, log, n_bootstrap=300)
    assert dr_good.lower > dr_bad.upper
    env = SessionEnv(SESSION)
    sim_good = evaluate(env, serving(good, explore=True), 800)
    sim_bad = evaluate(env, serving(bad, explore=True), 800)
    assert sim_good.mean_reward > sim_bad.mean_reward
    # per request, the logs' DR estimate is close to what the policy earns per step in the simulator
    per_step = sim_good.returns.sum() / sim_good.lengths.sum()
    assert dr_good.estimate == pytest.approx(per_step, rel=0.15)


def test_gate_publishes_a_better_policy_and_refuses_a_worse_one(tmp_path, log):
    registry, announced = ModelRegistry(tmp_path), []
    first = promote(registry, ranking_policy(1.0), log, announce=announced.append, n_bootstrap=300)
    assert first.promoted and first.current_version is None, first.reason
    assert first.candidate.lower >= first.current_value == pytest.approx(log.rewards.mean())
    assert registry.versions("policy") == ["v000001"] and first.artifact.metrics["ope_dr_lower"] == first.candidate.lower
    assert [u.kind for u in announced] == ["policy"] and announced[0].version == "v000001"
    assert announced[0].manifest_digest == first.artifact.manifest_digest

    worse = promote(registry, ranking_policy(-1.0), log, announce=announced.append, n_bootstrap=300)
    assert not worse.promoted and "refused" in worse.reason and worse.current_version == "v000001"
    assert registry.versions("policy") == ["v000001"] and len(announced) == 1

    # a policy no better than the current one cannot clear the lower bound of its own noise
    same = promote(registry, ranking_policy(1.0), log, announce=announced.append, n_bootstrap=300)
    assert not same.promoted and registry.versions("policy") == ["v000001"]
    assert load_policy(registry.load("policy")).name == "pctr-x1"


def test_gate_needs_propensities(tmp_path, log):
    from dataclasses import replace

    broken = replace(log, pscore=np.where(np.arange(len(log.pscore)) == 3, np.nan, log.pscore))
    with pytest.raises(ValueError, match="propensities"):
        promote(ModelRegistry(tmp_path), ranking_policy(1.0), broken)


@pytest.mark.kafka
def test_promotion_is_announced_on_model_updates(tmp_path, log, kafka):
    from streaming.kafka_io import EventProducer
    from streaming.replay import read_kafka_range

    start = int(time.time() * 1000) - 1
    with EventProducer(kafka) as producer:
        decision = promote(ModelRegistry(tmp_path), ranking_policy(1.0), log, announce=producer.send, n_bootstrap=200)
        producer.flush(30)
    events = read_kafka_range(kafka, [kafka.topic("model-updates")], start, int(time.time() * 1000) + 1, timeout_s=60)
    assert decision.promoted and len(events) == 1 and isinstance(events[0], ModelUpdate)
    assert (events[0].kind, events[0].version, events[0].artifact_uri) == ("policy", "v000001", decision.artifact.uri)


def test_cli_evaluate_prints_off_policy_estimates(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from streamrec.cli import app

    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["policy", "evaluate", "--record", "200", "--sessions", "100"])
    assert result.exit_code == 0, result.output
    for name in ("dm", "ips", "snips", "dr", "greedy-pctcvr", "oracle"):
        assert name in result.output
    missing = CliRunner().invoke(app, ["policy", "evaluate", "--version", "v000009", "--sessions", "100"])
    assert missing.exit_code == 1 and "v000009" in missing.output
