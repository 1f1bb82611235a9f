"""Stream processing in one process: the joiner and the aggregates over a replayed stream.

This is the embedded twin of the Faust worker (``streaming.stream_app``): the same
:class:`~streaming.joiner.LabelJoiner` and the same aggregate functions, with dicts where the
worker has Faust tables, so a replay gives the same examples and feature values as production.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from streaming.aggregates import DEFAULT_CONFIG, AggregateConfig, Aggregates
from streaming.events import Click, Event, Example, Impression, Item, Purchase
from streaming.features import FeatureUpdate
from streaming.joiner import JoinerConfig, LabelJoiner


@dataclass
class StepOutput:
    examples: list[Example] = field(default_factory=list)
    features: list[FeatureUpdate] = field(default_factory=list)
    late: list[tuple[Event, str]] = field(default_factory=list)


class StreamProcessor:
    def __init__(self, joiner: JoinerConfig | None = None, aggregates: AggregateConfig = DEFAULT_CONFIG,
                 sweep_every: int = 1000) -> None:
        self.joiner = LabelJoiner(joiner)
        self.aggregates = Aggregates(aggregates)
        self.sweep_every = sweep_every
        self._since_sweep = 0

    def process(self, event: Event) -> StepOutput:
        """One event in; the examples it settles, the features it changes, and whether it was late."""
        out = StepOutput()
        if isinstance(event, (Impression, Click, Purchase)):
            joined = self.joiner.process(event)
            out.examples, out.late = joined.examples, joined.late
            self._since_sweep += 1
            if self._since_sweep >= self.sweep_every:
                out.examples += self.sweep()
            if joined.late:
                return out  # a late event changes no feature either; repeats are the aggregates' to drop
        if isinstance(event, (Impression, Click, Purchase, Item)):
            out.features = self.aggregates.apply(event)
        return out

    def sweep(self) -> list[Example]:
        """Settle quiet users whose windows the watermark has passed (the worker does this on a timer)."""
        self._since_sweep = 0
        return self.joiner.close_expired()

    def finish(self) -> list[Example]:
        """End of the stream: close every open window."""
        return self.joiner.flush()

    def run(self, events: Iterable[Event], finish: bool = True) -> Iterator[StepOutput]:
        for event in events:
            yield self.process(event)
        yield StepOutput(examples=self.finish() if finish else self.sweep())
