"""Windowed user/item aggregates (pure, no broker): windows, smoothing, dedup, state round trips."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from streaming.aggregates import (
    AggregateConfig, Aggregates, item_features, new_item_state, new_user_state, update_item,
    update_user, user_features,
)
from streaming.events import Click, Impression, Item, Purchase
from streaming.features import ITEM_CATALOG, ITEM_STATS, RECENT_ITEMS, USER_ACTIVITY, WINDOWS

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
_ids = itertools.count()


def impression(t, user="u1", item="i1", event_id=None):
    return Impression(event_id=event_id or f"e{next(_ids)}", event_time=t, request_id="r", user_id=user,
                      item_id=item, position=0, slate_size=1, propensity=1.0)


def click(t, user="u1", item="i1", event_id=None, action="click"):
    return Click(event_id=event_id or f"e{next(_ids)}", event_time=t, user_id=user, item_id=item, action=action)


def purchase(t, user="u1", item="i1", event_id=None):
    return Purchase(event_id=event_id or f"e{next(_ids)}", event_time=t, user_id=user, item_id=item)


def run(events, aggregates=None):
    aggregates = aggregates or Aggregates()
    updates = [update for event in events for update in aggregates.apply(event)]
    return aggregates, updates


def last(updates, view, key):
    return [u for u in updates if u.view == view and u.key == key][-1]


def test_an_event_two_hours_old_counts_in_24h_but_not_1h():
    _, updates = run([impression(T0 - 2 * HOUR), click(T0 - 2 * HOUR), purchase(T0 - 2 * HOUR),
                      impression(T0 - 30 * MINUTE), click(T0)])
    user = last(updates, "user_activity", "u1").values
    assert (user["user_impressions_1h"], user["user_clicks_1h"], user["user_purchases_1h"]) == (1, 1, 0)
    assert (user["user_impressions_24h"], user["user_clicks_24h"], user["user_purchases_24h"]) == (2, 2, 1)
    item = last(updates, "item_stats", "i1").values
    assert (item["item_impressions_1h"], item["item_clicks_1h"], item["item_impressions_24h"]) == (1, 1, 2)
    assert item["item_popularity_24h"] == 2 + 5 * 1


def test_windows_slide_with_event_time_and_the_edge_is_exclusive():
    _, updates = run([impression(T0 - DAY), impression(T0 - HOUR), impression(T0 - 50 * MINUTE), impression(T0)])
    user = last(updates, "user_activity", "u1")
    assert user.event_time == T0
    assert user.values["user_impressions_1h"] == 2  # T0 - 1h is outside (T0 - 1h, T0]
    assert user.values["user_impressions_24h"] == 3  # T0 - 24h is outside too


def test_values_are_as_of_the_latest_event_time_when_events_arrive_late():
    _, updates = run([impression(T0), impression(T0 - 3 * MINUTE)])
    late = updates[-2]  # the user update the late impression caused
    assert late.view == "user_activity" and late.event_time == T0
    assert late.values["user_impressions_1h"] == 2 and late.values["user_last_event_ms"] == T0


def test_an_event_older_than_the_largest_window_does_not_count():
    aggregates, updates = run([impression(T0), impression(T0 - DAY - HOUR), click(T0 - 2 * DAY, item="old")])
    user = last(updates, "user_activity", "u1").values
    assert user["user_impressions_24h"] == 1 and user["user_clicks_24h"] == 0
    assert user["user_last_click_ms"] == T0 - 2 * DAY and user["user_recent_items"] == ["old"]
    assert len(aggregates.users["u1"]["buckets"]) == 1


def test_a_new_entity_starts_at_the_prior():
    config = AggregateConfig(prior_ctr=0.3, ctr_strength=5, prior_cvr=0.2, cvr_strength=4)
    for values in (user_features(new_user_state(), config), item_features(new_item_state(), config)):
        assert all(v == pytest.approx(0.3) for k, v in values.items() if "_ctr_" in k)
        assert all(v == pytest.approx(0.2) for k, v in values.items() if "_cvr_" in k)
    _, update = update_user(None, impression(T0), config)
    assert update.values["user_ctr_1h"] == pytest.approx((0 + 5 * 0.3) / (1 + 5))
    assert update.values["user_cvr_1h"] == pytest.approx(0.2)


def test_smoothed_rates_converge_to_the_empirical_rates():
    events = []
    for n in range(2000):  # 2000 impressions in 50 minutes; 30% clicked, a tenth of those bought
        t = T0 + n * 1500
        events.append(impression(t))
        if n % 10 < 3:
            events.append(click(t + 100))
        if n % 100 < 3:
            events.append(purchase(t + 200))
    _, updates = run(events)
    user = last(updates, "user_activity", "u1").values
    assert (user["user_impressions_1h"], user["user_clicks_1h"], user["user_purchases_1h"]) == (2000, 600, 60)
    assert user["user_ctr_1h"] == pytest.approx((600 + 20 * 0.05) / (2000 + 20))
    assert user["user_ctr_1h"] == pytest.approx(0.3, abs=0.005)
    assert user["user_cvr_24h"] == pytest.approx(0.1, abs=0.005)


def test_recent_items_are_most_recent_first_without_duplicates():
    _, updates = run([click(T0, item="a"), click(T0 + 1, item="b", action="cart"), impression(T0 + 2, item="x"),
                      purchase(T0 + 3, item="y"), click(T0 + 4, item="c", action="fav"), click(T0 + 5, item="a")])
    user = last(updates, "user_activity", "u1").values
    assert user["user_recent_items"] == ["a", "c", "b"]
    assert user["user_clicks_24h"] == 4 and user["user_last_click_ms"] == T0 + 5


def test_recent_items_keep_only_the_last_n():
    _, updates = run([click(T0 + n, item=f"i{n}") for n in range(RECENT_ITEMS + 5)])
    recent = last(updates, "user_activity", "u1").values["user_recent_items"]
    assert recent == [f"i{n}" for n in range(RECENT_ITEMS + 4, 4, -1)]


def test_organic_clicks_and_purchases_count_without_impressions():
    _, updates = run([click(T0, item="i2"), purchase(T0 + 1, item="i2")])
    user = last(updates, "user_activity", "u1").values
    item = last(updates, "item_stats", "i2").values
    assert (user["user_impressions_24h"], user["user_clicks_24h"], user["user_purchases_24h"]) == (0, 1, 1)
    assert (item["item_clicks_1h"], item["item_purchases_1h"], item["item_popularity_24h"]) == (1, 1, 6.0)
    assert 0.0 < user["user_ctr_1h"] <= 1.0 and 0.0 < item["item_cvr_1h"] <= 1.0


def test_rates_are_capped_at_one_when_organic_clicks_outnumber_impressions():
    _, updates = run([click(T0 + n) for n in range(50)])
    assert last(updates, "user_activity", "u1").values["user_ctr_24h"] == 1.0


def test_a_redelivered_event_counts_once():
    first, again = click(T0, event_id="c-1"), click(T0, event_id="c-1")
    aggregates, updates = run([impression(T0 - 1), first])
    assert aggregates.apply(again) == []
    restored = Aggregates(users=json.loads(json.dumps(aggregates.users)), items=json.loads(json.dumps(aggregates.items)))
    assert restored.apply(again) == []
    assert restored.apply(click(T0 + 1))[0].values["user_clicks_1h"] == 2


def test_update_functions_do_not_mutate_their_input_state():
    user, _ = update_user(None, click(T0))
    item, _ = update_item(None, click(T0))
    before = json.dumps([user, item], sort_keys=True)
    update_user(user, click(T0 + 2 * DAY, item="i2"))
    update_item(item, impression(T0 + 1))
    update_item(item, Item(event_id="it", event_time=T0, item_id="i1", title="Tea"))
    assert json.dumps([user, item], sort_keys=True) == before


def test_item_events_update_the_catalog_and_do_not_touch_counts():
    aggregates, updates = run([impression(T0, item="i1"),
                               Item(event_id="it-1", event_time=T0 + 5, item_id="i1", title="Tea", price=3.5)])
    catalog = updates[-1]
    assert (catalog.view, catalog.key, catalog.event_time) == ("item_catalog", "i1", T0 + 5)
    assert set(catalog.values) == set(ITEM_CATALOG) and catalog.values["price"] == 3.5
    assert aggregates.items["i1"]["latest_ms"] == T0 and "i1" not in aggregates.users
    stale = Item(event_id="it-0", event_time=T0, item_id="i1", title="Old tea")
    assert aggregates.apply(stale) == []


def test_every_update_has_exactly_the_contract_keys_and_kinds():
    events = [impression(T0, item="a"), click(T0 + 1, item="a"), purchase(T0 + 2, item="a"),
              click(T0 + DAY, user="u2", item="b"), impression(T0 - 5 * MINUTE, user="u2", item="b")]
    _, updates = run(events)
    kinds = {"int": int, "float": float, "str_list": list}
    for update in updates:
        contract = {"user_activity": USER_ACTIVITY, "item_stats": ITEM_STATS}[update.view]
        assert set(update.values) == set(contract)
        for name, kind in contract.items():
            value = update.values[name]
            assert value is None and name.endswith("last_click_ms") or type(value) is kinds[kind], (name, value)


def test_memory_stays_bounded_over_three_days_of_events():
    events = [(impression if n % 3 else click)(T0 + n * 20_000, item=f"i{n % 50}") for n in range(3 * DAY // 20_000)]
    aggregates, _ = run(events)
    user = aggregates.users["u1"]
    assert len(user["buckets"]) <= max(WINDOWS.values()) // MINUTE
    assert len(user["seen"]) <= 1000 and len(user["recent_items"]) == RECENT_ITEMS
    assert all(len(state["buckets"]) <= 24 * 60 for state in aggregates.items.values())


def test_json_round_trips_reproduce_an_uninterrupted_run():
    rng = random.Random(7)
    make = [impression, impression, impression, click, purchase]
    events = [rng.choice(make)(T0 + rng.randrange(0, 2 * DAY), user=f"u{rng.randrange(3)}", item=f"i{rng.randrange(5)}")
              for _ in range(400)]
    events.sort(key=lambda e: e.event_time + rng.randrange(0, 5 * MINUTE))  # a little out of order
    events += rng.sample(events, 30)  # redeliveries
    straight, expected = run(events)

    config, users, items, updates = AggregateConfig(), {}, {}, []
    for n, event in enumerate(events):  # every write goes through JSON, as Faust's changelog does
        if n == len(events) // 2:  # and the worker restarts from the changelog halfway
            users, items = json.loads(json.dumps(users)), json.loads(json.dumps(items))
        for table, update_fn, key in ((users, update_user, event.user_id), (items, update_item, event.item_id)):
            state, update = update_fn(table.get(key), event, config)
            table[key] = json.loads(json.dumps(state))
            if update is not None:
                updates.append(update)
    assert updates == expected
    assert users == straight.users and items == straight.items


# ---- order independence, against a brute-force reference ------------------------------------

@st.composite
def event_sets(draw, span_ms):
    count = draw(st.integers(1, 40))
    events = []
    for n in range(count):
        kind = draw(st.sampled_from([impression, click, purchase]))
        t = T0 + draw(st.integers(0, span_ms))
        events.append(kind(t, user=f"u{draw(st.integers(0, 2))}", item=f"i{draw(st.integers(0, 3))}", event_id=f"x{n}"))
    return events


def reference_counts(events, key):
    """Window counts straight from the set of events, by the documented bucket rule."""
    result = {}
    for entity in {key(e) for e in events}:
        mine = {e.event_id: e for e in events if key(e) == entity}.values()
        newest = max(e.event_time for e in mine) // MINUTE
        for window, ms in WINDOWS.items():
            inside = [e for e in mine if e.event_time // MINUTE > newest - ms // MINUTE]
            result[entity, window] = tuple(sum(isinstance(e, kind) for e in inside) for kind in (Impression, Click, Purchase))
    return result


def final_features(aggregates):
    return ({u: user_features(s) for u, s in aggregates.users.items()},
            {i: item_features(s) for i, s in aggregates.items.items()})


def assert_counts_match_reference(aggregates, events):
    users, items = final_features(aggregates)
    for (prefix, features, key) in (("user", users, lambda e: e.user_id), ("item", items, lambda e: e.item_id)):
        for (entity, window), counts in reference_counts(events, key).items():
            values = features[entity]
            got = tuple(values[f"{prefix}_{name}_{window}"] for name in ("impressions", "clicks", "purchases"))
            assert got == counts, (prefix, entity, window)


@settings(max_examples=150, deadline=None)
@given(event_sets(span_ms=20 * HOUR), st.randoms(use_true_random=False), st.data())
def test_any_arrival_order_within_the_window_gives_the_sorted_result(events, rng, data):
    in_order, _ = run(sorted(events, key=lambda e: e.event_time))
    shuffled = events + data.draw(st.lists(st.sampled_from(events), max_size=5))  # with redeliveries
    rng.shuffle(shuffled)
    out_of_order, _ = run(shuffled)
    assert final_features(out_of_order) == final_features(in_order)
    assert_counts_match_reference(in_order, events)


@settings(max_examples=100, deadline=None)
@given(event_sets(span_ms=3 * DAY), st.randoms(use_true_random=False))
def test_events_shuffled_within_a_minute_over_days_give_the_sorted_result(events, rng):
    in_order, _ = run(sorted(events, key=lambda e: e.event_time))
    skewed, _ = run(sorted(events, key=lambda e: e.event_time + rng.randrange(MINUTE)))
    assert final_features(skewed) == final_features(in_order)
    for table in ("users", "items"):
        assert {k: s["buckets"] for k, s in getattr(skewed, table).items()} == \
               {k: s["buckets"] for k, s in getattr(in_order, table).items()}
    assert_counts_match_reference(in_order, events)


def test_the_config_must_fit_the_windows():
    with pytest.raises(ValueError, match="bucket_ms"):
        AggregateConfig(bucket_ms=7 * MINUTE)
    with pytest.raises(ValueError, match="prior"):
        AggregateConfig(prior_ctr=1.5)


def test_only_impressions_clicks_and_purchases_are_counted():
    with pytest.raises(TypeError, match="Item"):
        update_user(None, Item(event_id="it", event_time=T0, item_id="i1", title="x"))
