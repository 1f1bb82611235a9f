"""The one way StreamRec talks to Feast: register the definitions, push streaming feature
updates (online and offline at once), read the latest values online, and build point-in-time
correct training sets offline.

>>> import tempfile
>>> from streaming.features import FeatureUpdate
>>> store = StreamingFeatureStore(FeatureStoreSettings(data_dir=tempfile.mkdtemp()))
>>> store.apply()
>>> store.push([FeatureUpdate("item_catalog", "i1", 1_767_225_600_000, {"title": "Lamp", "price": 19.5})])
>>> store.online_features(item_ids=["i1", "i404"], views=["item_catalog"])["item"]["title"]
['Lamp', None]
>>> store.close()
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureStore
from feast.data_source import PushMode
from redis.exceptions import AuthenticationError as RedisAuthenticationError

from feature_store.config import FeatureStoreSettings, repo_config, write_feature_store_yaml
from feature_store.definitions import (
    JOIN_KEYS,
    TIMESTAMP_FIELD,
    feature_repo,
    offline_path,
    offline_schema,
    push_source_name,
)
from streaming.events import Example
from streaming.features import VIEWS, FeatureUpdate, FeatureValue


SCHEMA_PART = "part-00000000000000000000-schema.parquet"  # sorts first; holds no rows


class FeatureStoreError(RuntimeError):
    pass


def _write_part(table: pa.Table, path: Path) -> None:
    """Write one part file atomically; readers skip dot-files, so they never see a half-written one."""
    partial = path.with_name(f".{path.name}.partial")
    # Feast reads list columns only in Arrow's "list<item: ...>" spelling, not parquet's "element"
    pq.write_table(table, partial, use_compliant_nested_type=False)
    os.replace(partial, path)


def _new_part_path(folder: Path) -> Path:
    return folder / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"


def _data_parts(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("part-*.parquet") if p.name != SCHEMA_PART)


def compact_offline(folder: Path) -> None:
    """Merge a view's part files into one, so training-set joins read few files.

    Safe beside concurrent pushes and compactions: only the parts read are removed, after the
    merged file is in place; a row seen twice meanwhile has the same key and time, which the
    point-in-time join treats as one.
    """
    parts = _data_parts(folder)
    if len(parts) < 2:
        return
    _write_part(pa.concat_tables(pq.read_table(p) for p in parts), _new_part_path(folder))
    for part in parts:
        part.unlink(missing_ok=True)


def feature_refs(views: Iterable[str]) -> list[str]:
    """Feast's ``view:feature`` references for every contract feature of ``views``."""
    return [f"{view}:{name}" for view in views for name in VIEWS[view][1]]


def _epoch_ms_to_utc(ms: pd.Series) -> pd.Series:
    return pd.to_datetime(ms.astype("int64"), unit="ms", utc=True)


class StreamingFeatureStore:
    """StreamRec's Feast feature store, configured from the ``feature_store`` settings section."""

    def __init__(self, settings: FeatureStoreSettings) -> None:
        self.settings = settings
        self.repo = feature_repo(settings.data_dir)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.feast = FeatureStore(config=repo_config(settings))

    def apply(self) -> None:
        """Create each view's offline dataset if missing and register entities, sources and views.

        Idempotent: applying the same definitions again changes nothing.
        """
        for view in VIEWS:
            folder, schema = offline_path(self.settings.data_dir, view), offline_schema(view)
            seed = folder / SCHEMA_PART
            if not seed.exists():
                folder.mkdir(parents=True, exist_ok=True)
                _write_part(schema.empty_table(), seed)  # an empty dataset still has a schema to read
            elif not pq.read_schema(seed).equals(schema):
                raise FeatureStoreError(
                    f"the offline dataset {folder} has columns {pq.read_schema(seed).names}, but "
                    f"streaming.features now declares {schema.names}; move the folder away (its history "
                    "is lost to training sets) or rewrite it with the new columns"
                )
        write_feature_store_yaml(self.settings)  # lets the `feast` CLI inspect the same registry
        self.feast.apply(self.repo.objects)

    def push(self, updates: Iterable[FeatureUpdate]) -> None:
        """Append updates to the offline store, then write them to the online store, per view.

        Each update is the entity's full row in its view: features it leaves out are stored as
        null. Within one call the latest update per entity wins online; of updates with the same
        entity and event time, the last one given is kept.
        """
        by_view: dict[str, list[FeatureUpdate]] = defaultdict(list)
        for update in updates:
            by_view[update.view].append(update)
        for view, view_updates in by_view.items():
            table = self._table(view, view_updates)
            # Not PushMode.ONLINE_AND_OFFLINE: Feast's file offline write rewrites the whole parquet
            # file on every push and writes list columns in a form its own schema reader rejects
            # ("list<element: string>"), so the second push of user_recent_items would fail.
            # One new part file per push is an append, and keeps the "list<item: ...>" form.
            folder = offline_path(self.settings.data_dir, view)
            _write_part(table, _new_part_path(folder))
            if len(_data_parts(folder)) > self.settings.offline_max_parts:
                compact_offline(folder)
            frame = table.to_pandas(types_mapper=pd.ArrowDtype)  # nullable ints stay ints, lists stay lists
            try:
                self.feast.push(push_source_name(view), frame, to=PushMode.ONLINE)
            except RedisAuthenticationError as exc:
                raise self._login_refused(exc) from None

    @staticmethod
    def _table(view: str, updates: list[FeatureUpdate]) -> pa.Table:
        entity, features = VIEWS[view]
        for update in updates:
            unknown = update.values.keys() - features.keys()
            if unknown:
                raise ValueError(f"view {view} has no features {sorted(unknown)}; see streaming.features.VIEWS")
        latest: dict[tuple[str, int], FeatureUpdate] = {}
        for update in sorted(updates, key=lambda u: u.event_time):  # stable: of equal times the last given wins
            latest[(update.key, update.event_time)] = update
        rows = list(latest.values())
        columns: dict[str, list[Any]] = {JOIN_KEYS[entity]: [u.key for u in rows]}
        for name in features:
            columns[name] = [u.values.get(name) for u in rows]
        columns[TIMESTAMP_FIELD] = [u.event_time * 1000 for u in rows]  # microseconds
        return pa.table(columns, schema=offline_schema(view))

    def online_features(
        self,
        user_ids: Sequence[str] = (),
        item_ids: Sequence[str] = (),
        views: Iterable[str] | None = None,
    ) -> dict[str, dict[str, list[FeatureValue]]]:
        """Latest values per entity, as columns: ``{"user": {"user_id": [...], feature: [...]}, "item": ...}``.

        Rows follow the given ids; an entity never pushed gets None for every feature. ``views``
        narrows the read (default: every view of each entity asked for).
        """
        wanted = list(views) if views is not None else list(VIEWS)
        result: dict[str, dict[str, list[FeatureValue]]] = {}
        for entity, ids in (("user", user_ids), ("item", item_ids)):
            entity_views = [view for view in wanted if VIEWS[view][0] == entity]
            if not ids or not entity_views:
                continue
            try:
                response = self.feast.get_online_features(
                    features=feature_refs(entity_views), entity_rows={JOIN_KEYS[entity]: list(ids)}
                )
            except RedisAuthenticationError as exc:
                raise self._login_refused(exc) from None
            result[entity] = response.to_dict()
        return result

    def _login_refused(self, exc: Exception) -> FeatureStoreError:
        given = "a password that it refused" if self.settings.redis_password is not None else "no password"
        return FeatureStoreError(
            f"the Redis online store at {self.settings.redis_connection_string} refused StreamRec's login ({exc}): "
            f"StreamRec sent {given}; set feature_store.redis_password (STREAMREC_FEATURE_STORE__REDIS_PASSWORD) "
            "to the server's password"
        )

    def training_set(self, examples: Sequence[Example] | pd.DataFrame) -> pd.DataFrame:
        """Every contract feature joined to each example as of its impression's event time.

        ``examples`` are :class:`Example` records, or a DataFrame with ``user_id``, ``item_id`` and
        ``event_time`` (epoch ms) whose other columns pass through. A feature row stamped after
        the example, or older than its view's ttl, is never joined (its features are null).
        Rows come back in the order given.
        """
        if isinstance(examples, pd.DataFrame):
            entity_df = examples.copy()
        else:
            entity_df = pd.DataFrame(
                {
                    "event_id": [e.event_id for e in examples],
                    "user_id": [e.impression.user_id for e in examples],
                    "item_id": [e.impression.item_id for e in examples],
                    # features as the model would have seen them when serving, not when the labels closed
                    "event_time": [e.impression.event_time for e in examples],
                    "clicked": [e.clicked for e in examples],
                    "purchased": [e.purchased for e in examples],
                }
            )
        missing = {"user_id", "item_id", "event_time"} - set(entity_df.columns)
        if missing:
            raise ValueError(f"training examples need columns {sorted(missing)}")
        frame = entity_df.reset_index(drop=True)
        frame = frame.astype({key: object for key in JOIN_KEYS.values()})  # ids, even when there are no rows
        frame[TIMESTAMP_FIELD] = _epoch_ms_to_utc(frame["event_time"])
        for view, (entity, features) in VIEWS.items():
            key = JOIN_KEYS[entity]
            frame = frame.merge(self._as_of(view, frame[[key, TIMESTAMP_FIELD]]), on=[key, TIMESTAMP_FIELD],
                                how="left", validate="many_to_one")
            for name, kind in features.items():  # one missing value per kind, whichever join left it out
                if kind == "int":
                    frame[name] = frame[name].astype("Int64")  # Feast hands ints back as floats with NaN
                elif kind == "float":
                    frame[name] = frame[name].astype("float64")
                else:
                    frame[name] = frame[name].astype(object).where(frame[name].notna(), None)
                    if kind == "str_list":  # Feast hands lists back as numpy arrays
                        frame[name] = frame[name].map(lambda v: None if v is None else [str(x) for x in v])
        return frame

    def _as_of(self, view: str, lookups: pd.DataFrame) -> pd.DataFrame:
        """One view's features as of each distinct (key, time) in ``lookups``, via Feast's point-in-time join.

        Feast's file store mishandles three kinds of entity rows, so only the others reach it and
        the caller left-joins the result: rows sharing (key, time), such as a slate's items, are
        collapsed; a row whose entity has only later feature rows is dropped; and a row whose
        entity has no feature rows at all makes the join fail once the data spans several files.
        """
        entity, features = VIEWS[view]
        key = JOIN_KEYS[entity]
        columns = [key, TIMESTAMP_FIELD, *features]
        known = pq.read_table(offline_path(self.settings.data_dir, view), columns=[key]).column(key).unique()
        lookups = lookups.drop_duplicates()
        lookups = lookups[lookups[key].isin(known.to_pylist())]
        if lookups.empty:
            return pd.DataFrame(columns=columns).astype({TIMESTAMP_FIELD: "datetime64[ns, UTC]"})
        joined = self.feast.get_historical_features(entity_df=lookups, features=feature_refs([view])).to_df()
        return joined[columns]

    def close(self) -> None:
        """Release the online store's connection (Feast keeps one open per store object)."""
        online = self.feast._get_provider().online_store  # noqa: SLF001 - Feast has no public close for these
        for attribute in ("_conn", "_client"):  # SQLite connection, redis-py client
            connection = getattr(online, attribute, None)
            if connection is not None:
                connection.close()
                setattr(online, attribute, None)

    def __enter__(self) -> "StreamingFeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["FeatureStoreError", "FeatureStoreSettings", "StreamingFeatureStore", "feature_refs"]
