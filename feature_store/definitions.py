"""StreamRec's Feast repository: two entities and, per view of the streaming contract, a parquet
dataset (a folder of part files) as its batch source, a push source wrapping it, and a feature
view with exactly the contract's fields.

Everything is derived from ``streaming.features.VIEWS``, so adding a feature there adds it here.

>>> repo = feature_repo("/tmp/streamrec-features")
>>> sorted(view.name for view in repo.feature_views)
['item_catalog', 'item_stats', 'user_activity']
>>> repo.push_sources["user_activity"].name
'user_activity_push'
>>> [f.name for f in repo.feature_views[0].features][-1]
'user_recent_items'
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, FeastType, Float64, Int64, String

from streaming.features import VIEWS

TIMESTAMP_FIELD = "event_timestamp"
JOIN_KEYS: dict[str, str] = {"user": "user_id", "item": "item_id"}

FEAST_TYPES: dict[str, FeastType] = {"int": Int64, "float": Float64, "str": String, "str_list": Array(String)}
ARROW_TYPES: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "str_list": pa.list_(pa.string()),
}

# How long a value stays valid for point-in-time joins; timedelta(0) is Feast's "forever".
# Windowed stats older than a month describe a different user or item; a catalog entry holds until changed.
TTLS: dict[str, timedelta] = {
    "user_activity": timedelta(days=30),
    "item_stats": timedelta(days=30),
    "item_catalog": timedelta(0),
}

ENTITY_DESCRIPTIONS: dict[str, str] = {"user": "a StreamRec user, by user_id", "item": "a catalog item, by item_id"}


def entity(name: str) -> Entity:
    return Entity(name=name, join_keys=[JOIN_KEYS[name]], value_type=ValueType.STRING,
                  description=ENTITY_DESCRIPTIONS[name])


def push_source_name(view: str) -> str:
    return f"{view}_push"


def offline_path(data_dir: str | Path, view: str) -> Path:
    """The parquet dataset (a folder of part files) that is a view's offline store."""
    return Path(data_dir) / "offline" / view


def offline_schema(view: str) -> pa.Schema:
    """Column order of a view's parquet file: entity key, the contract's features, event time."""
    entity_name, features = VIEWS[view]
    return pa.schema(
        [(JOIN_KEYS[entity_name], pa.string())]
        + [(name, ARROW_TYPES[kind]) for name, kind in features.items()]
        + [(TIMESTAMP_FIELD, pa.timestamp("us", tz="UTC"))]
    )


@dataclass(frozen=True)
class FeatureRepo:
    """The Feast objects of one StreamRec feature repository, keyed by view name."""

    entities: list[Entity]
    file_sources: dict[str, FileSource]
    push_sources: dict[str, PushSource]
    feature_views: list[FeatureView]

    @property
    def objects(self) -> list:
        return [*self.entities, *self.file_sources.values(), *self.push_sources.values(), *self.feature_views]


def feature_view(view: str, data_dir: str | Path) -> tuple[FileSource, PushSource, FeatureView]:
    entity_name, features = VIEWS[view]
    batch = FileSource(
        name=f"{view}_parquet",
        path=str(offline_path(data_dir, view).resolve()),
        timestamp_field=TIMESTAMP_FIELD,
    )
    push = PushSource(name=push_source_name(view), batch_source=batch)
    fv = FeatureView(
        name=view,
        entities=[entity(entity_name)],
        ttl=TTLS[view],
        schema=[Field(name=JOIN_KEYS[entity_name], dtype=String)]
        + [Field(name=name, dtype=FEAST_TYPES[kind]) for name, kind in features.items()],
        source=push,
        online=True,
        offline=True,
        description=f"streaming.features.{view.upper()}, pushed by the stream processor",
    )
    return batch, push, fv


def feature_repo(data_dir: str | Path) -> FeatureRepo:
    """All of StreamRec's Feast definitions, with offline parquet files under ``data_dir``."""
    parts = {view: feature_view(view, data_dir) for view in VIEWS}
    return FeatureRepo(
        entities=[entity(name) for name in JOIN_KEYS],
        file_sources={view: batch for view, (batch, _, _) in parts.items()},
        push_sources={view: push for view, (_, push, _) in parts.items()},
        feature_views=[fv for _, _, fv in parts.values()],
    )
