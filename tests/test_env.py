"""The session environment: gymnasium's contract, determinism, and rewards/endings that follow behaviour."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from policies.config import SessionConfig
from policies.env import USER_FEATURES, SessionEnv, split_observation
from policies.evaluation import evaluate, greedy, oracle_policy, random_policy

SMALL = {"world": {"seed": 4, "n_users": 60, "n_items": 80}, "n_candidates": 6}


@pytest.fixture(scope="module")
def env() -> SessionEnv:
    return SessionEnv(SMALL)


def test_passes_gymnasium_env_checker(env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unbounded feature space and no render modes are deliberate
        check_env(SessionEnv(SMALL), skip_render_check=True)


def test_observation_holds_candidate_features_and_user_state(env):
    obs, info = env.reset(seed=1)
    candidates, user = split_observation(obs, env.n_candidates, env.n_features)
    assert candidates.shape == (6, 3) and user.shape == (len(USER_FEATURES),)
    np.testing.assert_allclose(candidates, env.candidate_feature_matrix)
    pctr, pcvr, pctcvr = candidates.T
    np.testing.assert_allclose(pctcvr, pctr * pcvr, rtol=1e-5)
    assert ((0 < pctr) & (pctr < 1)).all() and user[0] == 0.0  # step 0 of the session


def trajectory(env: SessionEnv, seed: int, actions: list[int]) -> list:
    obs, _ = env.reset(seed=seed)
    out = [obs.tolist()]
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        out.append((obs.tolist(), reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return out


def test_deterministic_for_a_seed(env):
    actions = [0, 3, 1, 5, 2, 4] * 4
    assert trajectory(env, 7, actions) == trajectory(SessionEnv(SMALL), 7, actions)
    assert trajectory(env, 7, actions) != trajectory(env, 8, actions)


def test_same_seed_same_user_and_candidates_whatever_the_policy(env):
    env.reset(seed=11)
    first_user, first_candidates = env._state.user, env.candidates.copy()
    env.reset(seed=11)
    env.step(2)
    env.reset(seed=11)
    assert env._state.user == first_user
    np.testing.assert_array_equal(env.candidates, first_candidates)


def test_rewards_and_session_length_depend_on_what_is_shown(env):
    rand = evaluate(env, random_policy, n_sessions=600)
    best = evaluate(env, oracle_policy, n_sessions=600)
    by_pctr = evaluate(env, greedy("pctr"), n_sessions=600)
    # good ranking earns more per session and keeps users longer (leaving depends on how it went)
    assert best.mean_reward > 2.5 * rand.mean_reward
    assert best.mean_length > rand.mean_length + 0.5
    assert by_pctr.mean_reward > 2.0 * rand.mean_reward


def test_clicks_keep_the_user_and_misses_drive_them_away():
    always_leave_on_miss = SessionEnv({**SMALL, "leave_after_miss": 1.0, "leave_after_click": 0.0, "max_steps": 50})
    results = []
    for seed in range(200):
        env = always_leave_on_miss
        env.reset(seed=seed)
        done = False
        while not done:
            _, reward, terminated, truncated, info = env.step(env.oracle_action())
            done = terminated or truncated
            results.append((info["clicked"], terminated))
    # with these settings a session ends exactly at its first miss
    assert all(terminated == (not clicked) for clicked, terminated in results)


def test_reward_is_click_plus_weighted_purchase_plus_revenue():
    env = SessionEnv({**SMALL, "purchase_weight": 3.0, "revenue_weight": 0.5})
    seen = set()
    for seed in range(300):
        env.reset(seed=seed)
        done = False
        while not done:
            _, reward, terminated, truncated, info = env.step(env.oracle_action())
            price = env.world.item_price[env.world.item_indices([info["item"]])[0]]
            expected = info["clicked"] + 3.0 * info["purchased"] + 0.5 * info["purchased"] * np.log1p(price)
            assert reward == pytest.approx(expected)
            seen.add((info["clicked"], info["purchased"]))
            done = terminated or truncated
    assert seen == {(False, False), (True, False), (True, True)}


def test_wider_slates_fill_the_other_slots_by_pctcvr():
    env = SessionEnv({**SMALL, "slate_size": 3})
    env.reset(seed=2)
    slate = env._slate(1)
    pctcvr = env.candidate_feature_matrix[:, 2]
    rest = [i for i in np.argsort(-pctcvr, kind="stable") if i != 1][:2]
    np.testing.assert_array_equal(slate, env.candidates[[1, *rest]])


def test_bad_actions_and_configs_are_refused(env):
    env.reset(seed=0)
    with pytest.raises(ValueError, match="not a candidate index"):
        env.step(99)
    with pytest.raises(ValueError, match="n_candidates"):
        SessionConfig(world={"n_items": 5}, n_candidates=6)
    with pytest.raises(ValueError, match="model_registry"):
        SessionConfig(user_model="learned")


def test_learned_simulator_uses_the_learners_model_as_user_response(tmp_path):
    """The second user model: the learner's multi-task model (published to the registry) answers."""
    import torch

    from learner.config import tiny_model_config
    from learner.model import RecommenderModel, publish_model
    from learner.registry import ModelRegistry
    from policies.synthetic_world import SyntheticWorld, WorldConfig
    from policies.users import load_learned_users

    torch.set_num_threads(1)
    world_fields = {"seed": 0, "n_users": 30, "n_items": 40}
    model = RecommenderModel(tiny_model_config())
    model.add_items(SyntheticWorld(WorldConfig(**world_fields)).item_events())
    publish_model(ModelRegistry(tmp_path), model, metrics={}, parent=None)
    config = {"world": world_fields, "user_model": "learned", "scorer": "model", "model_registry": str(tmp_path),
              "n_candidates": 4}
    env = SessionEnv(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(SessionEnv(config), skip_render_check=True)
    users = load_learned_users(str(tmp_path))
    env.reset(seed=5)
    user, features = env._state.user, env.candidate_feature_matrix
    items = [env.world.item_ids[i] for i in env.candidates]
    pctr, pcvr = users.predict(user, items)
    np.testing.assert_allclose(features[:, 0], pctr, rtol=1e-5)  # the observation's scores are the model's
    _, _, _, _, info = env.step(1)
    assert info["p_click"] == pytest.approx(pctr[1], rel=1e-5)  # and so is the simulated user's response
    assert info["p_purchase"] == pytest.approx(pcvr[1], rel=1e-5)
