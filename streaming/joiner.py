"""The label joiner: impressions meet their clicks and purchases, in event time, as plain Python.

Attribution rules (``JoinerConfig`` holds the windows):

* A click belongs to the impression with the same ``request_id`` and item when it carries one,
  else to the user's latest impression of that item at or before the click. It counts when it
  falls in ``[impression time, impression time + click window]``; the earliest such click is the
  impression's click time.
* A purchase belongs, by ``request_id`` and item or else to the latest impression of that item
  whose click time is at or before the purchase, when it falls in
  ``[click time, click time + purchase window]``.
* Clicks and purchases that belong to no impression are organic: counted, not labels.

Everything runs on event time. Each partition keeps a watermark: the smallest, over the inputs
(impressions, clicks, purchases) that still have unread events, of the largest event time read,
less the allowed lateness. An input the caller reports as idle (nothing unread) does not hold
it back. An attribution is settled only when the watermark has passed the time after which no
event can change it, so for events that are not late the examples do not depend on the order in
which the three inputs interleave. An event older than the watermark is late: it is returned to
the caller for the dead-letter topic, never dropped silently.

The live path hands the joiner each event's offset and a ``committed(source, partition)`` lookup
of the consumer group's committed offsets. Join state and watermarks live in two changelogs, and
a crash can make the watermark's last write durable while a user's is not; a new process then
re-reads that user's events and would take them for late data. So a watermark written by another
process is trusted, per input, only where the event that set it lies before the committed offset
(everything before it is durable); an input whose newest event is still to be re-read starts
over from the events it re-reads.

Per-user state is JSON-ready data, so the live path keeps it in a Faust table keyed by user_id
(backed by a changelog topic) and the replay path in a dict; both run this same code.

With ``outbox=True`` (the live path) every example is also kept in the state record of the user
whose state change emitted it, until the caller's ``generation`` (its count of producer flushes)
says it is durable. A crash can make a state change durable while the example it emitted is not
(separate topics, no transaction); a joiner in a new process re-emits whatever the outbox holds,
so the example is sent again instead of lost (downstream de-duplicates by event_id).

>>> from streaming.events import Impression, Click
>>> joiner = LabelJoiner(JoinerConfig(click_window_ms=1000, purchase_window_ms=5000, allowed_lateness_ms=0))
>>> imp = Impression(event_id="i1", event_time=0, request_id="r1", user_id="u", item_id="x",
...                  position=0, slate_size=1, propensity=1.0, model_version=None, policy_version=None)
>>> _ = joiner.process(imp)
>>> _ = joiner.process(Click(event_id="c1", event_time=400, user_id="u", item_id="x", request_id="r1"))
>>> [(e.clicked, e.purchased, e.click_time) for e in joiner.flush()]
[(True, False, 400)]
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from streaming.events import Click, Event, Example, Impression, Purchase

SOURCES = ("impression", "click", "purchase")
NEVER = -(2**62)


class JoinerConfig(BaseModel):
    click_window_ms: int = Field(default=30 * 60_000, ge=0)
    purchase_window_ms: int = Field(default=24 * 3_600_000, ge=0)
    allowed_lateness_ms: int = Field(default=5 * 60_000, ge=0)
    label_mode: Literal["windowed", "streaming"] = "windowed"
    # one user's join state is one changelog record, and Kafka refuses records over ~1 MB: a user
    # (a crawler, a bot) whose open windows would pass this bound gets its new events dead-lettered.
    # A record can briefly hold up to about twice this (see ``state_bytes``), so keep it under half.
    max_user_state_bytes: int = Field(default=400_000, ge=10_000)


@dataclass
class JoinResult:
    examples: list[Example] = field(default_factory=list)
    late: list[tuple[Event, str]] = field(default_factory=list)  # (event, reason) for the dead-letter topic
    duplicates: int = 0


@dataclass
class JoinCounters:
    impressions: int = 0
    clicks: int = 0
    purchases: int = 0
    organic_clicks: int = 0
    organic_purchases: int = 0
    late: int = 0
    over_bound: int = 0  # dead-lettered: the user's join state was at ``max_user_state_bytes``
    duplicates: int = 0
    examples: int = 0


def _impression_bytes(body: dict) -> int:
    # as Faust's JSON codec writes it (the standard library's defaults: ", " and ": ", ASCII escapes),
    # plus the record's own fields around the body: its key, time, item, request, labels, copies
    ids = len(body["event_id"]) + len(body["item_id"]) + len(body.get("request_id") or "")
    return len(json.dumps(body)) + 2 * ids + 160


def _event_bytes(entry: list) -> int:
    """A pending click or purchase: [time, event_id, item_id, request_id]."""
    return 40 + len(entry[1]) + len(entry[2]) + len(entry[3] or "null")


def state_bytes(state: dict) -> int:
    """An estimate, on the large side, of a user's state as JSON, outbox left out, without encoding it.

    The outbox is left out so that the live path (which keeps one) and the in-process path (which
    does not) refuse the same events. It holds only examples just closed, each in place of the open
    impression it was, and only until the next flushes, so a record is at most about twice this.
    """
    impressions = sum(imp.get("n", 1000) for imp in state["impressions"].values())
    pending = sum(map(_event_bytes, state["clicks"])) + sum(map(_event_bytes, state["purchases"]))
    seen = sum(map(len, state["seen"])) + 22 * len(state["seen"])  # '"<event_id>": <time>, '
    return 200 + impressions + pending + seen


def new_user_state(partition: str) -> dict:
    return {"partition": partition, "impressions": {}, "clicks": [], "purchases": [], "seen": {}}


class LabelJoiner:
    """Joins events into examples; ``states`` and ``watermarks`` may be Faust tables or dicts."""

    def __init__(
        self,
        config: JoinerConfig | None = None,
        states: MutableMapping[str, dict] | None = None,
        watermarks: MutableMapping[str, dict] | None = None,
        outbox: bool = False,
        committed: Callable[[str, str], int | None] | None = None,
    ) -> None:
        self.config = config or JoinerConfig()
        self.states = states if states is not None else {}
        self.watermarks = watermarks if watermarks is not None else {}
        self.outbox = outbox
        self.committed = committed  # (source, partition) -> the group's next offset to read, if known
        self._restored: dict[str, dict[str, list]] = {}  # partition -> the trusted part of another process's record
        self.epoch = uuid.uuid4().hex  # this process: outbox entries of another one are re-emitted
        self.generation = 0  # the caller's count of completed producer flushes (see module doc)
        self.counters = JoinCounters()
        self._next_close: dict[str, int] = {}  # user -> earliest watermark at which something settles
        self._indexed = False  # whether every user in ``states`` is in ``_next_close``

    # -- watermarks -------------------------------------------------------------------------------
    def watermark(self, partition: str, idle: Iterable[str] = SOURCES) -> int:
        """The partition's watermark: no event older than this is still expected."""
        newest = self._newest(str(partition))
        idle = set(idle)
        holding = [newest[s][0] if s in newest else NEVER for s in SOURCES if s not in idle]
        if holding:
            low = min(holding)
        else:
            low = max((t for t, _ in newest.values()), default=NEVER)
        return low - self.config.allowed_lateness_ms if low > NEVER else NEVER

    def _newest(self, partition: str) -> dict[str, list]:
        """Per input, [the largest event time read, the offset of its event (None when unknown)]."""
        record = self.watermarks.get(partition) or {}
        newest = record.get("newest", {})
        if self.committed is None or record.get("by") == self.epoch:
            return newest
        if partition not in self._restored:  # another process wrote it: trust what is durable
            trusted = {}
            for source, (event_time, offset) in newest.items():
                committed = self.committed(source, partition)
                if offset is not None and committed is not None and offset < committed:
                    trusted[source] = [event_time, offset]
            self._restored[partition] = trusted
        return self._restored[partition]

    def _observe(self, partition: str, source: str, event_time: int, offset: int | None) -> None:
        newest = self._newest(partition)
        if event_time > newest.get(source, (NEVER, None))[0]:
            # reassign: Faust tables persist on __setitem__
            self.watermarks[partition] = {"newest": {**newest, source: [event_time, offset]}, "by": self.epoch}

    # -- events ---------------------------------------------------------------------------------
    def process(self, event: Event, partition: str | int = 0, idle: Iterable[str] = SOURCES,
                offset: int | None = None) -> JoinResult:
        """Take one impression, click or purchase (read at ``offset`` of its input's partition, when
        known); return the examples it settles and late events."""
        partition = str(partition)
        result = JoinResult()
        source = event.type  # type: ignore[attr-defined]
        if source not in SOURCES:
            raise ValueError(f"the joiner takes impressions, clicks and purchases, not {source}")
        idle = tuple(idle)
        user = event.user_id  # type: ignore[attr-defined]
        state = self.states.get(user) or new_user_state(partition)
        # a repeat first: a restarted worker re-reads what it processed since its last commit, and
        # the watermark those events moved is already in the changelog; they are not late data
        if event.event_id in state["seen"]:
            result.duplicates += 1
            self.counters.duplicates += 1
            # its state is durable, so its time is too: this rebuilds what a restart did not trust
            self._observe(partition, source, event.event_time, offset)
            return result
        mark = self.watermark(partition, idle)
        if event.event_time < mark:
            reason = (f"late {source}: event time {event.event_time} is {mark - event.event_time} ms behind the "
                      f"watermark {mark} (allowed lateness {self.config.allowed_lateness_ms} ms)")
            result.late.append((event, reason))
            self.counters.late += 1
            return result
        body = event.model_dump(mode="json") if isinstance(event, Impression) else None
        added = (_impression_bytes(body) if body is not None
                 else _event_bytes([0, event.event_id, event.item_id, event.request_id]))  # type: ignore[attr-defined]
        size = state_bytes(state) + 22 + len(event.event_id) + added
        if size > self.config.max_user_state_bytes:
            reason = (f"{source} of user {user}: the user's open join state would reach ~{size} bytes, over "
                      f"max_user_state_bytes={self.config.max_user_state_bytes} (one changelog record; Kafka "
                      f"refuses records over its max.message.bytes)")
            result.late.append((event, reason))
            self.counters.over_bound += 1
            return result
        state["seen"][event.event_id] = event.event_time
        if isinstance(event, Impression):
            self.counters.impressions += 1
            state["impressions"][event.event_id] = {
                "t": event.event_time, "item": event.item_id, "req": event.request_id,
                "click": None, "purchase": None, "copies": [], "body": body, "n": added,
            }
            if self.config.label_mode == "streaming":
                self._emit_copy(state["impressions"][event.event_id], "impression", result)
        elif isinstance(event, Click):
            self.counters.clicks += 1
            state["clicks"].append([event.event_time, event.event_id, event.item_id, event.request_id])
        elif isinstance(event, Purchase):
            self.counters.purchases += 1
            state["purchases"].append([event.event_time, event.event_id, event.item_id, event.request_id])
        if self.config.label_mode == "streaming":
            self._emit_settled_by_request(state, result)
        self._observe(partition, source, event.event_time, offset)
        self._settle(user, state, self.watermark(partition, idle), result, changed=True)
        return result

    def close_expired(self, partition: str | int | None = None, idle: Iterable[str] = SOURCES) -> list[Example]:
        """Settle every user whose windows the watermark has passed (call now and then, e.g. on a timer)."""
        result = JoinResult()
        idle = tuple(idle)
        marks: dict[str, int] = {}
        if not self._indexed:  # users restored from a changelog: known to the state, not to the index
            for user in self.states.keys():
                self._next_close.setdefault(user, NEVER)
            self._indexed = True
        for user, due in list(self._next_close.items()):
            state = self.states.get(user)
            if state is None:  # its partition moved to another worker
                self._next_close.pop(user, None)
                continue
            if partition is not None and state["partition"] != str(partition):
                continue
            mark = marks.setdefault(state["partition"], self.watermark(state["partition"], idle))
            if due <= mark:
                self._settle(user, state, mark, result, since=len(result.examples))
        return result.examples

    def reindex(self) -> None:
        """The state changed under the joiner (restored after a restart, partitions reassigned):
        the next :meth:`close_expired` looks at every user in it, not only those it has seen events for."""
        self._indexed = False
        self._restored.clear()  # the watermarks may have come back from another process's writes

    def flush(self) -> list[Example]:
        """End of stream: settle everything as if the watermark were infinitely far ahead."""
        result = JoinResult()
        for user in list(self.states.keys()):
            self._settle(user, self.states[user], 2**62, result, since=len(result.examples))
        return result.examples

    # -- settling -----------------------------------------------------------------------------------
    def _settle(self, user: str, state: dict, mark: int, result: JoinResult, since: int = 0,
                changed: bool = False) -> None:
        """Close what ``mark`` has passed; ``result.examples[since:]`` are this user's (for the outbox).

        The state is written back (a changelog record, in the live path) only when it ``changed``
        here or before: sweeps look at a user again and again while its outbox waits to be durable.
        """
        cfg = self.config
        impressions = state["impressions"]
        # clicks at or before the watermark: every impression that could own them has arrived
        state["clicks"].sort()
        while state["clicks"] and state["clicks"][0][0] < mark:
            changed = True
            t, _, item, req = state["clicks"].pop(0)
            owner = self._owner(impressions, item, req, t, lambda i: True)
            if owner is not None and owner["t"] <= t <= owner["t"] + cfg.click_window_ms:
                if owner["click"] is None or t < owner["click"]:
                    owner["click"] = t
                if cfg.label_mode == "streaming":
                    self._emit_copy(owner, "click", result)
            else:
                self.counters.organic_clicks += 1
        state["purchases"].sort()
        while state["purchases"] and state["purchases"][0][0] < mark:
            changed = True
            t, _, item, req = state["purchases"].pop(0)
            owner = self._owner(impressions, item, req, t, lambda i: i["click"] is not None and i["click"] <= t)
            if owner is not None and t <= owner["click"] + cfg.purchase_window_ms:
                if owner["purchase"] is None or t < owner["purchase"]:
                    owner["purchase"] = t
                if cfg.label_mode == "streaming":
                    self._emit_copy(owner, "purchase", result)
            else:
                self.counters.organic_purchases += 1
        for event_id, imp in sorted(impressions.items(), key=lambda kv: (kv[1]["t"], kv[0])):
            if imp["click"] is None and mark > imp["t"] + cfg.click_window_ms:
                self._close(imp, imp["t"] + cfg.click_window_ms, result)
                del impressions[event_id]
                changed = True
            elif imp["click"] is not None and mark > imp["click"] + cfg.purchase_window_ms:
                self._close(imp, imp["click"] + cfg.purchase_window_ms, result)
                del impressions[event_id]
                changed = True
        if len(state["seen"]) >= state.get("prune_at", 64):  # amortised: prune when the set has doubled
            horizon = mark - cfg.click_window_ms - cfg.purchase_window_ms - cfg.allowed_lateness_ms
            state["seen"] = {k: t for k, t in state["seen"].items() if t >= horizon}
            state["prune_at"] = max(64, 2 * len(state["seen"]))
            changed = True
        if self.outbox:
            changed = self._update_outbox(state, result, since) or changed
        if impressions or state["clicks"] or state["purchases"] or state["seen"] or state.get("outbox"):
            if changed:
                self.states[user] = state
            self._next_close[user] = self._due(state)
        else:
            self.states.pop(user, None)
            self._next_close.pop(user, None)

    def _update_outbox(self, state: dict, result: JoinResult, since: int) -> bool:
        """Keep this user's new examples with its state; re-emit an earlier process's; drop the durable.
        Return whether the outbox changed."""
        before = state.get("outbox", [])
        kept = []
        for epoch, generation, body in before:
            if epoch != self.epoch:  # written by a process that may have died before sending it
                result.examples.append(Example.model_validate(body))
                kept.append([self.epoch, self.generation, body])
            elif generation > self.generation - 2:  # a flush that began after it was sent has not ended
                kept.append([epoch, generation, body])
        held = {body["event_id"] for _, _, body in kept}
        kept += [[self.epoch, self.generation, e.model_dump(mode="json")] for e in result.examples[since:]
                 if e.event_id not in held]
        if kept:
            state["outbox"] = kept
        else:
            state.pop("outbox", None)
        return kept != before

    def _due(self, state: dict) -> int:
        cfg = self.config
        if state.get("outbox"):
            return NEVER  # look again at the next sweep: by then its examples may be durable
        times = [c[0] + 1 for c in state["clicks"]] + [p[0] + 1 for p in state["purchases"]]
        for imp in state["impressions"].values():
            end = imp["t"] + cfg.click_window_ms if imp["click"] is None else imp["click"] + cfg.purchase_window_ms
            times.append(end + 1)
        return min(times, default=NEVER)

    @staticmethod
    def _owner(impressions: dict, item: str, req: str | None, t: int, eligible) -> dict | None:
        """The impression a click or purchase belongs to: same request and item, else the latest before it."""
        best = None
        for event_id, imp in impressions.items():
            if imp["item"] != item or imp["t"] > t or not eligible(imp):
                continue
            if req is not None:
                if imp["req"] == req:
                    return imp
                continue
            if best is None or (imp["t"], event_id) > (best[0]["t"], best[1]):
                best = (imp, event_id)
        return best[0] if best else None

    def _emit_settled_by_request(self, state: dict, result: JoinResult) -> None:
        """Streaming mode: a click or purchase that names its request is joined at once."""
        cfg = self.config
        for t, _, item, req in state["clicks"]:
            if req is None:
                continue
            owner = self._owner(state["impressions"], item, req, t, lambda i: True)
            if owner is not None and owner["t"] <= t <= owner["t"] + cfg.click_window_ms:
                self._emit_copy(owner, "click", result, click_time=t)
        for t, _, item, req in state["purchases"]:
            if req is None:
                continue
            owner = self._owner(state["impressions"], item, req, t, lambda i: "click" in i["copies"])
            # only when no earlier click could move the purchase window: the purchase is within
            # purchase-window of the impression itself, and after the click we emitted
            if owner is not None and t <= owner["t"] + cfg.purchase_window_ms and owner["copy_click"] <= t:
                self._emit_copy(owner, "purchase", result, purchase_time=t)

    def _emit_copy(self, imp: dict, kind: str, result: JoinResult, click_time: int | None = None,
                   purchase_time: int | None = None) -> None:
        if kind in imp["copies"]:
            return
        impression = Impression.model_validate(imp["body"])
        click = click_time if click_time is not None else imp["click"]
        purchase = purchase_time if purchase_time is not None else imp["purchase"]
        if kind == "impression":
            example = Example(event_id=f"{impression.event_id}:impression", event_time=impression.event_time,
                              impression=impression, clicked=False, purchased=False,
                              label_mode="streaming", emitted_on="impression")
        elif kind == "click":
            imp["copy_click"] = click
            example = Example(event_id=f"{impression.event_id}:click", event_time=click, impression=impression,
                              clicked=True, purchased=False, click_time=click,
                              label_mode="streaming", emitted_on="click")
        else:
            click = imp.get("copy_click", click)
            example = Example(event_id=f"{impression.event_id}:purchase", event_time=purchase, impression=impression,
                              clicked=True, purchased=True, click_time=click, purchase_time=purchase,
                              label_mode="streaming", emitted_on="purchase")
        imp["copies"].append(kind)
        result.examples.append(example)
        self.counters.examples += 1

    def _close(self, imp: dict, closed_at: int, result: JoinResult) -> None:
        if self.config.label_mode == "streaming":
            return  # every label was already emitted as it was joined
        impression = Impression.model_validate(imp["body"])
        result.examples.append(Example(
            event_id=impression.event_id, event_time=closed_at, impression=impression,
            clicked=imp["click"] is not None, purchased=imp["purchase"] is not None,
            click_time=imp["click"], purchase_time=imp["purchase"],
        ))
        self.counters.examples += 1
