"""Impression logging that never slows or fails a request.

``ImpressionLogger.log`` only appends to a bounded in-memory buffer; one background thread sends
the buffer through the foundation's :class:`~streaming.kafka_io.EventProducer`. While Kafka is
unreachable (at start-up, or a broker that goes away) events wait in the buffer; past
``max_buffer`` (buffered plus in flight) the oldest waiting in the buffer are dropped and counted
(``streamrec_impressions_dropped``), because a serving process must not grow without bound while
it waits. A send the broker does not acknowledge goes back into the buffer and is retried on a
fresh producer once the broker answers again, so delivery is at-least-once: a retried event may
land twice, with the same ``event_id``, which downstream consumers de-duplicate by.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from streaming.config import KafkaSettings
from streaming.events import Impression
from streaming.kafka_io import DeliveryError, EventProducer

from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

# The producer waits at most this long for metadata in send() and for an acknowledgement, so an
# unreachable broker shows up as a failed send within seconds and the events go back to the buffer.
PRODUCER_OVERRIDES = {"max_block_ms": 2_000, "request_timeout_ms": 4_000, "delivery_timeout_ms": 10_000}
SEND_BATCH = 1_000


class ImpressionLogger:
    """Bounded, asynchronous impression sink in front of Kafka."""

    def __init__(self, kafka: KafkaSettings | Callable[[], KafkaSettings], *, max_buffer: int = 100_000,
                 retry_s: float = 1.0, metrics: ServingMetrics | None = None) -> None:
        # a callable lets a caller re-resolve where the cluster is on every reconnect
        self._kafka = kafka if callable(kafka) else (lambda: kafka)
        self.max_buffer = max_buffer
        self.retry_s = retry_s
        self.metrics = metrics or ServingMetrics()
        self._buffer: deque[Impression] = deque()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._producer: EventProducer | None = None
        self._broken = False  # a send failed: stop sending, let the producer drain, reconnect after a pause
        self._unreachable = False
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.sent = 0
        self.metrics.impressions_buffered.set_function(lambda: self.pending)
        self.metrics.kafka_connected.set(0)

    # -- the request path: never blocks on Kafka ------------------------------------------------
    def log(self, impressions: Iterable[Impression]) -> None:
        with self._cond:
            for impression in impressions:
                self._buffer.append(impression)
            self._enforce_bound()
            self._cond.notify()

    def _enforce_bound(self) -> None:  # holds self._cond
        excess = len(self._buffer) + self._in_flight - self.max_buffer
        while excess > 0 and self._buffer:
            self._buffer.popleft()  # the oldest go first: the newest are the most useful to the learner
            excess -= 1
            self.dropped += 1
            self.metrics.impressions_dropped.inc()

    @property
    def pending(self) -> int:
        """Events buffered or sent but not yet acknowledged."""
        return len(self._buffer) + self._in_flight

    # -- the background sender ------------------------------------------------------------------
    def start(self) -> "ImpressionLogger":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="impression-logger", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - the sender must outlive any one failure
                log.exception("impression logger step failed; retrying in %.1fs", self.retry_s)
                self._reset_producer()
                self._stop.wait(self.retry_s)

    def _step(self) -> None:
        with self._cond:
            while not self._buffer and not self._broken and not self._stop.is_set():
                self._cond.wait(0.5)
        if self._stop.is_set():
            return
        if self._broken:
            self._recover()
            return
        if self._producer is None:
            try:
                self._producer = EventProducer(self._kafka(), **PRODUCER_OVERRIDES)
            except Exception as exc:  # noqa: BLE001 - unreachable broker, bad address, auth failure
                # say it once per outage, not once per retry
                (log.debug if self._unreachable else log.warning)(
                    "impression logger cannot reach Kafka (%s); events wait in the buffer (%d now)", exc, self.pending)
                self._unreachable = True
                self._stop.wait(self.retry_s)
                return
            if self._unreachable:
                log.warning("impression logger reached Kafka again; sending %d buffered events", self.pending)
            self._unreachable = False
            self.metrics.kafka_connected.set(1)
        with self._cond:
            batch = [self._buffer.popleft() for _ in range(min(SEND_BATCH, len(self._buffer)))]
            self._in_flight += len(batch)
        for i, impression in enumerate(batch):
            try:
                future = self._producer.send(impression)
            except Exception as exc:  # noqa: BLE001 - send blocked past max_block_ms: no metadata, no broker
                log.warning("impression send failed (%s); %d events go back to the buffer", exc, len(batch) - i)
                self._requeue(batch[i:], failed=True)
                return
            future.add_callback(self._acked)
            future.add_errback(self._failed, impression)

    def _acked(self, _metadata) -> None:
        with self._cond:
            self._in_flight -= 1
            self.sent += 1
            self.metrics.impressions_sent.inc()
            self._cond.notify_all()

    def _failed(self, impression: Impression, exc: BaseException) -> None:
        # kafka-python calls an errback with its bound arguments first and the exception last
        self._requeue([impression], failed=True, exc=exc)

    def _requeue(self, impressions: list[Impression], failed: bool, exc: BaseException | None = None) -> None:
        with self._cond:
            self._in_flight -= len(impressions)
            self._buffer.extendleft(reversed(impressions))  # back at the front, in their order
            if failed:
                self.metrics.impression_send_failures.inc(len(impressions))
                if not self._broken and exc is not None:
                    log.warning("Kafka did not acknowledge an impression (%r); buffering until it answers", exc)
                self._broken = True
            self._enforce_bound()
            self._cond.notify_all()

    def _recover(self) -> None:
        """After a failed send: wait for the rest in flight to settle, drop the producer, pause, retry."""
        deadline = time.monotonic() + PRODUCER_OVERRIDES["delivery_timeout_ms"] / 1000 + 5
        with self._cond:
            while self._in_flight > 0 and time.monotonic() < deadline and not self._stop.is_set():
                self._cond.wait(0.5)
        self._reset_producer()
        self._stop.wait(self.retry_s)
        with self._cond:
            self._broken = False

    def _reset_producer(self) -> None:
        producer, self._producer = self._producer, None
        self.metrics.kafka_connected.set(0)
        if producer is not None:
            try:
                producer.close(timeout_s=0)
            except Exception:  # noqa: BLE001 - it is broken already; its unsent events were requeued by errback
                pass

    # -- waiting and shutdown -------------------------------------------------------------------
    def wait_until_sent(self, timeout_s: float) -> bool:
        """Block until nothing is buffered or in flight; False if that did not happen in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Try to deliver what is pending for up to ``timeout_s``, then stop; what is left is lost."""
        if self._thread is not None:
            self.wait_until_sent(timeout_s)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s + 1)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout_s=timeout_s)
            except (DeliveryError, Exception) as exc:  # noqa: BLE001
                log.warning("closing the impression producer: %s", exc)
        if self.pending:
            log.warning("%d impression events were not delivered before shutdown", self.pending)
