"""The serving API's Prometheus metrics, in a registry of their own (one per service, so tests and
replicas never share counters).

>>> metrics = ServingMetrics()
>>> metrics.set_version("model", "v000003")
>>> metrics.swaps.labels(kind="model").inc()
>>> text = metrics.render().decode()
>>> 'streamrec_serving_version_info{kind="model",version="v000003"} 1.0' in text
True
>>> 'streamrec_serving_swaps_total{kind="model"} 1.0' in text
True
"""

from __future__ import annotations

import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, values
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram

_VALUE_CLASS_LOCK = threading.Lock()


class _InMemoryValues:
    """Keeps a metric's values in this object, whatever mode prometheus_client is in.

    Importing Feast switches prometheus_client to multiprocess (mmap file) values for Feast's
    pre-forked feature server; in that mode every metric of the same name in a process shares
    one value, so two services in one process (tests, a replica restarted in place) would count
    into each other. Our registry is per service and scraped per process, so plain values are right.
    """

    def _metric_init(self) -> None:
        with _VALUE_CLASS_LOCK:
            saved, values.ValueClass = values.ValueClass, values.MutexValue
            try:
                super()._metric_init()  # type: ignore[misc]
            finally:
                values.ValueClass = saved


class Counter(_InMemoryValues, _Counter):
    pass


class Gauge(_InMemoryValues, _Gauge):
    pass


class Histogram(_InMemoryValues, _Histogram):
    pass


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.latency = Histogram("streamrec_serving_request_seconds", "Request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("streamrec_serving_requests", "Requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("streamrec_serving_errors", "Failed requests: client (4xx) or server (5xx)",
                              ["endpoint", "kind"], registry=r)
        self.inflight = Gauge("streamrec_serving_inflight", "/recommend requests being served or waiting for a thread",
                              registry=r)
        self.shed = Counter("streamrec_serving_shed", "/recommend requests refused with 503 because serving.max_inflight "
                            "requests were in hand", registry=r)
        self.cold_starts = Counter("streamrec_serving_cold_starts", "Slates served from popularity (no user history)",
                                   registry=r)
        self.version_info = Gauge("streamrec_serving_version_info", "The model and policy version being served (1)",
                                  ["kind", "version"], registry=r)
        self.swaps = Counter("streamrec_serving_swaps", "Versions swapped in", ["kind"], registry=r)
        self.refused = Counter("streamrec_serving_refused_versions", "Versions refused (corrupt or failing smoke test)",
                               ["kind"], registry=r)
        self.impressions_sent = Counter("streamrec_impressions_sent", "Impression events acknowledged by Kafka",
                                        registry=r)
        self.impressions_dropped = Counter("streamrec_impressions_dropped",
                                           "Impression events dropped because the buffer was full", registry=r)
        self.impression_send_failures = Counter("streamrec_impression_send_failures",
                                                "Impression sends that failed and were put back in the buffer",
                                                registry=r)
        self.impressions_buffered = Gauge("streamrec_impressions_buffered",
                                          "Impression events waiting for Kafka (buffered or in flight)", registry=r)
        self.kafka_connected = Gauge("streamrec_impressions_kafka_connected",
                                     "1 when the impression producer is connected", registry=r)
        self._versions: dict[str, str] = {}
        self._lock = threading.Lock()

    def set_version(self, kind: str, version: str) -> None:
        with self._lock:
            old = self._versions.get(kind)
            if old is not None and old != version:
                self.version_info.remove(kind, old)
            self._versions[kind] = version
            self.version_info.labels(kind=kind, version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
