"""The Feast feature store helper against real stores: SQLite and a real redis-server online,
parquet offline. Online reads return the latest value per entity; training sets are
point-in-time correct (never a feature stamped after the example)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from pydantic import ValidationError

from feature_store.config import FeatureStoreSettings, feature_store_yaml, repo_config
from feature_store.definitions import offline_path
from feature_store.store import SCHEMA_PART, StreamingFeatureStore
from streaming.events import Example, Impression
from streaming.features import ITEM_CATALOG, ITEM_STATS, USER_ACTIVITY, VIEWS, FeatureUpdate
from tests.redis_server import LocalRedis, RedisServerError, redis_server  # noqa: F401 (fixture)

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MINUTE = 60_000
DAY = 86_400_000

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # pandas/dask chatter inside Feast's joins


def open_store(data_dir: Path, online: str, redis_connection: str | None = None, **extra) -> StreamingFeatureStore:
    settings = FeatureStoreSettings(
        data_dir=data_dir,
        online_store=online,
        project=f"t{uuid.uuid4().hex[:12]}",  # keeps tests apart in a shared Redis
        **({"redis_connection_string": redis_connection} if redis_connection else {}),
        **extra,
    )
    store = StreamingFeatureStore(settings)
    store.apply()
    return store


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    connection = request.getfixturevalue("redis_server") if request.param == "redis" else None
    store = open_store(tmp_path / "features", request.param, connection)
    yield store
    store.close()


def online_scenario(store: StreamingFeatureStore) -> dict:
    """Two updates per user and item, pushed out of order across calls' ends, plus the catalog."""
    store.push([
        FeatureUpdate("user_activity", "u1", T0, {"user_impressions_1h": 3, "user_ctr_1h": 0.25,
                                                  "user_recent_items": ["i1", "i2"]}),
        FeatureUpdate("user_activity", "u2", T0, {"user_impressions_1h": 1, "user_recent_items": []}),
        FeatureUpdate("item_stats", "i1", T0, {"item_impressions_24h": 10, "item_popularity_24h": 0.5}),
        FeatureUpdate("item_catalog", "i1", T0, {"title": "Desk lamp", "description": "Brass, 40 cm",
                                                 "category": "lighting", "price": 19.5}),
    ])
    store.push([
        FeatureUpdate("user_activity", "u1", T0 + 2 * MINUTE, {"user_impressions_1h": 5, "user_ctr_1h": 0.4,
                                                               "user_recent_items": ["i3", "i1", "i2"]}),
        # within one push the latest event time wins, whatever the order given
        FeatureUpdate("item_stats", "i1", T0 + 2 * MINUTE, {"item_impressions_24h": 12, "item_popularity_24h": 0.75}),
        FeatureUpdate("item_stats", "i1", T0 + 1 * MINUTE, {"item_impressions_24h": 11, "item_popularity_24h": 0.6}),
        FeatureUpdate("item_catalog", "i2", T0, {"title": "Chair", "category": "furniture", "price": 45.0}),
    ])
    return store.online_features(user_ids=["u1", "u2", "nobody"], item_ids=["i1", "i2", "i404"])


def test_online_read_returns_latest_per_entity(store):
    got = online_scenario(store)
    users, items = got["user"], got["item"]
    assert set(users) == {"user_id", *USER_ACTIVITY}
    assert set(items) == {"item_id", *ITEM_STATS, *ITEM_CATALOG}
    assert users["user_id"] == ["u1", "u2", "nobody"]
    assert users["user_impressions_1h"] == [5, 1, None]
    assert users["user_ctr_1h"] == [0.4, None, None]
    assert users["user_recent_items"] == [["i3", "i1", "i2"], [], None]
    assert users["user_clicks_24h"] == [None, None, None]  # features an update leaves out are null
    assert items["item_impressions_24h"] == [12, None, None]
    assert items["item_popularity_24h"] == [0.75, None, None]
    assert items["title"] == ["Desk lamp", "Chair", None]
    assert items["description"] == ["Brass, 40 cm", None, None]
    assert items["category"] == ["lighting", "furniture", None]
    assert items["price"] == [19.5, 45.0, None]


def test_sqlite_and_redis_give_identical_online_reads(tmp_path, redis_server):  # noqa: F811
    results = []
    for online in ("sqlite", "redis"):
        store = open_store(tmp_path / online, online, redis_server)
        try:
            results.append(online_scenario(store))
        finally:
            store.close()
    assert results[0] == results[1]


def test_online_reads_only_the_views_asked_for(store):
    online_scenario(store)
    got = store.online_features(item_ids=["i1"], views=["item_catalog"])
    assert set(got) == {"item"}
    assert set(got["item"]) == {"item_id", *ITEM_CATALOG}


@pytest.mark.parametrize("items", [[], ["é", "a b", "x,y"], [f"i{n}" for n in range(20)]])
def test_recent_items_array_round_trips_online_and_offline(store, items):
    store.push([FeatureUpdate("user_activity", "u1", T0, {"user_recent_items": items})])
    store.push([FeatureUpdate("user_activity", "u1", T0 + 1, {"user_recent_items": items + ["last"]})])
    assert store.online_features(user_ids=["u1"])["user"]["user_recent_items"] == [items + ["last"]]
    rows = store.training_set(pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["i", "i"], "event_time": [T0, T0 + 1]}))
    assert rows["user_recent_items"].tolist() == [items, items + ["last"]]


def test_apply_is_idempotent_and_registers_the_contract(tmp_path):
    store = open_store(tmp_path, "sqlite")
    store.apply()
    assert sorted(e.name for e in store.feast.list_entities()) == ["item", "user"]
    views = {fv.name: fv for fv in store.feast.list_feature_views()}
    assert set(views) == set(VIEWS)
    for name, (_, features) in VIEWS.items():
        assert [f.name for f in views[name].features] == list(features)
    assert sorted(s.name for s in store.feast.list_data_sources() if s.name.endswith("_push")) == [
        "item_catalog_push", "item_stats_push", "user_activity_push"]
    store.close()


def test_push_rejects_features_the_contract_does_not_declare(tmp_path):
    store = open_store(tmp_path, "sqlite")
    with pytest.raises(ValueError, match="user_activity has no features \\['user_age'\\]"):
        store.push([FeatureUpdate("user_activity", "u1", T0, {"user_age": 3})])
    store.close()


def example(user: str, item: str, shown_at: int, closed_at: int, clicked: bool = False) -> Example:
    impression = Impression(event_time=shown_at, request_id=f"r{shown_at}", user_id=user, item_id=item,
                            position=0, slate_size=10, propensity=0.1)
    return Example(event_time=closed_at, impression=impression, clicked=clicked,
                   click_time=shown_at + 1000 if clicked else None, purchased=False)


def test_training_set_is_point_in_time_correct(tmp_path):
    store = open_store(tmp_path, "sqlite")
    t1, t2 = T0, T0 + 10 * MINUTE
    store.push([FeatureUpdate("user_activity", "u1", t1, {"user_impressions_1h": 1, "user_last_event_ms": t1})])
    store.push([FeatureUpdate("user_activity", "u1", t2, {"user_impressions_1h": 2, "user_last_event_ms": t2})])
    store.push([FeatureUpdate("item_catalog", "i1", t1 - DAY, {"title": "Lamp", "price": 10.0})])
    rows = store.training_set(pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u1", "u1"],
        "item_id": ["i1", "i1", "i1", "i2", "i1"],
        "event_time": [t1 - 1, t1, t1 + MINUTE, t1 + MINUTE, t2 + MINUTE],
        "row": [0, 1, 2, 3, 4],
    }))
    assert rows["row"].tolist() == [0, 1, 2, 3, 4]  # order and pass-through columns kept
    assert rows["user_impressions_1h"].tolist() == [pd.NA, 1, 1, 1, 2]
    assert rows["user_last_event_ms"].tolist() == [pd.NA, t1, t1, t1, t2]
    assert rows["title"].tolist() == ["Lamp", "Lamp", "Lamp", None, "Lamp"]
    assert rows["price"].isna().tolist() == [False, False, False, True, False]
    store.close()


def test_training_set_from_examples_uses_the_impression_time(tmp_path):
    store = open_store(tmp_path, "sqlite")
    store.push([FeatureUpdate("user_activity", "u1", T0, {"user_clicks_1h": 0})])
    store.push([FeatureUpdate("user_activity", "u1", T0 + 5 * MINUTE, {"user_clicks_1h": 1})])  # the click itself
    store.push([FeatureUpdate("item_stats", "i1", T0, {"item_clicks_1h": 7})])
    # one slate: three items shown to u1 at the same instant, labels closed 30 minutes later
    shown, closed = T0 + MINUTE, T0 + 31 * MINUTE
    examples = [example("u1", "i1", shown, closed, clicked=True), example("u1", "i2", shown, closed),
                example("u1", "i3", shown, closed)]
    rows = store.training_set(examples)
    assert rows["event_id"].tolist() == [e.event_id for e in examples]
    assert rows["item_id"].tolist() == ["i1", "i2", "i3"]
    assert rows["clicked"].tolist() == [True, False, False]
    assert rows["user_clicks_1h"].tolist() == [0, 0, 0]  # not the click the label came from
    assert rows["item_clicks_1h"].tolist() == [7, pd.NA, pd.NA]
    store.close()


def test_entities_outside_the_ttl_get_nothing(tmp_path):
    store = open_store(tmp_path, "sqlite")
    store.push([FeatureUpdate("user_activity", "u1", T0, {"user_impressions_24h": 4})])
    store.push([FeatureUpdate("item_catalog", "i1", T0, {"title": "Lamp"})])
    rows = store.training_set(pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["i1", "i1"],
                                            "event_time": [T0 + 29 * DAY, T0 + 31 * DAY]}))
    assert rows["user_impressions_24h"].tolist() == [4, pd.NA]  # stats live 30 days
    assert rows["title"].tolist() == ["Lamp", "Lamp"]  # the catalog holds until changed
    store.close()


def test_offline_parts_are_compacted_without_losing_history(tmp_path):
    store = open_store(tmp_path, "sqlite", offline_max_parts=3)
    for n in range(8):
        store.push([FeatureUpdate("user_activity", "u1", T0 + n * MINUTE, {"user_impressions_1h": n})])
    folder = offline_path(store.settings.data_dir, "user_activity")
    parts = sorted(p.name for p in folder.iterdir())
    assert parts[0] == SCHEMA_PART and len(parts) <= 4
    rows = store.training_set(pd.DataFrame({"user_id": ["u1"] * 8, "item_id": ["i"] * 8,
                                            "event_time": [T0 + n * MINUTE for n in range(8)]}))
    assert rows["user_impressions_1h"].tolist() == list(range(8))
    store.close()


@pytest.fixture(scope="module")
def shared_store():
    data_dir = Path(tempfile.mkdtemp(prefix="streamrec-features-"))
    store = open_store(data_dir, "sqlite")
    yield store
    store.close()
    shutil.rmtree(data_dir, ignore_errors=True)


update_times = st.integers(min_value=0, max_value=60 * DAY // MINUTE).map(lambda m: T0 + m * MINUTE)


@hypothesis_settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    updates=st.lists(st.tuples(st.integers(0, 2), update_times), min_size=1, max_size=12),
    asked=st.lists(st.tuples(st.integers(0, 3), update_times), min_size=1, max_size=10),
)
def test_no_training_feature_is_stamped_after_its_example(shared_store, updates, asked):
    run = uuid.uuid4().hex[:8]  # fresh users per example in the shared store
    user = [f"{run}-u{n}" for n in range(4)]  # user 3 never gets an update
    shared_store.push([FeatureUpdate("user_activity", user[u], t, {"user_last_event_ms": t}) for u, t in updates])
    rows = shared_store.training_set(pd.DataFrame({
        "user_id": [user[u] for u, _ in asked], "item_id": ["i"] * len(asked), "event_time": [t for _, t in asked]}))
    ttl = 30 * DAY
    for (u, t), got in zip(asked, rows["user_last_event_ms"].tolist()):
        visible = [ut for uu, ut in updates if uu == u and t - ttl <= ut <= t]
        assert got is pd.NA or got <= t
        assert (None if got is pd.NA else got) == (max(visible) if visible else None)


def test_redis_password_is_passed_through(tmp_path):
    if os.environ.get("REDIS_URL"):
        pytest.skip("REDIS_URL is set; this test starts its own password-protected redis-server")
    try:
        server = LocalRedis(workdir=tmp_path / "redis", extra_args=["--requirepass", "s3cr=t"]).start()
    except RedisServerError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"could not start redis-server: {exc}", pytrace=False)
        pytest.skip(f"no Redis server: {exc}")
    try:
        store = open_store(tmp_path / "features", "redis", server.connection_string, redis_password="s3cr=t")
        store.push([FeatureUpdate("item_catalog", "i1", T0, {"title": "Lamp"})])
        assert store.online_features(item_ids=["i1"], views=["item_catalog"])["item"]["title"] == ["Lamp"]
        store.close()  # the server refuses every command without the password, so this read proves it was sent
    finally:
        server.stop()


def test_settings_build_feast_config_and_keep_the_password_off_disk(tmp_path):
    settings = FeatureStoreSettings(data_dir=tmp_path, online_store="redis",
                                    redis_connection_string="10.0.0.7:6380,db=2", redis_password="123")
    config = repo_config(settings)
    assert config.online_store.connection_string == '10.0.0.7:6380,db=2,password="123"'
    assert config.offline_store.type == "file"
    assert config.entity_key_serialization_version == 3
    written = yaml.safe_load(feature_store_yaml(settings))
    assert "123" not in feature_store_yaml(settings)
    assert written["online_store"]["connection_string"].endswith("password=${STREAMREC_FEATURE_STORE__REDIS_PASSWORD}")
    assert repo_config(FeatureStoreSettings(data_dir=tmp_path)).online_store.path == str(tmp_path / "online.db")
    with pytest.raises(ValidationError, match="cannot contain ','"):
        FeatureStoreSettings(redis_password="a,b")
    with pytest.raises(ValidationError, match="redis_password"):
        FeatureStoreSettings(redis_connection_string="h:1,password=x")
    assert "s3" not in repr(FeatureStoreSettings(redis_password="s3"))


def test_feature_store_yaml_loads_in_feast(tmp_path, monkeypatch):
    from feast.repo_config import load_repo_config

    settings = FeatureStoreSettings(data_dir=tmp_path, online_store="redis", redis_password="pw")
    open_store(tmp_path, "sqlite").close()  # apply writes feature_store.yaml
    (tmp_path / "feature_store.yaml").write_text(feature_store_yaml(settings))
    monkeypatch.setenv("STREAMREC_FEATURE_STORE__REDIS_PASSWORD", "pw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = load_repo_config(tmp_path, tmp_path / "feature_store.yaml")
    assert config.online_store.connection_string == "127.0.0.1:6379,password=pw"
