"""The streaming features StreamRec computes and stores: names, types, and one update record.

The aggregates (``streaming.aggregates``) emit :class:`FeatureUpdate` records; the feature store
(``feature_store``) declares one Feast feature view per entity with exactly these fields and
pushes the updates into its online and offline stores. Counts are over sliding event-time
windows; rates are smoothed so a new entity starts at the prior, not at 0/0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

WINDOWS: dict[str, int] = {"1h": 3_600_000, "24h": 86_400_000}
RECENT_ITEMS = 20  # how many of a user's last clicked items are kept

FeatureValue = Union[int, float, str, list[str], None]


def _windowed(prefix: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for window in WINDOWS:
        fields[f"{prefix}_impressions_{window}"] = "int"
        fields[f"{prefix}_clicks_{window}"] = "int"
        fields[f"{prefix}_purchases_{window}"] = "int"
        fields[f"{prefix}_ctr_{window}"] = "float"
        fields[f"{prefix}_cvr_{window}"] = "float"
    return fields


# feature name -> kind ("int", "float", "str", "str_list"), per feature view
USER_ACTIVITY: dict[str, str] = {
    **_windowed("user"),
    "user_last_event_ms": "int",
    "user_last_click_ms": "int",
    "user_recent_items": "str_list",
}
ITEM_STATS: dict[str, str] = {
    **_windowed("item"),
    "item_last_click_ms": "int",
    "item_popularity_24h": "float",
}
ITEM_CATALOG: dict[str, str] = {
    "title": "str",
    "description": "str",
    "category": "str",
    "price": "float",
}
VIEWS: dict[str, tuple[Literal["user", "item"], dict[str, str]]] = {
    "user_activity": ("user", USER_ACTIVITY),
    "item_stats": ("item", ITEM_STATS),
    "item_catalog": ("item", ITEM_CATALOG),
}


@dataclass(frozen=True)
class FeatureUpdate:
    """New values of one entity's features in one view, as of ``event_time`` (epoch ms, UTC)."""

    view: Literal["user_activity", "item_stats", "item_catalog"]
    key: str  # user_id or item_id
    event_time: int
    values: dict[str, FeatureValue] = field(default_factory=dict)

    @property
    def entity(self) -> Literal["user", "item"]:
        return VIEWS[self.view][0]
