"""The synthetic world: determinism, a sane ground truth, and logs that obey it."""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.synthetic_world import TOPICS, SyntheticWorld, WorldConfig
from streaming.events import Click, Impression, Item, Purchase, encode_event


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(WorldConfig(seed=3))


@pytest.fixture(scope="module")
def random_log(world: SyntheticWorld) -> list:
    return world.generate_log(3_000, policy="random", log_seed=1)


@pytest.fixture(scope="module")
def popular_log(world: SyntheticWorld) -> list:
    return world.generate_log(3_000, policy="popular", log_seed=1, exploration=0.3)


def encoded(events) -> list[bytes]:
    return [encode_event(event) for event in events]


def test_same_seed_gives_identical_catalog_users_and_log():
    config = WorldConfig(seed=11, n_users=50, n_items=40)
    first, second = SyntheticWorld(config), SyntheticWorld(config)
    assert encoded(first.item_events()) == encoded(second.item_events())
    np.testing.assert_array_equal(first.user_interest, second.user_interest)
    np.testing.assert_array_equal(first.user_price_sensitivity, second.user_price_sensitivity)
    for policy in ("random", "popular"):
        assert encoded(first.generate_log(200, policy)) == encoded(second.generate_log(200, policy))


def test_different_seeds_or_log_seeds_differ():
    one, other = SyntheticWorld(WorldConfig(seed=1)), SyntheticWorld(WorldConfig(seed=2))
    assert one.item_titles != other.item_titles
    assert not np.allclose(one.user_interest, other.user_interest)
    assert encoded(one.generate_log(100)) != encoded(other.generate_log(100))
    assert encoded(one.generate_log(100, log_seed=0)) != encoded(one.generate_log(100, log_seed=1))


def test_catalog_does_not_depend_on_the_number_of_users():
    few, many = SyntheticWorld(WorldConfig(seed=5, n_users=10)), SyntheticWorld(WorldConfig(seed=5, n_users=900))
    assert encoded(few.item_events()) == encoded(many.item_events())


def test_event_ids_are_unique_and_not_random(world, random_log):
    events = world.item_events() + random_log
    assert len({event.event_id for event in events}) == len(events)
    first, again = world.generate_log(50, log_seed=9), world.generate_log(50, log_seed=9)
    assert [e.event_id for e in first] == [e.event_id for e in again]


def test_item_events_describe_the_catalog(world):
    items = world.item_events()
    assert len(items) == world.config.n_items and all(isinstance(item, Item) for item in items)
    assert {item.event_time for item in items} == {world.config.start_time_ms}
    assert [item.item_id for item in items[:3]] == ["i0000", "i0001", "i0002"]
    for item, topic in zip(items, world.item_topic):
        assert item.category == TOPICS[topic].name
        assert item.price is not None and item.price > 0
        assert item.title and item.description.count(".") >= 2


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_users=st.integers(1, 20),
    n_items=st.integers(1, 30),
    eta=st.floats(0.0, 3.0),
    interest_strength=st.floats(0.0, 30.0),
    click_bias=st.floats(-20.0, 20.0),
    purchase_bias=st.floats(-20.0, 20.0),
    data=st.data(),
)
def test_oracle_probabilities_are_probabilities(seed, n_users, n_items, eta, interest_strength, click_bias,
                                                 purchase_bias, data):
    world = SyntheticWorld(WorldConfig(
        seed=seed, n_users=n_users, n_items=n_items, slate_size=1, position_bias_eta=eta,
        interest_strength=interest_strength, click_bias=click_bias, purchase_bias=purchase_bias))
    user = data.draw(st.integers(0, n_users - 1))
    items = data.draw(st.lists(st.integers(0, n_items - 1), min_size=1, max_size=10))
    positions = data.draw(st.lists(st.integers(0, 100), min_size=len(items), max_size=len(items)))
    p_click, p_purchase = world.oracle(world.user_ids[user], [world.item_ids[i] for i in items], positions)
    assert p_click.shape == p_purchase.shape == (len(items),)
    for p in (p_click, p_purchase):
        assert np.all((0.0 <= p) & (p <= 1.0)) and not np.isnan(p).any()


def test_click_probability_rises_with_interest_in_the_items_topic(world):
    # For one item at one position, users differ only in affinity, so p_click must follow it.
    for item in range(0, world.config.n_items, 17):
        affinity = world.user_interest @ world.item_topics[item]
        p_click = np.array([world.click_probability(u, [item], [0])[0] for u in range(world.config.n_users)])
        order = np.argsort(affinity)
        assert np.all(np.diff(p_click[order]) >= 0)
        assert p_click[order[-1]] > 2 * p_click[order[0]]
    # Across items: a user's favourite topic beats their least favourite one.
    wins = 0
    for user in range(world.config.n_users):
        favourite, least = np.argmax(world.user_interest[user]), np.argmin(world.user_interest[user])
        liked, disliked = np.flatnonzero(world.item_topic == favourite), np.flatnonzero(world.item_topic == least)
        wins += world.click_probability(user, liked, np.zeros_like(liked)).mean() > \
            world.click_probability(user, disliked, np.zeros_like(disliked)).mean()
    assert wins == world.config.n_users


def test_click_probability_falls_with_position(world):
    positions = np.arange(10)
    for user, item in [(0, 0), (7, 42), (123, 299)]:
        p_click = world.click_probability(user, [item] * len(positions), positions)
        assert np.all(np.diff(p_click) < 0)
        assert p_click[0] == pytest.approx(2 * p_click[1])  # eta = 1: slot 1 is examined half as often
    flat = SyntheticWorld(WorldConfig(seed=3, position_bias_eta=0.0))
    assert np.ptp(flat.click_probability(0, [5] * 5, np.arange(5))) == 0.0


def test_purchase_probability_falls_with_price(world):
    pricier = copy.deepcopy(world)
    pricier.item_price = world.item_price * 4
    items = np.arange(world.config.n_items)
    sensitive = int(np.argmax(world.user_price_sensitivity))
    insensitive = int(np.argmin(world.user_price_sensitivity))
    drops = {}
    for user in (sensitive, insensitive):
        before = world.purchase_probability_given_click(user, items)
        after = pricier.purchase_probability_given_click(user, items)
        assert np.all(after < before)
        drops[user] = np.mean(np.log(before / (1 - before)) - np.log(after / (1 - after)))
    assert drops[sensitive] > 3 * drops[insensitive]
    # The click side does not see prices.
    np.testing.assert_array_equal(world.click_probability(sensitive, items),
                                  pricier.click_probability(sensitive, items))


@pytest.mark.parametrize("log_name", ["random_log", "popular_log"])
def test_log_is_in_time_order_and_causal(log_name, request, world):
    events = request.getfixturevalue(log_name)
    times = [event.event_time for event in events]
    assert times == sorted(times) and times[0] > world.config.start_time_ms
    shown, clicked = {}, {}
    for event in events:
        key = (event.request_id, event.user_id, event.item_id)
        if isinstance(event, Impression):
            shown[key] = event.event_time
        elif isinstance(event, Click):
            assert key in shown and shown[key] < event.event_time
            clicked[key] = event.event_time
        else:
            assert isinstance(event, Purchase) and key in clicked and clicked[key] < event.event_time
            assert event.quantity == 1
            assert event.revenue == pytest.approx(world.item_price[world.item_indices([event.item_id])[0]])
    slates = defaultdict(list)
    for event in events:
        if isinstance(event, Impression):
            slates[event.request_id].append(event)
    for slate in slates.values():
        assert [e.position for e in slate] == list(range(world.config.slate_size))
        assert len({e.item_id for e in slate}) == world.config.slate_size
        assert len({(e.user_id, e.event_time) for e in slate}) == 1


@pytest.mark.parametrize("log_name", ["random_log", "popular_log"])
def test_empirical_rates_match_the_oracle(log_name, request, world):
    events = request.getfixturevalue(log_name)
    clicked = {(e.request_id, e.item_id) for e in events if isinstance(e, Click)}
    bought = {(e.request_id, e.item_id) for e in events if isinstance(e, Purchase)}
    slates = defaultdict(list)
    for event in events:
        if isinstance(event, Impression):
            slates[event.request_id].append(event)
    p_clicks, p_purchases, clicks, purchases = [], [], [], []
    for request_id, slate in slates.items():
        p_click, p_purchase = world.oracle(slate[0].user_id, [e.item_id for e in slate], [e.position for e in slate])
        p_clicks.extend(p_click)
        for impression, p in zip(slate, p_purchase):
            key = (request_id, impression.item_id)
            clicks.append(key in clicked)
            if key in clicked:
                p_purchases.append(p)
                purchases.append(key in bought)
    for observed, expected in ((clicks, p_clicks), (purchases, p_purchases)):
        expected = np.array(expected)
        # Bernoulli sum: 4 standard deviations is a false alarm about once in 16,000 runs.
        tolerance = 4 * np.sqrt(np.sum(expected * (1 - expected)))
        assert abs(np.sum(observed) - expected.sum()) < tolerance
        assert len(observed) > 300  # enough samples for the check to mean something


def test_propensities_are_the_logging_policys_placement_probabilities(world, random_log, popular_log):
    n_items = world.config.n_items
    assert {e.propensity for e in random_log if isinstance(e, Impression)} == {1 / n_items}
    assert {e.policy_version for e in random_log if isinstance(e, Impression)} == {"random"}
    for position in range(world.config.slate_size):
        total = sum(world.logging_propensity(i, position, "popular", 0.3) for i in range(n_items))
        assert total == pytest.approx(1.0)
    # The bestseller sits in slot 0 as often as its propensity says.
    impressions = [e for e in popular_log if isinstance(e, Impression) and e.position == 0]
    top = world.item_ids[world.popular_items[0]]
    propensity = 0.7 + 0.3 / n_items
    hits = sum(e.item_id == top for e in impressions)
    assert all(e.propensity == pytest.approx(propensity) for e in impressions if e.item_id == top)
    assert abs(hits - len(impressions) * propensity) < 4 * np.sqrt(len(impressions) * propensity * (1 - propensity))


def test_titles_and_descriptions_carry_their_topic():
    world = SyntheticWorld(WorldConfig(seed=8, n_items=400))
    title_words = [{word for product in topic.products for word in product.split()} for topic in TOPICS]
    for title, description, topic in zip(world.item_titles, world.item_descriptions, world.item_topic):
        words = set(title.lower().split())
        assert [t for t, vocabulary in enumerate(title_words) if words & vocabulary] == [topic]
        assert sum(phrase in description for phrase in TOPICS[topic].words) >= 2
    # Same-topic titles overlap far more than titles of different topics.
    def overlap(a: int, b: int) -> float:
        x, y = set(world.item_titles[a].split()), set(world.item_titles[b].split())
        return len(x & y) / len(x | y)
    pairs = list(itertools.combinations(range(0, 400, 3), 2))
    same = np.mean([overlap(a, b) for a, b in pairs if world.item_topic[a] == world.item_topic[b]])
    different = np.mean([overlap(a, b) for a, b in pairs if world.item_topic[a] != world.item_topic[b]])
    assert same > 3 * different


@pytest.mark.parametrize("purchase_weight", [1.0, 20.0])
def test_best_slate_is_the_brute_force_optimum(purchase_weight):
    world = SyntheticWorld(WorldConfig(seed=3, purchase_weight=purchase_weight))
    rng = np.random.default_rng(0)
    for user in rng.choice(world.config.n_users, size=10, replace=False):
        candidates = [world.item_ids[i] for i in rng.choice(world.config.n_items, size=7, replace=False)]
        best = world.best_slate(user, candidates, k=3)
        assert len(set(best)) == 3 and set(best) <= set(candidates)
        optimum = max(world.expected_reward(user, slate) for slate in itertools.permutations(candidates, 3))
        assert world.expected_reward(user, best) == pytest.approx(optimum)
    full = world.best_slate("u0001", world.item_ids)
    assert len(full) == world.config.slate_size


def test_respond_only_buys_what_was_clicked(world):
    rng = np.random.default_rng(4)
    for _ in range(200):
        clicks, purchases = world.respond("u0002", world.popular_items[:5], rng)
        assert clicks.dtype == bool and not np.any(purchases & ~clicks)


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="slate_size"):
        WorldConfig(n_items=3, slate_size=5)
    world = SyntheticWorld(WorldConfig(n_users=5, n_items=10))
    with pytest.raises(KeyError, match="unknown user"):
        world.oracle("u9999", ["i0001"])
    with pytest.raises(ValueError, match="unknown logging policy"):
        world.generate_log(10, policy="greedy")
