"""The event contracts and their one JSON codec (pure, no broker)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from streaming.events import (
    Click, DeadLetter, DecodeError, Example, Impression, Item, ModelUpdate, Purchase,
    decode_event, encode_event, json_schemas,
)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z

ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Zs", "Cc", "Zl", "Zp")), min_size=1, max_size=20)
times = st.integers(min_value=0, max_value=4_102_444_800_000)


@st.composite
def impressions(draw):
    size = draw(st.integers(1, 20))
    return Impression(
        event_time=draw(times), request_id=draw(ids), user_id=draw(ids), item_id=draw(ids),
        position=draw(st.integers(0, size - 1)), slate_size=size,
        propensity=draw(st.floats(min_value=1e-6, max_value=1.0)),
        model_version=draw(st.none() | ids), policy_version=draw(st.none() | ids),
        context=draw(st.dictionaries(ids, st.integers(-10, 10) | st.text(max_size=5), max_size=3)),
        features=draw(st.dictionaries(ids, st.floats(allow_nan=False, allow_infinity=False), max_size=4)),
    )


events = st.one_of(
    impressions(),
    st.builds(Click, event_time=times, user_id=ids, item_id=ids, request_id=st.none() | ids,
              action=st.sampled_from(["click", "cart", "fav"])),
    st.builds(Purchase, event_time=times, user_id=ids, item_id=ids, quantity=st.integers(1, 100),
              revenue=st.floats(0, 1e6)),
    st.builds(Item, event_time=times, item_id=ids, title=st.text(max_size=50), description=st.text(max_size=100),
              category=st.text(max_size=10), price=st.none() | st.floats(0, 1e5)),
    st.builds(DeadLetter, event_time=times, topic=ids, partition=st.integers(-1, 100), offset=st.integers(-1, 10**9),
              original_key=st.none() | st.binary(max_size=20), original_value=st.none() | st.binary(max_size=200),
              error=st.text(max_size=50)),
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_every_event_round_trips_through_the_codec(event):
    assert decode_event(encode_event(event)) == event
    assert decode_event(encode_event(event), type(event)) == event


def test_example_and_model_update_round_trip():
    imp = Impression(event_time=T0, request_id="r1", user_id="u1", item_id="i1", position=0, slate_size=3,
                     propensity=0.5, model_version="m3", policy_version=None)
    ex = Example(event_id=imp.event_id, event_time=T0 + 60_000, impression=imp, clicked=True, purchased=False,
                 click_time=T0 + 5_000)
    mu = ModelUpdate(event_time=T0, kind="model", version="v7", artifact_uri="file:///reg/v7",
                     manifest_digest="a" * 64, metrics={"auc_click": 0.71})
    for event in (ex, mu):
        assert decode_event(encode_event(event)) == event


def test_event_times_are_utc_milliseconds():
    aware = datetime(2026, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1)))
    assert Click(event_time=aware, user_id="u", item_id="i").event_time == T0
    assert Click(event_time="2026-01-01T00:00:00Z", user_id="u", item_id="i").event_time == T0
    assert Click(event_time=str(T0), user_id="u", item_id="i").event_time == T0
    with pytest.raises(ValueError, match="no timezone"):
        Click(event_time=datetime(2026, 1, 1), user_id="u", item_id="i")


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\xff\xfe", "Invalid JSON"),
        (b'{"type": "click", "event_time": 1, "user_id": "u"}', "item_id: Field required"),
        (b'{"type": "click", "event_time": -5, "user_id": "u", "item_id": "i"}', "event_time"),
        (b'{"type": "click", "event_time": 1, "user_id": "", "item_id": "i"}', "user_id"),
        (b'{"type": "click", "event_time": 1, "user_id": "u", "item_id": "i", "extra": 1}', "extra: Extra inputs"),
        (b'{"type": "teleport", "event_time": 1}', "does not match any of the expected tags"),
        (b'{"type": "impression", "event_time": 1, "request_id": "r", "user_id": "u", "item_id": "i",'
         b' "position": 3, "slate_size": 3, "propensity": 0.2}', "outside a slate of size 3"),
        (b'{"type": "impression", "event_time": 1, "request_id": "r", "user_id": "u", "item_id": "i",'
         b' "position": 0, "slate_size": 3, "propensity": 0}', "propensity"),
        (b'[1, 2]', "<root>"),
    ],
)
def test_invalid_messages_get_a_one_line_reason(payload, reason):
    with pytest.raises(DecodeError) as info:
        decode_event(payload)
    assert reason in info.value.reason
    assert "\n" not in info.value.reason


def test_a_message_of_another_type_is_rejected_on_a_typed_topic():
    click = Click(event_time=T0, user_id="u", item_id="i")
    with pytest.raises(DecodeError, match="type"):
        decode_event(encode_event(click), Purchase)


def test_schemas_are_published_for_every_event_type():
    schemas = json_schemas()
    assert set(schemas) == {"impression", "click", "purchase", "item", "example", "model_update", "dead_letter"}
    impression = schemas["impression"]
    assert {"event_id", "event_time", "user_id", "item_id", "propensity", "schema_version"} <= set(impression["properties"])
    assert "user_id" in impression["required"] and "propensity" in impression["required"]
    assert json.loads(json.dumps(schemas)) == schemas
