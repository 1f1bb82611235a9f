"""Bad input everywhere (issue 8, item 3), fuzzed with hypothesis against the real code paths.

- event decoders: any bytes, any JSON, valid events with one field changed or their bytes damaged:
  a valid event or a ``DecodeError`` with a one-line reason, never another exception; every valid
  event round-trips exactly (``tests/test_events.py`` has the round trip of the logged types).
- the HTTP API (real tiny model and policy, real Feast SQLite store): any body, content type, k,
  user or item ids: a 200 with a valid slate or a 4xx that says what is wrong, never a 500, and
  the service is still ready and serving afterwards.
- the replay readers, in every layout (StreamRec JSONL, gzipped JSONL, Parquet, Open Bandit CSV,
  user-behaviour CSV): truncated at any byte, a non-UTF-8 byte, bad timestamps, wrong columns,
  empty files: a clear error naming the file and line (``LogFormatError``) or the bad row handed
  to ``on_reject``; every valid row before it (and, where the format allows, after it) survives.
- the artifact loader (registry, ``load_model``, ``load_policy``): truncated or flipped weights,
  wrong manifest or schema, file names pointing outside the artifact, a pickle disguised as
  safetensors: ``CorruptArtifact`` with the reason, no pickle code ever runs, and the swapper
  keeps serving the old version (``tests/test_serving_swap.py::
  test_versions_only_move_forward_and_bad_ones_are_refused`` covers the refusal path for
  checksum and digest mismatches; here the disguised pickle goes through it too).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import pickle
import re
import shutil
import tempfile
import warnings
import zlib
from datetime import timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from pydantic import ValidationError

from feature_store.store import StreamingFeatureStore
from learner.model import load_model
from learner.registry import MANIFEST, WEIGHTS, CorruptArtifact, ModelRegistry, load_artifact_dir
from policies.export import load_policy
from policies.synthetic_world import SyntheticWorld, WorldConfig
from serving.app import create_app
from serving.config import ServingSettings
from serving.hot_swap import Offer, VersionSwapper
from serving.service import RecommendationService
from serving.synthetic import build_synthetic_serving
from streaming.event_log import LogFormatError, read_events, write_jsonl, write_parquet
from streaming.events import (
    EVENT_TYPES, DecodeError, Event, Example, Impression, Item, ModelUpdate, Purchase, decode_event, encode_event,
)
from tests.test_events import events as logged_events, ids, impressions, times

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::ResourceWarning")

OBD = Path(__file__).resolve().parents[1] / "streaming" / "data" / "open_bandit"
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                  HealthCheck.data_too_large, HealthCheck.filter_too_much])

# -- strategies ----------------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=10)
# what people put in time fields: ISO with and without zones, out-of-range years, digits, junk
time_like = st.sampled_from([
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-01-01T00:00:00", "2026-01-01T00:00:00Z",
    "2026-13-01T00:00:00Z", "-1", "1e3", " 5 ", "", "NaN", "9" * 30, "yesterday", "1767225600000",
]) | st.datetimes(timezones=st.builds(timezone, st.timedeltas(min_value=-timedelta(hours=23),
                                                              max_value=timedelta(hours=23)))).map(lambda d: d.isoformat())
FIELD_NAMES = sorted({name for model in EVENT_TYPES.values() for name in model.model_fields})
event_like_objects = st.fixed_dictionaries(
    {"type": st.sampled_from([*EVENT_TYPES, "teleport"])},
    optional={name: json_values | time_like for name in FIELD_NAMES if name != "type"},
)


@st.composite
def examples(draw):
    impression = draw(impressions())
    clicked, purchased = draw(st.booleans()), draw(st.booleans())
    return Example(event_id=impression.event_id, event_time=draw(times), impression=impression, clicked=clicked,
                   purchased=purchased, click_time=draw(times) if clicked else None,
                   purchase_time=draw(times) if purchased else None,
                   label_mode=draw(st.sampled_from(["windowed", "streaming"])),
                   emitted_on=draw(st.sampled_from(["window_close", "impression", "click", "purchase"])))


model_updates = st.builds(
    ModelUpdate, event_time=times, kind=st.sampled_from(["model", "policy"]), version=ids,
    artifact_uri=st.text(min_size=1, max_size=40), manifest_digest=st.text("0123456789abcdef", min_size=64, max_size=64),
    metrics=st.dictionaries(ids, st.floats(allow_nan=False, allow_infinity=False), max_size=3))
any_event = logged_events | examples() | model_updates


def decodes_or_explains(data, expected=None) -> Event | None:
    """The decoder's whole promise: a valid event that round-trips, or a DecodeError with a one-line reason."""
    try:
        event = decode_event(data, expected)
    except DecodeError as exc:
        assert exc.reason and "\n" not in exc.reason and ":" in exc.reason, exc.reason
        return None
    assert isinstance(event, expected or Event)
    assert decode_event(encode_event(event)) == event  # what is accepted is a valid event
    return event


# -- event decoders -------------------------------------------------------------------------------------

@settings(max_examples=200, **FUZZ)
@given(st.binary(max_size=300), st.sampled_from([None, *EVENT_TYPES.values()]))
def test_any_bytes_decode_to_an_event_or_a_reason(data, expected):
    decodes_or_explains(data, expected)


@settings(max_examples=200, **FUZZ)
@given(json_values | event_like_objects)
def test_any_json_decodes_to_an_event_or_a_reason(value):
    text = json.dumps(value)
    decodes_or_explains(text.encode())
    decodes_or_explains(text)  # str input too, as the codec accepts it


@settings(max_examples=200, **FUZZ)
@given(any_event, st.data())
def test_a_valid_event_with_one_field_changed_is_decoded_or_refused_with_a_reason(event, data):
    document = json.loads(encode_event(event))
    target = document["impression"] if isinstance(event, Example) and data.draw(st.booleans()) else document
    key = data.draw(st.sampled_from(sorted(target) + ["unexpected_field"]))
    if data.draw(st.booleans()):
        target.pop(key, None)
    else:
        target[key] = data.draw(json_values | time_like)
    changed = json.dumps(document).encode()
    decodes_or_explains(changed)
    decodes_or_explains(changed, type(event))


@settings(max_examples=150, **FUZZ)
@given(any_event, st.data())
def test_a_valid_event_with_damaged_bytes_is_decoded_or_refused_with_a_reason(event, data):
    raw = bytearray(encode_event(event))
    how = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if how == "truncate":
        raw = raw[:at]
    elif how == "flip":
        raw[at] ^= data.draw(st.integers(1, 255))
    else:
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    decodes_or_explains(bytes(raw))


@settings(max_examples=100, **FUZZ)
@given(examples() | model_updates)
def test_examples_and_model_updates_round_trip_exactly(event):
    assert decode_event(encode_event(event)) == event
    assert decode_event(encode_event(event), type(event)) == event


def test_events_refuse_nan_and_infinity_at_construction_as_json_cannot_carry_them():
    # found by fuzzing: such an event used to encode to null and then fail to decode downstream
    base = dict(event_time=1, request_id="r", user_id="u", item_id="i", position=0, slate_size=1, propensity=1.0,
                model_version=None, policy_version=None)
    for bad in ({"features": {"x": math.nan}}, {"features": {"x": math.inf}}, {"context": {"c": -math.inf}}):
        with pytest.raises(ValidationError, match="finite"):
            Impression(**base, **bad)
    with pytest.raises(ValidationError, match="finite"):
        Purchase(event_time=1, user_id="u", item_id="i", revenue=math.inf)
    with pytest.raises(DecodeError):
        decode_event(b'{"type": "purchase", "event_time": 1, "user_id": "u", "item_id": "i", "revenue": NaN}')
    # a model's undefined metric (an AUC before any click) stays out of its announcement
    from learner.registry import PublishedArtifact

    artifact = PublishedArtifact("model", "v000001", Path("/r/model/v000001"), "a" * 64, {"auc": math.nan, "n": 3.0})
    update = ModelRegistry("/r").announcement(artifact)
    assert update.metrics == {"n": 3.0} and decode_event(encode_event(update)) == update


def test_event_times_out_of_range_are_a_reason_not_a_crash():
    # found by fuzzing: 0001-01-01 with a positive offset is before the first UTC datetime (OverflowError)
    for when in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        with pytest.raises(DecodeError, match="event_time: .*out of range"):
            decode_event(json.dumps({"type": "click", "event_time": when, "user_id": "u", "item_id": "i"}))


# -- the HTTP API -------------------------------------------------------------------------------------

MAX_K = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    world = SyntheticWorld(WorldConfig(seed=5, n_users=30, n_items=40))
    return build_synthetic_serving(tmp_path_factory.mktemp("fuzz-serving"), world, n_requests=150)


@pytest.fixture(scope="module")
def service(setup):
    service = RecommendationService(ServingSettings(candidates=10, seed=0, max_k=MAX_K, default_k=5,
                                                    max_request_candidates=50),
                                    registry=setup.registry, store=StreamingFeatureStore(setup.feature_store)).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as client:  # raises any exception the app lets escape
        yield client


def check_answer(response, what) -> dict:
    """A 200 with a valid slate, or a 4xx whose JSON body says what is wrong; never a 500."""
    assert response.status_code < 500, (what, response.status_code, response.text)
    body = response.json()
    if response.status_code == 200:
        items = body["items"]
        assert [i["position"] for i in items] == list(range(len(items)))
        assert len({i["item_id"] for i in items}) == len(items)
        assert all(0 < i["propensity"] <= 1 for i in items)
    else:
        assert 400 <= response.status_code < 500
        assert isinstance(body["error"], str) and body["error"], body
    return body


CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
                 "application/json; charset=no-such-codec", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=xyz", "application/xml", "*/*", "", "application/vnd.api+json"]


@settings(max_examples=120, **FUZZ)
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       content_type=st.sampled_from(CONTENT_TYPES))
def test_any_bytes_with_any_content_type_get_a_slate_or_a_4xx(client, body, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    check_answer(client.post("/recommend", content=body, headers=headers), (body, content_type))


BAD_IDS = st.sampled_from(["", " padded", "padded ", "a\nb", "x" * 257, 5, None, ["u1"], {"id": "u1"}, True])


def request_bodies(world_items):
    known = st.sampled_from(world_items)
    unknown = ids.map(lambda s: f"ghost-{s}")
    k = (st.none() | st.integers(-3, MAX_K + 3) | st.sampled_from([10**30, -(10**30), 2**63, 1000, 1001])
         | st.floats(allow_nan=False) | st.booleans() | st.text(max_size=4))
    item_ids = (st.none() | st.lists(known | unknown | BAD_IDS, max_size=8) | st.lists(known, min_size=1, max_size=8)
                | st.lists(known, min_size=51, max_size=60) | json_values)
    context = st.dictionaries(st.text(max_size=70), json_scalars | st.lists(st.integers(), max_size=2), max_size=5) \
        | json_values
    return st.fixed_dictionaries({"user_id": ids | BAD_IDS}, optional={
        "k": k, "item_ids": item_ids, "context": context, "request_id": st.none() | ids | BAD_IDS,
    })


def is_id(value) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= 256 and re.fullmatch(r"\S(.*\S)?", value) is not None


def servable(body: dict, catalog: set[str]) -> bool:
    """The API's contract, written out: whether this body must get a slate (else a 4xx)."""
    k, item_ids, context = body.get("k"), body.get("item_ids"), body.get("context", {})
    scalar = lambda v: type(v) in (bool, int, float) or (isinstance(v, str) and len(v) <= 256)  # noqa: E731
    return (is_id(body["user_id"])
            and (k is None or (type(k) is int and 1 <= k <= MAX_K))
            and (item_ids is None or (isinstance(item_ids, list) and 1 <= len(item_ids) <= 50
                                      and all(is_id(i) and i in catalog for i in item_ids)
                                      and len(set(item_ids)) == len(item_ids)))
            and isinstance(context, dict) and len(context) <= 32
            and all(1 <= len(key) <= 64 and scalar(value) for key, value in context.items())
            and (body.get("request_id") is None or is_id(body["request_id"])))


@settings(max_examples=150, **FUZZ)
@given(data=st.data())
def test_requests_with_wrong_types_huge_k_and_unknown_ids_get_a_slate_or_a_4xx(client, setup, data):
    body = data.draw(request_bodies(setup.world.item_ids))
    response = client.post("/recommend", json=body)
    answer = check_answer(response, body)
    expected = servable(body, set(setup.world.item_ids))
    assert (response.status_code == 200) == expected, (body, response.status_code, answer)
    if expected:
        candidates = len(body["item_ids"]) if body.get("item_ids") else 10
        assert len(answer["items"]) == min(body.get("k") or 5, candidates)
    else:
        assert response.status_code == 422


@settings(max_examples=60, **FUZZ)
@given(user=ids, k=st.integers(1, MAX_K))
def test_unknown_users_get_a_cold_start_slate(client, user, k):
    response = client.post("/recommend", json={"user_id": "new-" + user, "k": k})
    body = check_answer(response, user)
    assert response.status_code == 200, body
    assert body["cold_start"] is True and len(body["items"]) == min(k, 10)  # 10 candidates are retrieved


@settings(max_examples=40, **FUZZ)
@given(ghost=ids)
def test_an_unknown_item_id_is_a_422_naming_it(client, setup, ghost):
    ghost = f"ghost-{ghost}"
    response = client.post("/recommend", json={"user_id": "u0001", "item_ids": [setup.world.item_ids[0], ghost]})
    body = check_answer(response, ghost)
    assert response.status_code == 422 and ghost[:40] in body["error"]


def test_oversized_and_deeply_nested_bodies_are_4xx(client):
    cases = {
        "nested arrays": b"[" * 100_000 + b"]" * 100_000,
        "nested objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "2 MB user id": json.dumps({"user_id": "u" * 2_000_000}).encode(),
        "100k item ids": json.dumps({"user_id": "u1", "item_ids": [f"i{n}" for n in range(100_000)]}).encode(),
        "50k context keys": json.dumps({"user_id": "u1", "context": {f"k{n}": n for n in range(50_000)}}).encode(),
        "huge integer": b'{"user_id": "u1", "k": ' + b"9" * 5000 + b"}",
        "NaN k": b'{"user_id": "u1", "k": NaN}',
        "BOM": b'\xef\xbb\xbf{"user_id": "u1"}',
        "UTF-16": '{"user_id": "u1"}'.encode("utf-16"),
        "duplicate keys": b'{"user_id": "u1", "user_id": 5}',
    }
    for name, body in cases.items():
        response = client.post("/recommend", content=body, headers={"content-type": "application/json"})
        check_answer(response, name)
    for method in ("get", "put", "delete", "patch"):
        assert getattr(client, method)("/recommend").status_code == 405
    assert client.post("/recommend?k=5&user_id=u1").status_code == 422  # query parameters are not the body
    check_answer(client.get("/nowhere/../../etc/passwd"), "path")


def test_the_service_is_still_ready_and_never_answered_500(client, setup):
    """Run after the fuzzing above (file order): nothing it sent broke the service."""
    assert client.get("/readyz").status_code == 200
    response = client.post("/recommend", json={"user_id": "u0001", "k": 3})
    assert response.status_code == 200 and len(response.json()["items"]) == 3
    metrics = client.get("/metrics").text
    assert 'kind="server"' not in metrics, [line for line in metrics.splitlines() if 'kind="server"' in line]
    assert 'status="500"' not in metrics


# -- replay readers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[str, Path]:
    """One small log per supported layout, and the events each gives when intact."""
    root = tmp_path_factory.mktemp("logs")
    world = SyntheticWorld(WorldConfig(seed=9, n_users=20, n_items=15))
    events = world.item_events() + world.generate_log(40, log_seed=1)
    write_jsonl(root / "log.jsonl", events)
    (root / "log.jsonl.gz").write_bytes(gzip.compress((root / "log.jsonl").read_bytes()))
    write_parquet(root / "log.parquet", events)
    with gzip.open(OBD / "random" / "all" / "all.csv.gz", "rt") as f:
        obd_rows = f.read().splitlines()[:121]  # the header and 120 rows
    obd = root / "obd" / "random" / "all"
    obd.mkdir(parents=True)
    (obd / "all.csv").write_text("\n".join(obd_rows) + "\n")
    (obd / "all.csv.gz").write_bytes(gzip.compress((obd / "all.csv").read_bytes()))
    shutil.copy(OBD / "random" / "all" / "item_context.csv", obd / "item_context.csv")
    rows = [f"{u % 9},{100 + u % 13},{u % 4},{['pv', 'cart', 'fav', 'buy'][u % 4]},{1511658000 + 7 * u}" for u in range(150)]
    (root / "behaviour.csv").write_text("\n".join(rows) + "\n")
    (root / "behaviour.csv.gz").write_bytes(gzip.compress((root / "behaviour.csv").read_bytes()))
    return {"jsonl": root / "log.jsonl", "jsonl.gz": root / "log.jsonl.gz", "parquet": root / "log.parquet",
            "obd": obd / "all.csv", "obd.gz": obd / "all.csv.gz", "behaviour": root / "behaviour.csv",
            "behaviour.gz": root / "behaviour.csv.gz"}


LAYOUTS = ["jsonl", "jsonl.gz", "parquet", "obd", "obd.gz", "behaviour", "behaviour.gz"]
TEXT_LAYOUTS = ["jsonl", "obd", "behaviour"]  # a line is a row


def read_all(path: Path) -> tuple[list[Event], list]:
    rejected: list = []
    return list(read_events(path, on_reject=rejected.append)), rejected


def read_until_error(path: Path) -> tuple[list[Event], LogFormatError | None]:
    """With the default on_reject: the events yielded before the first bad row, and the error."""
    events: list[Event] = []
    try:
        for event in read_events(path):
            events.append(event)
    except LogFormatError as exc:
        return events, exc
    return events, None


def beside(original: Path, name: str, data: bytes) -> Path:
    """A damaged copy next to the original (an OBD log finds its item_context.csv beside it)."""
    path = original.parent / name
    path.write_bytes(data)
    return path


def damaged_name(original: Path, tag: str) -> str:
    suffix = "".join(original.suffixes)
    return f"{original.name[: -len(suffix)]}-{tag}{suffix}"


def row_events(events: list[Event]) -> list[Event]:
    """The events that come from a log's rows (catalog items of OBD/user-behaviour come from elsewhere)."""
    return [e for e in events if not (isinstance(e, Item) and e.event_id.startswith(("obd-item-", "ub-item-")))]


def complete_lines(data: bytes, gzipped: bool) -> int:
    """Lines (rows) that are entirely readable in a possibly truncated (gzipped) file."""
    if gzipped:
        decompressor = zlib.decompressobj(31)
        try:
            data = decompressor.decompress(data)
        except zlib.error:
            return 0
    return data.count(b"\n")


@settings(max_examples=25, **FUZZ)
@given(layout=st.sampled_from(LAYOUTS), fraction=st.floats(0, 1, exclude_max=True))
def test_a_truncated_log_keeps_every_row_before_the_cut_and_says_where_it_ends(logs, layout, fraction):
    original = logs[layout]
    data = original.read_bytes()
    cut = int(len(data) * fraction)
    path = beside(original, damaged_name(original, "cut"), data[:cut])
    if layout == "parquet":  # the footer is at the end: nothing is readable, and the error names the file
        with pytest.raises(LogFormatError, match=rf"{path.name} is not a readable Parquet file"):
            list(read_events(path))
        return
    full = row_events(read_all(original)[0])
    line = line_of(layout, full)
    complete = complete_lines(data[:cut], layout.endswith(".gz"))  # lines entirely before the cut
    try:
        events, rejected = read_all(path)
    except LogFormatError as exc:  # cut so early that not even the first line can be read
        assert str(exc).startswith(f"{path} cannot be read") and complete == 0
        return
    got = row_events(events)
    assert [e for e in got if line(e) <= complete] == [e for e in full if line(e) <= complete], \
        "every row before the cut is read, unchanged and in order"
    # the torn row after them may be rejected or, as CSV has no end marker, parse to other values
    assert all(line(e) <= complete + 1 for e in got)
    assert all(r.source == str(path) and r.line >= 1 and r.reason for r in rejected)
    if layout.endswith(".gz") and cut > 0:
        assert "ends early or is corrupt" in rejected[-1].reason
    events_strict, error = read_until_error(path)
    assert events_strict == events[:len(events_strict)]
    if error is not None:
        assert str(error).startswith(f"{path}:")


def line_of(layout: str, full: list[Event]):  # noqa: E302
    """Which line of the intact log an event came from (row ids carry it; JSONL: one event per line)."""
    if layout.startswith("obd"):
        return lambda e: int(e.request_id.split("-")[2]) + 2  # obd-<policy>-<index>: index 0 is line 2
    if layout.startswith("behaviour"):
        return lambda e: int(e.event_id.rsplit("-", 1)[1])  # ub-<hash>-<line>
    lines = {e.event_id: n for n, e in enumerate(full, start=1)}
    return lambda e: lines[e.event_id]


@settings(max_examples=30, **FUZZ)
@given(layout=st.sampled_from(TEXT_LAYOUTS + ["jsonl.gz", "obd.gz", "behaviour.gz"]), data=st.data())
def test_a_non_utf8_byte_spoils_its_own_row_only(logs, layout, data):
    original = logs[layout]
    text = original.read_bytes()
    if layout.endswith(".gz"):
        text = gzip.decompress(text)
    lines = text.split(b"\n")
    first = 1 if layout.startswith("obd") else 0  # keep the OBD header intact
    index = data.draw(st.integers(first, len(lines) - 2))
    at = data.draw(st.integers(0, len(lines[index])))
    bad = data.draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xfe\xff"]))
    lines[index] = lines[index][:at] + bad + lines[index][at:]
    damaged = b"\n".join(lines)
    path = beside(original, damaged_name(original, "utf8"), gzip.compress(damaged) if layout.endswith(".gz") else damaged)
    bad_line = index + 1

    full = row_events(read_all(original)[0])
    line = line_of(layout, full)
    events, rejected = read_all(path)
    assert [(r.source, r.line) for r in rejected] == [(str(path), bad_line)], rejected
    assert "UTF-8" in rejected[0].reason, rejected[0].reason
    assert row_events(events) == [e for e in full if line(e) != bad_line], "only the damaged row is missing"
    events_strict, error = read_until_error(path)
    assert error is not None and str(error).startswith(f"{path}:{bad_line}: ")
    assert row_events(events_strict) == [e for e in full if line(e) < bad_line], "every row before it was yielded"


BAD_TIMES = st.sampled_from(["yesterday", "", "-1", "9" * 30, "1e9", "nan", "inf", "2019-11-24 00:00:00",
                             "0001-01-01 00:00:00+01:00", "9999-12-31 23:59:59-01:00", "2019-02-30 00:00:00+00:00",
                             " ", "1511658000.5", "\x00"]) | st.text(max_size=12).filter(lambda v: not {"\n", "\r"} & set(v))
# (a line break inside a quoted CSV field makes two physical lines of one row: not this test's subject)


@settings(max_examples=40, **FUZZ)
@given(layout=st.sampled_from(["jsonl", "obd", "behaviour"]), value=BAD_TIMES, data=st.data())
def test_a_bad_timestamp_is_its_rows_problem_only(logs, layout, value, data):
    import csv

    original = logs[layout]
    lines = original.read_text().split("\n")
    first = 1 if layout == "obd" else 0
    index = data.draw(st.integers(first, len(lines) - 2))
    if layout == "jsonl":
        document = json.loads(lines[index])
        document["event_time"] = value
        lines[index] = json.dumps(document)
    else:
        row = next(csv.reader([lines[index]]))
        row[1 if layout == "obd" else 4] = value  # OBD: timestamp is the 2nd column; user-behaviour: the 5th
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow(row)
        lines[index] = buffer.getvalue()
    path = beside(original, damaged_name(original, "time"), "\n".join(lines).encode("utf-8", "surrogatepass"))
    bad_line = index + 1

    full = row_events(read_all(original)[0])
    line = line_of(layout, full)
    events, rejected = read_all(path)
    assert [(r.source, r.line) for r in rejected] in ([], [(str(path), bad_line)]), rejected
    assert all(r.reason for r in rejected)
    others = [e for e in row_events(events) if line(e) != bad_line]
    assert others == [e for e in full if line(e) != bad_line], "rows other than the bad one are untouched"
    if rejected:
        assert len(others) == len(row_events(events))
    else:  # the value was a valid time after all: the row is there, with that time
        assert len(row_events(events)) == len(full)


def _rewrite_parquet(original: Path, path: Path, change) -> Path:
    table = change(pq.read_table(original))
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("name, change, expect", [
    ("no type column", lambda t: t.drop_columns(["type"]), "every row rejected"),
    ("user_id renamed", lambda t: t.rename_columns(["user" if c == "user_id" else c for c in t.column_names]),
     "user rows rejected"),
    ("event_time as ISO text", lambda t: t.set_column(
        t.column_names.index("event_time"), "event_time",
        pa.array([f"{__import__('datetime').datetime.fromtimestamp(v / 1000, timezone.utc).isoformat()}"
                  for v in t.column("event_time").to_pylist()])), "all intact"),
    ("event_time as float", lambda t: t.set_column(
        t.column_names.index("event_time"), "event_time", pa.array([float(v) for v in t.column("event_time").to_pylist()])),
     "all intact"),
    ("event_time as garbage", lambda t: t.set_column(
        t.column_names.index("event_time"), "event_time", pa.array(["yesterday"] * t.num_rows)), "every row rejected"),
    ("context not JSON", lambda t: t.set_column(
        t.column_names.index("context"), "context",
        pa.array([None if v is None else "{not json" for v in t.column("context").to_pylist()])), "impressions rejected"),
    ("user_id not UTF-8", lambda t: t.set_column(
        t.column_names.index("user_id"), "user_id",
        pa.array([None if v is None else b"\xff" + v.encode() for v in t.column("user_id").to_pylist()], pa.binary())),
     "user rows rejected"),
    ("an unknown extra column", lambda t: t.append_column("surprise", pa.array(list(range(t.num_rows)))),
     "every row rejected"),
])
def test_parquet_logs_with_wrong_columns_reject_rows_and_name_them(logs, tmp_path, name, change, expect):
    path = _rewrite_parquet(logs["parquet"], tmp_path / "log.parquet", change)
    full = read_all(logs["parquet"])[0]
    events, rejected = read_all(path)
    assert all(r.source == str(path) and r.line >= 1 and r.reason for r in rejected)
    with_user = [e for e in full if hasattr(e, "user_id") and not isinstance(e, Example)]
    if expect == "all intact":
        assert events == full and not rejected
    elif expect == "every row rejected":
        assert events == [] and len(rejected) == len(full)
    elif expect == "user rows rejected":
        assert len(rejected) == len(with_user) and events == [e for e in full if e not in with_user]
    elif expect == "impressions rejected":
        assert {r.reason.split(":")[0] for r in rejected} == {"bad nested JSON"}
        assert events == [e for e in full if not isinstance(e, Impression)]
    events_strict, error = read_until_error(path)
    if rejected:
        assert error is not None and str(error).startswith(f"{path}:{rejected[0].line}: ")
        assert events_strict == events[:len(events_strict)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_and_header_only_logs_give_nothing_or_a_clear_error(logs, tmp_path, layout):
    original = logs[layout]
    empty = beside(original, damaged_name(original, "empty"), b"")
    try:
        events, rejected = read_all(empty)
    except LogFormatError as exc:
        assert layout == "parquet" and str(empty) in str(exc)
    else:
        assert events == [] and rejected == []
    if layout.startswith("obd"):
        header = original.read_bytes() if not layout.endswith(".gz") else gzip.decompress(original.read_bytes())
        header = header.split(b"\n")[0] + b"\n"
        only = beside(original, damaged_name(original, "header"), gzip.compress(header) if layout.endswith(".gz") else header)
        assert read_all(only) == ([], [])
    not_gzip = tmp_path / f"junk.{'jsonl.gz' if layout.startswith('jsonl') else 'csv.gz'}"
    not_gzip.write_bytes(b"this is not gzip")
    try:
        events, rejected = read_all(not_gzip)
    except LogFormatError as exc:
        assert str(not_gzip) in str(exc)
    else:
        assert events == [] and rejected and rejected[0].source == str(not_gzip) and "corrupt" in rejected[0].reason


def test_an_empty_item_context_beside_an_obd_log_is_not_a_crash(logs, tmp_path):
    folder = tmp_path / "bts" / "all"
    folder.mkdir(parents=True)
    shutil.copy(logs["obd"], folder / "all.csv")
    (folder / "item_context.csv").write_bytes(b"")
    events, rejected = read_all(folder / "all.csv")
    assert sum(isinstance(e, Impression) for e in events) == 120 and rejected == []


@settings(max_examples=40, **FUZZ)
@given(at=st.floats(0, 1, exclude_max=True))
def test_a_damaged_parquet_page_loses_no_row_before_it(logs, at):
    data = bytearray(logs["parquet"].read_bytes())
    position = int(len(data) * at)
    data[position] ^= 0xFF
    path = beside(logs["parquet"], "log-flip.parquet", bytes(data))
    full = read_all(logs["parquet"])[0]
    try:
        events, rejected = read_all(path)
    except LogFormatError as exc:  # the footer (schema, offsets) was hit
        assert str(path) in str(exc)
        return
    for r in rejected:
        assert r.source == str(path) and r.line >= 1 and r.reason
    # StreamRec writes page checksums: a damaged page is rejected, never read as other values
    original = {e.event_id: (n, e) for n, e in enumerate(full)}
    assert all(original[e.event_id][1] == e for e in events), "a damaged log yielded an altered event"
    order = [original[e.event_id][0] for e in events]
    assert order == sorted(order)


# -- the artifact loader -------------------------------------------------------------------------------

def copy_registry(setup, tmp: Path) -> ModelRegistry:
    shutil.copytree(setup.registry.root, tmp / "registry")
    return ModelRegistry(tmp / "registry")


def rewrite_manifest(directory: Path, change) -> None:
    """Change the manifest the way whoever damaged the artifact would, checksums made to match."""
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def recheck(directory: Path, name: str = WEIGHTS) -> None:
    digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    rewrite_manifest(directory, lambda m: m["files"].__setitem__(name, digest))


LOADERS = {"model": load_model, "policy": load_policy}


def load_or_refuse(registry: ModelRegistry, kind: str):
    """The loader's promise: a rebuilt model/policy, or CorruptArtifact; nothing else escapes."""
    try:
        return LOADERS[kind](registry.load(kind))
    except CorruptArtifact as exc:
        assert str(exc).strip()
        return exc


@settings(max_examples=20, **FUZZ)
@given(kind=st.sampled_from(["model", "policy"]), fraction=st.floats(0, 1, exclude_max=True), matching=st.booleans())
def test_truncated_weights_are_refused(setup, kind, fraction, matching):
    with tempfile.TemporaryDirectory() as tmp:
        registry = copy_registry(setup, Path(tmp))
        directory = registry.root / kind / registry.latest(kind)
        weights = directory / WEIGHTS
        data = weights.read_bytes()
        weights.write_bytes(data[: int(len(data) * fraction)])
        if matching:
            recheck(directory)
        outcome = load_or_refuse(registry, kind)
        assert isinstance(outcome, CorruptArtifact)
        assert ("not a valid safetensors" in str(outcome) or "cannot" in str(outcome)) if matching \
            else "checksum mismatch for weights.safetensors" in str(outcome)


@settings(max_examples=25, **FUZZ)
@given(kind=st.sampled_from(["model", "policy"]), file=st.sampled_from([WEIGHTS, MANIFEST, "catalog.json"]),
       data=st.data())
def test_flipped_bytes_are_refused_unless_the_manifest_vouches_for_them(setup, kind, file, data):
    assume(not (kind == "policy" and file == "catalog.json"))
    with tempfile.TemporaryDirectory() as tmp:
        registry = copy_registry(setup, Path(tmp))
        directory = registry.root / kind / registry.latest(kind)
        announced = hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
        raw = bytearray((directory / file).read_bytes())
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        (directory / file).write_bytes(bytes(raw))
        outcome = load_or_refuse(registry, kind)
        if file != MANIFEST:
            assert isinstance(outcome, CorruptArtifact) and f"checksum mismatch for {file}" in str(outcome)
        # what serving checks: the digest announced on model-updates; any change to the manifest fails it
        with pytest.raises(CorruptArtifact):
            load_artifact_dir(directory, expected_kind=kind, expected_digest=announced if file == MANIFEST else None) \
                if file == MANIFEST else LOADERS[kind](load_artifact_dir(directory, expected_kind=kind))
        if file == WEIGHTS and data.draw(st.booleans()):  # an attacker who rewrites the checksum too
            recheck(directory)
            load_or_refuse(registry, kind)  # a valid file with other values, or refused: never a crash
            with pytest.raises(CorruptArtifact, match="not the announced"):
                load_artifact_dir(directory, expected_kind=kind, expected_digest=announced)


manifest_keys = st.sampled_from(["format", "kind", "version", "parent", "schema", "files", "metrics", "created_at_ms"])
small_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(-10, 10) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=6)


@settings(max_examples=60, **FUZZ)
@given(kind=st.sampled_from(["model", "policy"]), data=st.data())
def test_a_wrong_manifest_or_schema_is_refused_never_a_crash(setup, kind, data):
    with tempfile.TemporaryDirectory() as tmp:
        registry = copy_registry(setup, Path(tmp))
        directory = registry.root / kind / registry.latest(kind)
        manifest = json.loads((directory / MANIFEST).read_text())
        where = data.draw(st.sampled_from(["manifest", "top", "schema", "schema-deep", "whole"]))
        if where == "whole":
            manifest = data.draw(small_json)
        elif where == "top":
            key = data.draw(manifest_keys)
            if data.draw(st.booleans()):
                manifest.pop(key, None)
            else:
                manifest[key] = data.draw(small_json)
        elif where.startswith("schema") and isinstance(manifest["schema"], dict):
            target = manifest["schema"]
            if where == "schema-deep":  # one level down: the model config, the encoder spec, exploration
                nested = [k for k, v in target.items() if isinstance(v, dict)]
                if nested:
                    target = target[data.draw(st.sampled_from(sorted(nested)))]
            key = data.draw(st.sampled_from(sorted(target) + ["surprise"]))
            if data.draw(st.booleans()):
                target.pop(key, None)
            else:
                target[key] = data.draw(small_json)
        (directory / MANIFEST).write_text(json.dumps(manifest))
        load_or_refuse(registry, kind)


@pytest.mark.parametrize("name", ["../../outside.json", "/etc/hostname", "sub/catalog.json", "..", ".hidden",
                                  "tokenizer.../../../x", "c:\\windows\\x", "nul\x00byte"])
def test_a_manifest_naming_a_file_outside_its_directory_is_refused(setup, tmp_path, name):
    registry = copy_registry(setup, tmp_path)
    directory = registry.root / "model" / registry.latest("model")
    outside = tmp_path / "outside.json"
    outside.write_text('{"secret": 1}')
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()  # the checksum would not stop it
    rewrite_manifest(directory, lambda m: m["files"].__setitem__(name, digest))
    with pytest.raises(CorruptArtifact, match="not a file inside the artifact's directory"):
        registry.load("model")
    with pytest.raises(CorruptArtifact, match="not a file inside"):
        load_artifact_dir(directory)


class _CreatesMarker:
    """What a malicious pickle carries: unpickling it calls ``open(path, "w")``, creating the marker."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("flavour", ["pickle", "torch.save zip"])
@pytest.mark.parametrize("kind", ["model", "policy"])
def test_a_pickle_disguised_as_safetensors_is_refused_and_never_runs(setup, tmp_path, kind, flavour):
    marker = tmp_path / "pickle-ran"
    if flavour == "pickle":
        payload = pickle.dumps({"w": torch.ones(2), "x": _CreatesMarker(str(marker))})
    else:  # what a PyTorch checkpoint (.pt) is: a zip around a pickle
        buffer = io.BytesIO()
        torch.save({"w": torch.ones(2), "x": _CreatesMarker(str(marker))}, buffer)
        payload = buffer.getvalue()
    registry = copy_registry(setup, tmp_path)
    good = registry.latest(kind)
    swapper = VersionSwapper(registry)
    swapper.load_latest_now()
    serving = swapper.current
    assert serving is not None and marker.exists() is False

    disguised = registry.root / kind / "v000002"  # published "as" the next version, checksums consistent
    shutil.copytree(registry.root / kind / good, disguised)
    (disguised / WEIGHTS).write_bytes(payload)
    recheck(disguised)
    rewrite_manifest(disguised, lambda m: m.__setitem__("version", "v000002"))
    digest = hashlib.sha256((disguised / MANIFEST).read_bytes()).hexdigest()

    with pytest.raises(CorruptArtifact, match="not a valid safetensors file"):
        registry.load(kind)
    with pytest.raises(CorruptArtifact, match="not a valid safetensors file"):
        load_artifact_dir(disguised, expected_kind=kind, expected_digest=digest)
    assert not swapper.apply(Offer(kind, "v000002", disguised, digest, source="model-updates"))
    assert "safetensors" in swapper.refused[(kind, "v000002")]
    assert swapper.current is serving and swapper.serving_version(kind) == good  # the old version serves on
    assert not marker.exists(), "loading the artifact ran pickle code"
    if flavour == "pickle":  # the payload is live: unpickling it (what StreamRec never does) creates the marker
        pickle.loads(payload)
        assert marker.exists()
