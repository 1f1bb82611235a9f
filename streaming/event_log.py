"""Reading and writing logged events: StreamRec's own logs and two public log layouts.

Formats:
- ``jsonl``: one encoded event per line (the codec of :mod:`streaming.events`).
- ``parquet``: one row per event; nested fields (context, features, impression, metrics) are
  JSON text columns, so any event type fits one table.
- ``obd``: the Open Bandit Dataset's CSV (one impression per row with click, position and the
  logging policy's propensity; ``item_context.csv`` beside it gives the catalog).
- ``user-behavior``: ``user_id,item_id,category_id,behavior,timestamp`` rows, behavior in
  pv/cart/fav/buy, timestamp in epoch seconds (the Taobao UserBehavior layout).

Readers yield events in file order; a row that cannot become a valid event goes to ``on_reject``
(by default: raise :class:`LogFormatError` naming the file and line), so nothing valid is lost and
nothing invalid passes silently.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pydantic import ValidationError

from streaming.events import (
    Click, DecodeError, Event, Item, Impression, Purchase, decode_event, describe_validation_error, event_from_dict,
)

LogFormat = Literal["jsonl", "parquet", "obd", "user-behavior"]
_NESTED = ("context", "features", "impression", "metrics")


class LogFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Rejected:
    """A row of a log that is not a valid event."""

    source: str
    line: int
    raw: bytes
    reason: str


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return describe_validation_error(exc)
    return str(exc)


def _raise(rejected: Rejected) -> None:
    raise LogFormatError(f"{rejected.source}:{rejected.line}: {rejected.reason}")


OnReject = Callable[[Rejected], None]


def detect_format(path: Path) -> LogFormat:
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".csv", ".csv.gz")):
        header = _first_line(path).decode("utf-8", "replace").strip().lower()
        if "propensity_score" in header:
            return "obd"
        return "user-behavior"
    raise LogFormatError(f"cannot tell the format of {path}; pass --format jsonl|parquet|obd|user-behavior")


def read_events(path: str | Path, fmt: LogFormat | None = None, on_reject: OnReject = _raise) -> Iterator[Event]:
    path = Path(path)
    if not path.exists():
        raise LogFormatError(f"{path} does not exist")
    fmt = fmt or detect_format(path)
    readers = {"jsonl": read_jsonl, "parquet": read_parquet, "obd": read_open_bandit, "user-behavior": read_user_behavior}
    if fmt not in readers:
        raise LogFormatError(f"unknown log format {fmt!r}; use one of {', '.join(readers)}")
    return readers[fmt](path, on_reject=on_reject)


# -- StreamRec's own formats ------------------------------------------------------------------------

# what reading a truncated or corrupt (compressed) file raises; nothing after it is readable
_UNREADABLE = (EOFError, OSError, zlib.error)


def _first_line(path: Path, limit: int = 1 << 16) -> bytes:
    """The first line of a (gzipped) file, read in small steps so that a file truncated after it
    still shows it; a file that shows nothing is a LogFormatError."""
    data = b""
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            while b"\n" not in data and len(data) < limit:
                chunk = f.read1(4096)
                if not chunk:
                    break
                data += chunk
    except _UNREADABLE as exc:
        if not data:
            raise LogFormatError(f"{path} cannot be read: {exc}") from None
    return data.split(b"\n", 1)[0]


def _open_text(path: Path, errors: str = "strict"):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", newline="", encoding="utf-8", errors=errors)
    return open(path, newline="", encoding="utf-8", errors=errors)


def write_jsonl(path: str | Path, events: Iterable[Event]) -> int:
    n = 0
    with open(path, "wb") as f:
        for event in events:
            f.write(event.__pydantic_serializer__.to_json(event))
            f.write(b"\n")
            n += 1
    return n


def read_jsonl(path: Path, on_reject: OnReject = _raise) -> Iterator[Event]:
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
        line_no = 0
        while True:
            try:
                line = f.readline()
            except _UNREADABLE as exc:
                on_reject(Rejected(str(path), line_no + 1, b"", f"file ends early or is corrupt: {exc}"))
                return
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                yield decode_event(line)
            except DecodeError as exc:
                on_reject(Rejected(str(path), line_no, line.rstrip(b"\n"), exc.reason))


def write_parquet(path: str | Path, events: Iterable[Event]) -> int:
    rows = []
    for event in events:
        row = event.model_dump(mode="json")
        for name in _NESTED:
            if name in row:
                row[name] = json.dumps(row[name], separators=(",", ":"))
        rows.append(row)
    columns = sorted({k for row in rows for k in row})
    table = pa.Table.from_pylist(rows, schema=_parquet_schema(rows, columns)) if rows else pa.table({"type": pa.array([], pa.string())})
    pq.write_table(table, path, compression="zstd", write_page_checksum=True)  # a damaged page is detected, not misread
    return len(rows)


def _parquet_schema(rows: list[dict], columns: list[str]) -> pa.Schema:
    # ints and floats share columns across event types (price may be int in one row, float in another)
    fields = []
    for name in columns:
        values = [row[name] for row in rows if row.get(name) is not None]
        kinds = {type(v) for v in values}
        if kinds <= {bool}:
            kind = pa.bool_()
        elif kinds <= {int}:
            kind = pa.int64()
        elif kinds <= {int, float}:
            kind = pa.float64()
        else:
            kind = pa.string()
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def read_parquet(path: Path, on_reject: OnReject = _raise) -> Iterator[Event]:
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise LogFormatError(f"{path} is not a readable Parquet file: {exc}") from None
    row_no = 0
    batches = parquet.iter_batches(batch_size=10_000)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # a damaged page: the rows after it are lost
            on_reject(Rejected(str(path), row_no + 1, b"", f"file is corrupt from here on: {exc}"))
            return
        if batch is None:
            return
        for row in _batch_rows(batch):
            row_no += 1
            if isinstance(row, Exception):
                on_reject(Rejected(str(path), row_no, b"", f"unreadable row: {row}"))
                continue
            data = {k: v for k, v in row.items() if v is not None}
            try:
                for name in _NESTED:
                    if name in data:
                        data[name] = json.loads(data[name])
                yield event_from_dict(data)
            except (DecodeError, json.JSONDecodeError, TypeError, RecursionError) as exc:
                reason = exc.reason if isinstance(exc, DecodeError) else f"bad nested JSON: {exc}"
                on_reject(Rejected(str(path), row_no, json.dumps(row, default=str).encode(), reason))


def _batch_rows(batch: pa.RecordBatch) -> Iterator[dict | Exception]:
    """The batch's rows as dicts; if the batch does not convert (e.g. a string that is not UTF-8),
    row by row, with the exception in place of each row that does not."""
    try:
        rows = batch.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException):
        rows = None
    if rows is not None:
        yield from rows
        return
    for i in range(batch.num_rows):
        try:
            yield batch.slice(i, 1).to_pylist()[0]
        except (UnicodeDecodeError, pa.ArrowException) as exc:
            yield exc


# -- Open Bandit Dataset ------------------------------------------------------------------------------

def _stable_id(*parts: str, size: int = 16) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:size]


def read_open_bandit(path: Path, on_reject: OnReject = _raise, policy: str | None = None) -> Iterator[Event]:
    """Impressions (and clicks) from an Open Bandit Dataset ``all.csv``, items from ``item_context.csv``.

    OBD has no user ids: the four hashed user features identify a user. Positions are 1-based in
    the file and 0-based here. The logging policy's name comes from the folder (``random``/``bts``).
    """
    policy = policy or (path.parent.parent.name if path.parent.name == "all" else path.parent.name) or "obd"
    rows = _read_csv_rows(path, on_reject)
    header = next(rows, None)
    if header is None:
        return
    _, columns = header
    required = {"timestamp", "item_id", "position", "click", "propensity_score"}
    if not required <= set(columns):
        raise LogFormatError(f"{path} is not an Open Bandit log: missing columns {sorted(required - set(columns))}")
    col = {name: i for i, name in enumerate(columns)}
    user_cols = [i for name, i in col.items() if name.startswith("user_feature_")]
    affinity_cols = [(name.rsplit("_", 1)[1], i) for name, i in col.items() if name.startswith("user-item_affinity_")]
    slate_size = 3
    first = True
    for line_no, row in rows:
        try:
            if len(row) != len(columns):
                raise ValueError(f"expected {len(columns)} columns, got {len(row)}")
            when = datetime.fromisoformat(row[col["timestamp"]])
            if when.tzinfo is None:
                raise ValueError(f"timestamp {row[col['timestamp']]!r} has no timezone")
            time_ms = int(when.timestamp() * 1000)
            position = int(row[col["position"]]) - 1
            clicked = row[col["click"]].strip() == "1"
            index = row[0] if columns[0] in ("", "index") else str(line_no)
            request_id = f"obd-{policy}-{index}"
            user_id = "obd-" + _stable_id(*(row[i] for i in user_cols))
            impression = Impression(
                event_id=f"{request_id}-imp",
                event_time=time_ms,
                request_id=request_id,
                user_id=user_id,
                item_id=str(int(row[col["item_id"]])),
                position=position,
                slate_size=slate_size,
                propensity=float(row[col["propensity_score"]]),
                model_version=None,
                policy_version=f"obd-{policy}",
                context={f"user_feature_{k}": row[i] for k, i in enumerate(user_cols)},
                features={f"affinity_{k}": float(row[i]) for k, i in affinity_cols},
            )
        except (ValueError, DecodeError) as exc:
            on_reject(Rejected(str(path), line_no, ",".join(row).encode(), _reason(exc)))
            continue
        if first:
            yield from _open_bandit_items(path.parent / "item_context.csv", time_ms - 1, on_reject)
            first = False
        yield impression
        if clicked:
            yield Click(event_id=f"{request_id}-click", event_time=time_ms + 1, user_id=user_id,
                        item_id=impression.item_id, request_id=request_id)


def _open_bandit_items(path: Path, time_ms: int, on_reject: OnReject) -> Iterator[Item]:
    if not path.exists():
        return
    rows = _read_csv_rows(path, on_reject)
    header = next(rows, None)
    if header is None:
        return
    _, columns = header
    for line_no, row in rows:
        try:
            item = dict(zip(columns, row))
            item_id = str(int(item["item_id"]))
            features = [item[c] for c in columns if c.startswith("item_feature_")]
            yield Item(
                event_id=f"obd-item-{item_id}",
                event_time=time_ms,
                item_id=item_id,
                title=f"Open Bandit item {item_id}",
                description=" ".join(features),
                category=features[1] if len(features) > 1 else "",
            )
        except (ValueError, KeyError, DecodeError) as exc:
            on_reject(Rejected(str(path), line_no, ",".join(row).encode(), _reason(exc)))


def _read_csv_rows(path: Path, on_reject: OnReject) -> Iterator[tuple[int, list[str]]]:
    # surrogateescape: a byte that is not UTF-8 spoils its own row only (strict decoding would
    # fail the whole block being decoded, taking the valid rows around it down too)
    with _open_text(path, errors="surrogateescape") as f:
        reader = csv.reader(f)
        line_no = 0
        while True:
            line_no += 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                on_reject(Rejected(str(path), line_no, b"", f"unreadable CSV: {exc}"))
                continue
            except _UNREADABLE as exc:  # truncated or corrupt compressed file: nothing after is readable
                on_reject(Rejected(str(path), line_no, b"", f"file ends early or is corrupt: {exc}"))
                return
            try:
                "".join(row).encode("utf-8")
            except UnicodeEncodeError as exc:  # an escaped non-UTF-8 byte
                raw = ",".join(row).encode("utf-8", "surrogateescape")
                byte = exc.object[exc.start].encode("utf-8", "surrogateescape")
                on_reject(Rejected(str(path), line_no, raw, f"not UTF-8: the row holds byte 0x{byte.hex()}"))
                continue
            yield line_no, row


# -- user behaviour logs (Taobao layout) ------------------------------------------------------------

_BEHAVIOURS = {"pv": "click", "cart": "cart", "fav": "fav", "buy": "buy"}


def read_user_behavior(path: Path, on_reject: OnReject = _raise) -> Iterator[Event]:
    """pv/cart/fav become clicks (``action`` keeps which), buy becomes a purchase.

    These logs have no impressions, so their clicks and purchases are organic. The first time an
    item appears, an :class:`Item` with its category is emitted so the catalog knows it.
    """
    seen_items: set[str] = set()
    for line_no, row in _read_csv_rows(path, on_reject):
        if line_no == 1 and row and row[0].strip().lower() == "user_id":
            continue
        try:
            if len(row) != 5:
                raise ValueError(f"expected 5 columns user_id,item_id,category_id,behavior,timestamp, got {len(row)}")
            user_id, item_id, category_id, behavior, timestamp = (v.strip() for v in row)
            if behavior not in _BEHAVIOURS:
                raise ValueError(f"behavior {behavior!r} is not one of pv, cart, fav, buy")
            time_ms = int(timestamp) * 1000
            event_id = f"ub-{_stable_id(user_id, item_id, behavior, timestamp)}-{line_no}"
            event: Event
            if behavior == "buy":
                event = Purchase(event_id=event_id, event_time=time_ms, user_id=user_id, item_id=item_id)
            else:
                event = Click(event_id=event_id, event_time=time_ms, user_id=user_id, item_id=item_id,
                              action=_BEHAVIOURS[behavior])
            new_item = None
            if item_id not in seen_items:
                new_item = Item(event_id=f"ub-item-{item_id}", event_time=time_ms, item_id=item_id,
                                title="", category=category_id)
        except (ValueError, DecodeError) as exc:
            on_reject(Rejected(str(path), line_no, ",".join(row).encode(), _reason(exc)))
            continue
        if new_item is not None:
            seen_items.add(item_id)
            yield new_item
        yield event
