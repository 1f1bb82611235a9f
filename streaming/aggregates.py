"""Windowed per-user and per-item features, as pure functions on plain JSON-ready state.

Each user and each item has one state: a dict of ints, strings, lists and dicts only, so the live
path keeps it in a Faust table (changelog-backed, keyed by user_id or item_id) and the in-process
path keeps it in a dict, and both run the same functions:

- ``update_user(state, event) -> (new_state, update)`` for impressions, clicks and purchases;
- ``update_item(state, event) -> (new_state, update)`` for those and for ``Item`` catalog events.

``update`` is a :class:`~streaming.features.FeatureUpdate` with every feature of its view, or
``None`` when the event changes nothing (a redelivered event_id, a catalog event older than the
one applied). The input state is never mutated. :class:`Aggregates` holds both kinds of state for
in-process use.

Time is event time only. Counts live in buckets of ``bucket_ms`` (default one minute), stored
sparsely as ``{str(event_time // bucket_ms): [impressions, clicks, purchases]}``. Values are as
of the latest event time the entity has seen, ``t``: a window of length W counts the buckets
from ``t``'s bucket back W/bucket_ms buckets, so it covers (t - W, t] except that its old edge
is rounded up to a bucket boundary (it may leave out up to one bucket of the oldest events).
Buckets older than the largest window are pruned, so a state holds at most 24h/bucket_ms
buckets; each window's running total (``state["totals"]``) gains an event as it is counted and
loses a bucket as the window slides past it, so an update costs O(1) amortised (plus copying
the state, which is never mutated). An out-of-order event is added to its own bucket and the
values stay as of the latest time; an event older than the largest window before that time no
longer counts (it still updates last-click time and recent items, which take the maximum). Event ids are remembered
while their bucket is kept, at most ``max_seen_ids`` per entity (oldest arrival dropped first),
so a redelivered event does not count twice.

Rates are smoothed toward a prior: CTR = (clicks + a*prior_ctr) / (impressions + a) and
CVR = (purchases + b*prior_cvr) / (clicks + b), capped at 1 because organic clicks (no
impression) and organic purchases (no click) count too. Any click action (click, cart, fav) is
a click. Item popularity is clicks_24h + popularity_purchase_weight * purchases_24h.
``*_last_click_ms`` is None until the entity's first click.

>>> from streaming.events import Click, Impression
>>> t = 1_767_225_600_000
>>> aggregates = Aggregates()
>>> _ = aggregates.apply(Impression(event_id="i-1", event_time=t, request_id="r1", user_id="u1",
...                                 item_id="i9", position=0, slate_size=1, propensity=1.0))
>>> user, item = aggregates.apply(Click(event_id="c-1", event_time=t + 5_000, user_id="u1", item_id="i9"))
>>> user.values["user_clicks_1h"], user.values["user_recent_items"], round(user.values["user_ctr_1h"], 4)
(1, ['i9'], 0.0952)
>>> item.view, item.key, item.values["item_popularity_24h"]
('item_stats', 'i9', 1.0)
>>> aggregates.apply(Click(event_id="c-1", event_time=t + 5_000, user_id="u1", item_id="i9"))
[]
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import takewhile
from typing import Any, Union

from streaming.events import Click, Event, Impression, Item, Purchase
from streaming.features import RECENT_ITEMS, WINDOWS, FeatureUpdate, FeatureValue

STATE_VERSION = 1
CountedEvent = Union[Impression, Click, Purchase]
State = dict[str, Any]


@dataclass(frozen=True)
class AggregateConfig:
    prior_ctr: float = 0.05
    ctr_strength: float = 20.0  # a: how many impressions the prior is worth
    prior_cvr: float = 0.1
    cvr_strength: float = 10.0  # b: how many clicks the prior is worth
    popularity_purchase_weight: float = 5.0
    bucket_ms: int = 60_000
    max_seen_ids: int = 1000

    def __post_init__(self) -> None:
        if not (0.0 <= self.prior_ctr <= 1.0 and 0.0 <= self.prior_cvr <= 1.0):
            raise ValueError("prior_ctr and prior_cvr must be rates in [0, 1]")
        if self.ctr_strength <= 0 or self.cvr_strength <= 0:
            raise ValueError("ctr_strength and cvr_strength must be positive")
        if self.bucket_ms <= 0 or any(ms % self.bucket_ms for ms in WINDOWS.values()):
            raise ValueError(f"bucket_ms must be positive and divide every window {sorted(WINDOWS.values())}")
        if self.max_seen_ids < 1:
            raise ValueError("max_seen_ids must be at least 1")

    def oldest_kept_bucket(self, latest_ms: int) -> int:
        return latest_ms // self.bucket_ms - max(WINDOWS.values()) // self.bucket_ms + 1


DEFAULT_CONFIG = AggregateConfig()


def _zero_totals() -> dict[str, list[int]]:
    return {window: [0, 0, 0] for window in WINDOWS}


def new_user_state() -> State:
    return {"v": STATE_VERSION, "latest_ms": None, "buckets": {}, "seen": {}, "totals": _zero_totals(),
            "last_click_ms": None, "recent_items": []}


def new_item_state() -> State:
    return {"v": STATE_VERSION, "latest_ms": None, "buckets": {}, "seen": {}, "totals": _zero_totals(),
            "last_click_ms": None, "catalog_ms": None}


def update_user(state: State | None, event: CountedEvent,
                config: AggregateConfig = DEFAULT_CONFIG) -> tuple[State, FeatureUpdate | None]:
    """Fold one impression, click or purchase into a user's state; return it and the new features."""
    _require_counted(event)
    state = new_user_state() if state is None else state
    new = _count(state, event, config)
    if new is None:
        return state, None
    if isinstance(event, Click):
        new["recent_items"] = _remember_click(state["recent_items"], event.item_id, event.event_time)
    return new, FeatureUpdate("user_activity", event.user_id, new["latest_ms"], user_features(new, config))


def update_item(state: State | None, event: CountedEvent | Item,
                config: AggregateConfig = DEFAULT_CONFIG) -> tuple[State, FeatureUpdate | None]:
    """Fold one event into an item's state; an ``Item`` event yields its ``item_catalog`` update."""
    state = new_item_state() if state is None else state
    if isinstance(event, Item):
        if state["catalog_ms"] is not None and event.event_time < state["catalog_ms"]:
            return state, None  # a newer catalog entry is already applied
        values: dict[str, FeatureValue] = {"title": event.title, "description": event.description,
                                           "category": event.category, "price": event.price}
        update = FeatureUpdate("item_catalog", event.item_id, event.event_time, values)
        return {**state, "catalog_ms": event.event_time}, update
    _require_counted(event)
    new = _count(state, event, config)
    if new is None:
        return state, None
    return new, FeatureUpdate("item_stats", event.item_id, new["latest_ms"], item_features(new, config))


def window_counts(state: State) -> dict[str, tuple[int, int, int]]:
    """(impressions, clicks, purchases) per window of ``features.WINDOWS``, as of ``state["latest_ms"]``."""
    return {window: (counts[0], counts[1], counts[2]) for window, counts in state["totals"].items()}


def user_features(state: State, config: AggregateConfig = DEFAULT_CONFIG) -> dict[str, FeatureValue]:
    """Every ``features.USER_ACTIVITY`` value of a user's state, as of its latest event."""
    values = _windowed_features("user", window_counts(state), config)
    values["user_last_event_ms"] = state["latest_ms"]
    values["user_last_click_ms"] = state["last_click_ms"]
    values["user_recent_items"] = [item_id for item_id, _ in state["recent_items"]]
    return values


def item_features(state: State, config: AggregateConfig = DEFAULT_CONFIG) -> dict[str, FeatureValue]:
    """Every ``features.ITEM_STATS`` value of an item's state, as of its latest event."""
    counts = window_counts(state)
    values = _windowed_features("item", counts, config)
    values["item_last_click_ms"] = state["last_click_ms"]
    _, clicks, purchases = counts["24h"]
    values["item_popularity_24h"] = float(clicks + config.popularity_purchase_weight * purchases)
    return values


class Aggregates:
    """The in-process home of every user's and item's state: the replay twin of the Faust tables."""

    def __init__(self, config: AggregateConfig = DEFAULT_CONFIG,
                 users: dict[str, State] | None = None, items: dict[str, State] | None = None) -> None:
        self.config = config
        self.users: dict[str, State] = {} if users is None else users
        self.items: dict[str, State] = {} if items is None else items

    def apply(self, event: Event) -> list[FeatureUpdate]:
        """The user update, then the item update, that ``event`` causes; other event types cause none."""
        updates: list[FeatureUpdate | None] = []
        if isinstance(event, (Impression, Click, Purchase)):
            self.users[event.user_id], update = update_user(self.users.get(event.user_id), event, self.config)
            updates.append(update)
        if isinstance(event, (Impression, Click, Purchase, Item)):
            self.items[event.item_id], update = update_item(self.items.get(event.item_id), event, self.config)
            updates.append(update)
        return [update for update in updates if update is not None]


def _require_counted(event: Event) -> None:
    if not isinstance(event, (Impression, Click, Purchase)):
        raise TypeError(f"aggregates count impressions, clicks and purchases, not {type(event).__name__}")


def _count(state: State, event: CountedEvent, config: AggregateConfig) -> State | None:
    """The state with ``event`` counted, or None when its event_id was already counted."""
    if event.event_id in state["seen"]:
        return None
    time, previous = event.event_time, state["latest_ms"]
    latest = time if previous is None else max(previous, time)
    buckets, seen = dict(state["buckets"]), dict(state["seen"])
    totals = {window: list(counts) for window, counts in state["totals"].items()}
    if previous is not None and latest // config.bucket_ms > previous // config.bucket_ms:
        _slide_windows(buckets, totals, previous, latest, config)
        oldest = config.oldest_kept_bucket(latest)
        expired = [i for i, _ in takewhile(lambda entry: entry[1] // config.bucket_ms < oldest, seen.items())]
        for event_id in expired:  # ids arrive roughly in time order; stragglers go by the cap below
            del seen[event_id]
    bucket, newest = time // config.bucket_ms, latest // config.bucket_ms
    kind = 0 if isinstance(event, Impression) else 1 if isinstance(event, Click) else 2
    for window, ms in WINDOWS.items():
        if bucket > newest - ms // config.bucket_ms:
            totals[window][kind] += 1
    if bucket >= config.oldest_kept_bucket(latest):  # older events lie outside every window
        key = str(bucket)
        counts = list(buckets.get(key, (0, 0, 0)))
        counts[kind] += 1
        buckets[key] = counts
        seen[event.event_id] = time
        while len(seen) > config.max_seen_ids:
            del seen[next(iter(seen))]
    new = {**state, "latest_ms": latest, "buckets": buckets, "seen": seen, "totals": totals}
    if isinstance(event, Click) and (state["last_click_ms"] is None or time > state["last_click_ms"]):
        new["last_click_ms"] = time
    return new


def _slide_windows(buckets: dict[str, list[int]], totals: dict[str, list[int]],
                   previous: int, latest: int, config: AggregateConfig) -> None:
    """Take the buckets that fall out of each window, as the latest time moves on, out of its total."""
    largest = max(WINDOWS.values())
    for window, ms in sorted(WINDOWS.items(), key=lambda entry: entry[1]):  # the largest pops buckets, so last
        length = ms // config.bucket_ms
        old_start, new_start = previous // config.bucket_ms - length + 1, latest // config.bucket_ms - length + 1
        for bucket in range(old_start, min(new_start, previous // config.bucket_ms + 1)):
            counts = buckets.pop(str(bucket), None) if ms == largest else buckets.get(str(bucket))
            if counts:
                totals[window] = [total - n for total, n in zip(totals[window], counts)]


def _remember_click(recent: list[list[Any]], item_id: str, time: int) -> list[list[Any]]:
    """[[item_id, last click ms], ...], most recent first, one entry per item, at most RECENT_ITEMS.

    Each item keeps its latest click time and ties go by item_id, so the list depends only on
    which clicks were seen, not on the order they arrived in.
    """
    latest = {entry[0]: entry[1] for entry in recent}
    latest[item_id] = max(time, latest.get(item_id, time))
    ranked = sorted(latest.items(), key=lambda entry: (-entry[1], entry[0]))
    return [[item, ms] for item, ms in ranked[:RECENT_ITEMS]]


def _windowed_features(prefix: str, counts: dict[str, tuple[int, int, int]],
                       config: AggregateConfig) -> dict[str, FeatureValue]:
    values: dict[str, FeatureValue] = {}
    for window, (impressions, clicks, purchases) in counts.items():
        values[f"{prefix}_impressions_{window}"] = impressions
        values[f"{prefix}_clicks_{window}"] = clicks
        values[f"{prefix}_purchases_{window}"] = purchases
        ctr = (clicks + config.ctr_strength * config.prior_ctr) / (impressions + config.ctr_strength)
        cvr = (purchases + config.cvr_strength * config.prior_cvr) / (clicks + config.cvr_strength)
        values[f"{prefix}_ctr_{window}"] = min(1.0, ctr)
        values[f"{prefix}_cvr_{window}"] = min(1.0, cvr)
    return values
