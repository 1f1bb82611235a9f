"""StreamRec's event contracts: one pydantic model per event type, one JSON codec.

Ids are non-empty strings, times are UTC event times in integer milliseconds since the epoch,
and every event carries ``type``, ``schema_version`` and a unique ``event_id`` so that any log
line is self-describing and downstream consumers can de-duplicate.

>>> click = Click(event_id="c-1", event_time="2026-01-01T00:00:00Z", user_id="u1", item_id="i9")
>>> click.event_time
1767225600000
>>> decode_event(encode_event(click)) == click
True
"""

from __future__ import annotations

import base64
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

SCHEMA_VERSION = 1


def to_epoch_ms(value: Any) -> Any:
    """Accept epoch milliseconds, a timezone-aware datetime, or an ISO-8601 string with offset."""
    if isinstance(value, bool):
        raise ValueError("event time must be epoch milliseconds or an ISO-8601 time, not a boolean")
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            value = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"event time {value!r} is not epoch milliseconds or ISO-8601") from exc
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("event time has no timezone; StreamRec times are UTC (add 'Z' or '+00:00')")
        try:
            return int(value.astimezone(timezone.utc).timestamp() * 1000)
        except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before the first representable UTC time
            raise ValueError(f"event time {value.isoformat()} is out of range") from None
    return value


EventTime = Annotated[
    int,
    BeforeValidator(to_epoch_ms),
    Field(ge=0, description="UTC event time, milliseconds since the Unix epoch"),
]
Id = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^\S(.*\S)?$")]
OptionalId = Annotated[Union[Id, None], Field(default=None)]
Scalar = Union[bool, int, float, str]


def _b64_or_none(value: Any) -> Any:
    if isinstance(value, str):
        return base64.b64decode(value, validate=True)
    return value


Base64Bytes = Annotated[
    Union[bytes, None],
    BeforeValidator(_b64_or_none),
    PlainSerializer(lambda b: None if b is None else base64.b64encode(b).decode("ascii"), return_type=Union[str, None]),
    WithJsonSchema({"anyOf": [{"type": "string", "contentEncoding": "base64"}, {"type": "null"}]}),
]


def new_event_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    """Fields every event shares."""

    # no NaN or infinity anywhere: JSON has no encoding for them, so such an event could be
    # produced but never decoded again (it would be dead-lettered downstream instead of refused here)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id = Field(default_factory=new_event_id)
    event_time: EventTime


class Impression(Event):
    """One item shown at one position of a served slate."""

    type: Literal["impression"] = "impression"
    request_id: Id
    user_id: Id
    item_id: Id
    position: int = Field(ge=0, description="0-based slot in the slate")
    slate_size: int = Field(ge=1, le=1000)
    propensity: float = Field(gt=0.0, le=1.0, description="probability the logging policy showed this item here")
    model_version: OptionalId
    policy_version: OptionalId
    context: dict[str, Scalar] = Field(default_factory=dict)
    features: dict[str, float] = Field(default_factory=dict, description="serving-time features used to score")

    @model_validator(mode="after")
    def _position_inside_slate(self) -> "Impression":
        if self.position >= self.slate_size:
            raise ValueError(f"position {self.position} is outside a slate of size {self.slate_size}")
        return self


class Click(Event):
    """A user engaged with an item; ``action`` keeps finer engagement kinds (cart, fav) of click logs."""

    type: Literal["click"] = "click"
    user_id: Id
    item_id: Id
    request_id: OptionalId
    action: Literal["click", "cart", "fav"] = "click"


class Purchase(Event):
    type: Literal["purchase"] = "purchase"
    user_id: Id
    item_id: Id
    request_id: OptionalId
    quantity: int = Field(default=1, ge=1)
    revenue: float = Field(default=0.0, ge=0.0)


class Item(Event):
    """A catalog entry, or a change to one (latest event_time wins)."""

    type: Literal["item"] = "item"
    item_id: Id
    title: str = Field(max_length=2000)
    description: str = Field(default="", max_length=20000)
    category: str = Field(default="", max_length=256)
    price: float | None = Field(default=None, ge=0.0)


class Example(Event):
    """An impression with its labels.

    In ``windowed`` label mode there is one example per impression, emitted when its attribution
    window closes (``emitted_on="window_close"``), with exact labels. In ``streaming`` mode each
    impression is emitted at once as a provisional negative (``emitted_on="impression"``, possibly a
    fake negative) and again as a positive copy when its click or purchase is joined
    (``emitted_on="click"`` / ``"purchase"``), so the learner can correct with fake-negative weighting.
    """

    type: Literal["example"] = "example"
    impression: Impression
    clicked: bool
    purchased: bool
    click_time: EventTime | None = None
    purchase_time: EventTime | None = None
    label_mode: Literal["windowed", "streaming"] = "windowed"
    emitted_on: Literal["window_close", "impression", "click", "purchase"] = "window_close"

    @model_validator(mode="after")
    def _labels_consistent(self) -> "Example":
        if self.clicked != (self.click_time is not None):
            raise ValueError("click_time must be set exactly when clicked is true")
        if self.purchased != (self.purchase_time is not None):
            raise ValueError("purchase_time must be set exactly when purchased is true")
        return self

    @property
    def user_id(self) -> str:
        return self.impression.user_id


class ModelUpdate(Event):
    """Announces a published model or policy version in the registry."""

    type: Literal["model_update"] = "model_update"
    kind: Literal["model", "policy"]
    version: Id
    artifact_uri: str = Field(min_length=1)
    manifest_digest: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the manifest JSON")
    metrics: dict[str, float] = Field(default_factory=dict)


class DeadLetter(Event):
    """A message that could not be decoded or validated, kept byte for byte with the reason."""

    type: Literal["dead_letter"] = "dead_letter"
    topic: str
    partition: int = Field(ge=-1)
    offset: int = Field(ge=-1)
    original_key: Base64Bytes = None
    original_value: Base64Bytes = None
    error: str


AnyEvent = Annotated[
    Union[Impression, Click, Purchase, Item, Example, ModelUpdate, DeadLetter],
    Field(discriminator="type"),
]
EVENT_TYPES: dict[str, type[Event]] = {
    "impression": Impression,
    "click": Click,
    "purchase": Purchase,
    "item": Item,
    "example": Example,
    "model_update": ModelUpdate,
    "dead_letter": DeadLetter,
}
_any_event = TypeAdapter(AnyEvent)


class DecodeError(ValueError):
    """A message is not a valid StreamRec event; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_event(event: Event) -> bytes:
    return event.__pydantic_serializer__.to_json(event)


def decode_event(data: bytes | str, expected: type[Event] | None = None) -> Event:
    """Decode one JSON-encoded event; with ``expected``, any other type is an error."""
    try:
        event = expected.model_validate_json(data) if expected is not None else _any_event.validate_json(data)
    except ValidationError as exc:
        raise DecodeError(_not_utf8(data) or describe_validation_error(exc)) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(f"not UTF-8 JSON: {exc}") from None
    return event


def _not_utf8(data: bytes | str) -> str | None:
    """Why ``data`` is not UTF-8 (checked only once decoding failed, so valid messages pay nothing)."""
    if isinstance(data, str):
        return None
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"<root>: Invalid JSON: not UTF-8 (byte 0x{bytes(data)[exc.start]:02x} at position {exc.start})"
    return None


def event_from_dict(data: dict[str, Any]) -> Event:
    try:
        return _any_event.validate_python(data)
    except ValidationError as exc:
        raise DecodeError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:5]]
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every event type, keyed by its ``type``."""
    return {name: model.model_json_schema() for name, model in EVENT_TYPES.items()}
