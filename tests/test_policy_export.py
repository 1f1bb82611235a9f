"""The serving policy: propensities, Plackett-Luce slates, publishing and refusing bad artifacts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from learner.registry import CorruptArtifact, ModelRegistry
from policies.export import (
    ScoringNet, ServingPolicy, candidate_features, greedy_policy, load_policy, publish_policy, validate_exploration,
)

NAMES = ["pctr", "pcvr", "pctcvr", "log_price"]


def mlp_policy(exploration=None, seed=0) -> ServingPolicy:
    torch.manual_seed(seed)
    return ServingPolicy(ScoringNet(len(NAMES), (8, 8)), NAMES, exploration or {"kind": "softmax", "temperature": 0.5})


def features(k=6, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pctr, pcvr = rng.uniform(0.01, 0.5, k), rng.uniform(0.01, 0.5, k)
    return candidate_features({"pctr": pctr, "pcvr": pcvr}, [{"price": float(p)} for p in rng.uniform(5, 500, k)], NAMES)


def test_candidate_features_from_scores_derived_and_item_values():
    x = candidate_features({"pctr": [0.2, 0.4], "pcvr": [0.5, 0.25]},
                           [{"price": 99.0, "item_ctr_24h": 0.1}, {}], ["pctcvr", "log_price", "item_ctr_24h"])
    np.testing.assert_allclose(x, [[0.1, np.log(100.0), 0.1], [0.1, 0.0, 0.0]])
    with pytest.raises(ValueError, match="no value for candidate feature 'mystery'"):
        candidate_features({"pctr": [0.2]}, [{}], ["mystery"])
    with pytest.raises(ValueError, match="disagree"):
        candidate_features({"pctr": [0.2, 0.3]}, [{}], ["pctr"])


@pytest.mark.parametrize("exploration", [{"kind": "softmax", "temperature": 0.3}, {"kind": "epsilon", "epsilon": 0.2}])
def test_action_probabilities_are_positive_and_sum_to_one(exploration):
    policy = mlp_policy(exploration)
    for seed in range(5):
        p = policy.action_probabilities(features(seed=seed))
        assert p.shape == (6,) and (p > 0).all() and p.sum() == pytest.approx(1.0, abs=1e-12)


def test_epsilon_greedy_puts_the_best_pctcvr_first_with_one_minus_epsilon():
    policy = greedy_policy(NAMES, {"kind": "epsilon", "epsilon": 0.3})
    x = features()
    p = policy.action_probabilities(x)
    best = int(np.argmax(x[:, 2]))
    assert p[best] == pytest.approx(0.7 + 0.3 / 6)
    np.testing.assert_allclose(np.delete(p, best), 0.3 / 6)


def test_softmax_temperature_controls_how_greedy_it_is():
    x = features()
    sharp = mlp_policy({"kind": "softmax", "temperature": 0.05}).action_probabilities(x)
    flat = mlp_policy({"kind": "softmax", "temperature": 50.0}).action_probabilities(x)
    assert sharp.max() > flat.max() and flat.max() - flat.min() < 0.05


def test_plackett_luce_slate_propensities_match_sampling_frequencies():
    policy, x, rng = mlp_policy(), features(k=4), np.random.default_rng(1)
    p_top = policy.action_probabilities(x)
    counts, n = np.zeros(4), 20_000
    for _ in range(n):
        slots, propensities = policy.sample_slate(x, 3, rng)
        assert len(set(slots)) == 3 and all(0 < q <= 1 for q in propensities)
        assert propensities[0] == pytest.approx(p_top[slots[0]])
        counts[slots[0]] += 1
    np.testing.assert_allclose(counts / n, p_top, atol=0.015)
    # the second slot's propensity is the policy renormalised over what is left
    slots, propensities = policy.sample_slate(x, 2, np.random.default_rng(3))
    rest = [i for i in range(4) if i != slots[0]]
    renormalised = policy.with_exploration(policy.exploration)._probabilities(policy.logits(x)[rest])
    assert propensities[1] == pytest.approx(renormalised[rest.index(slots[1])])


def test_publish_load_round_trip_keeps_probabilities_and_exploration(tmp_path):
    registry, policy = ModelRegistry(tmp_path), mlp_policy({"kind": "epsilon", "epsilon": 0.1})
    artifact = publish_policy(registry, policy, metrics={"reward": 2.5}, parent=None)
    loaded = load_policy(registry.load("policy"))
    assert (artifact.kind, loaded.version, policy.version) == ("policy", "v000001", "v000001")
    assert loaded.feature_names == NAMES and loaded.exploration == {"kind": "epsilon", "epsilon": 0.1}
    for seed in range(3):
        np.testing.assert_allclose(loaded.action_probabilities(features(seed=seed)),
                                   policy.action_probabilities(features(seed=seed)), atol=1e-12)
    greedy = greedy_policy()
    publish_policy(registry, greedy, metrics={}, parent=artifact.version)
    assert load_policy(registry.load("policy")).name == "greedy-pctcvr"


def test_corrupt_or_mismatched_artifacts_are_refused(tmp_path):
    registry = ModelRegistry(tmp_path)
    artifact = publish_policy(registry, mlp_policy(), metrics={}, parent=None)
    # truncated weights: the registry's checksum catches it
    broken = tmp_path / "policy" / "v000002"
    shutil.copytree(artifact.path, broken)
    (broken / "weights.safetensors").write_bytes((broken / "weights.safetensors").read_bytes()[:100])
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["version"] = "v000002"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifact, match="checksum"):
        load_policy(registry.load("policy", "v000002"))
    # a schema that does not fit the weights: the loader refuses to build it
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    manifest["schema"]["hidden"] = [16]
    (artifact.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifact, match="cannot rebuild"):
        load_policy(registry.load("policy", "v000001"))
    manifest["schema"]["format"] = "something-else"
    (artifact.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifact, match="format"):
        load_policy(registry.load("policy", "v000001"))
    # a model artifact is not a policy
    model = registry.publish("model", {"w": torch.ones(1)}, schema={})
    with pytest.raises(CorruptArtifact, match="not a policy"):
        load_policy(registry.load("model", model.version))


def test_bad_inputs_get_actionable_errors():
    policy = mlp_policy()
    with pytest.raises(ValueError, match=r"\[K >= 1, 4\]"):
        policy.action_probabilities(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        policy.action_probabilities(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="propensity > 0"):
        validate_exploration({"kind": "epsilon", "epsilon": 0.0})
    with pytest.raises(ValueError, match="unknown exploration"):
        validate_exploration({"kind": "ucb"})
