"""RLlib training on a local Ray (num_cpus=2): PPO online, BC and MARWIL offline, and the Ray-free export.

One Ray instance serves the whole module; training budgets are tiny, and the assertions are
about outcomes in the simulator, on the same evaluation sessions for every policy.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from learner.registry import ModelRegistry
from policies.config import PolicySettings
from policies.env import SessionEnv
from policies.evaluation import evaluate, greedy, oracle_policy, random_policy, serving
from policies.export import greedy_policy, publish_policy
from policies.train import ensure_ray, record_sessions, train_offline, train_ppo

EVAL_SESSIONS = 1500


@pytest.fixture(scope="module")
def ray_local():
    import ray

    torch.set_num_threads(1)
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def settings() -> PolicySettings:
    return PolicySettings(train={"iterations": 8, "train_batch_size": 1000, "minibatch_size": 250, "num_epochs": 6,
                                 "offline_batch_size": 512})


@pytest.fixture(scope="module")
def env(settings) -> SessionEnv:
    return SessionEnv(settings.session)


@pytest.fixture(scope="module")
def baselines(env) -> dict[str, float]:
    return {name: evaluate(env, policy, EVAL_SESSIONS).mean_reward for name, policy in
            [("random", random_policy), ("oracle", oracle_policy), ("greedy_pctr", greedy("pctr"))]}


@pytest.fixture(scope="module")
def ppo(ray_local, settings):
    return train_ppo(settings)


def test_ppo_beats_random_and_reaches_most_of_the_oracle(ppo, env, baselines):
    learned = evaluate(env, serving(ppo.policy), EVAL_SESSIONS).mean_reward
    exploring = evaluate(env, serving(ppo.policy, explore=True), EVAL_SESSIONS).mean_reward
    assert learned > 3.0 * baselines["random"], (learned, baselines)
    assert learned >= 0.9 * baselines["oracle"], (learned, baselines)
    assert exploring > 3.0 * baselines["random"], (exploring, baselines)  # served with epsilon = 0.1
    assert len(ppo.history) == 8 and ppo.history[-1]["env_steps"] >= 8000


def test_exported_policy_gives_rllibs_action_probabilities_without_ray(ppo, env, tmp_path):
    from ray.rllib.core.columns import Columns

    observations = []
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        observations.append(obs)
    observations = np.stack(observations)
    with torch.no_grad():
        out = ppo.module.forward_inference({Columns.OBS: torch.from_numpy(observations)})
    rllib_probs = torch.softmax(out[Columns.ACTION_DIST_INPUTS], dim=-1).numpy()
    features = observations[:, : env.n_candidates * env.n_features].reshape(-1, env.n_candidates, env.n_features)
    as_trained = ppo.policy.with_exploration({"kind": "softmax", "temperature": 1.0})  # RLlib's own distribution
    exported = np.stack([as_trained.action_probabilities(x) for x in features])
    np.testing.assert_allclose(exported, rllib_probs, atol=1e-6)

    registry = ModelRegistry(tmp_path)
    publish_policy(registry, as_trained, metrics={}, parent=None)
    np.save(tmp_path / "features.npy", features)
    script = (
        "import json, sys, numpy as np\n"
        "from learner.registry import ModelRegistry\n"
        "from policies.export import load_policy\n"
        f"policy = load_policy(ModelRegistry({str(tmp_path)!r}).load('policy'))\n"
        f"x = np.load({str(tmp_path / 'features.npy')!r})\n"
        "probs = [policy.action_probabilities(f).tolist() for f in x]\n"
        "print(json.dumps({'ray_loaded': any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'probs': probs}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ray_loaded"] is False
    loaded = np.array(result["probs"])
    np.testing.assert_allclose(loaded, rllib_probs, atol=1e-6)
    assert (loaded > 0).all() and np.allclose(loaded.sum(axis=1), 1.0)


@pytest.fixture(scope="module")
def logged(settings, tmp_path_factory):
    """Sessions served by an epsilon-greedy (pCTCVR) logging policy, as a parquet transition log."""
    logging_policy = greedy_policy(exploration={"kind": "epsilon", "epsilon": 0.5}, rank_by="pctcvr")
    path = tmp_path_factory.mktemp("offline") / "sessions.parquet"
    record_sessions(settings.session, logging_policy, 1500, path, seed=1)
    return logging_policy, path


@pytest.mark.parametrize("algorithm", ["marwil", "bc"])
def test_offline_training_from_a_parquet_log_beats_the_logging_policy(ray_local, settings, env, baselines, logged,
                                                                      algorithm):
    logging_policy, path = logged
    trained = train_offline(settings, [path], algorithm, iterations=30)
    learned = evaluate(env, serving(trained.policy), EVAL_SESSIONS).mean_reward
    logging_value = evaluate(env, serving(logging_policy, explore=True), EVAL_SESSIONS).mean_reward
    assert learned > 1.3 * logging_value, (algorithm, learned, logging_value)
    assert learned > 3.0 * baselines["random"]
    assert trained.policy.info["algorithm"] == algorithm and len(trained.history) == 30


def test_cli_trains_marwil_from_a_streamrec_event_log_and_gates_it(ray_local, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from policies.synthetic_world import SyntheticWorld, WorldConfig
    from streaming.event_log import write_parquet
    from streamrec.cli import app

    world = SyntheticWorld(WorldConfig(seed=0, n_users=200, n_items=200))
    write_parquet(tmp_path / "events.parquet", world.item_events() + world.generate_log(4000, log_seed=3))
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("STREAMREC_POLICY__SESSION__N_CANDIDATES", "5")  # the logged slates hold 5 items
    events = str(tmp_path / "events.parquet")
    result = CliRunner().invoke(app, ["policy", "train", "--algorithm", "marwil", "--log", events, "--eval-log", events,
                                      "--iterations", "20", "--sessions", "200", "--no-announce"])
    assert result.exit_code == 0, result.output
    assert "marwil" in result.output and "oracle" in result.output
    # judged on the uniformly random log itself, the learned policy clears the gate
    assert "published v000001" in result.output, result.output
    assert ModelRegistry(tmp_path / "data" / "registry").versions("policy") == ["v000001"]
