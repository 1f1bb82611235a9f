"""The recommendation service: one request from user id to logged slate.

``RecommendationService.recommend`` is the whole request path, independent of HTTP (FastAPI
under uvicorn and Ray Serve replicas both call it):

1. read the serving bundle once (model, policy, retrieval index; see :mod:`serving.hot_swap`);
2. candidates: the request's ``item_ids``, else the catalog items nearest to the user's history
   embedding, else (no history: cold start) the most popular items, context's category first;
3. one Feast online read for the user and the candidates (:mod:`serving.online_features`);
4. the model scores pCTR, pCVR and pCTCVR; the policy samples the slate with its exploration and
   gives each shown item's propensity;
5. the slate's impressions, with those propensities, the versions and the serving-time
   features, go to the impression logger (asynchronous, never blocking the response).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from learner.registry import ModelRegistry
from streaming.events import Id, Impression, Item

from serving.config import ServingSettings
from serving.hot_swap import ModelUpdateListener, RegistryPoller, ServingBundle, VersionSwapper
from serving.impressions import ImpressionLogger
from serving.metrics import ServingMetrics
from serving.online_features import OnlineFeatureReader, RequestFeatures, request_features
from serving.retrieval import popular_items

log = logging.getLogger(__name__)

MAX_REQUEST_ITEMS = 10_000  # hard ceiling of the request schema; the configured limit is usually lower
ContextValue = Union[StrictBool, StrictInt, Annotated[StrictFloat, Field(allow_inf_nan=False)],
                     Annotated[str, Field(max_length=256)]]
ContextKey = Annotated[str, Field(min_length=1, max_length=64)]


class RecommendRequest(BaseModel):
    """``POST /recommend``: who asks, how many items, optionally which candidates and the context."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id
    k: StrictInt | None = Field(default=None, ge=1, le=1000, description="slate size (default: the service's default_k)")
    item_ids: list[Id] | None = Field(default=None, min_length=1, max_length=MAX_REQUEST_ITEMS,
                                      description="candidates to choose from; default: retrieved from the catalog")
    context: dict[ContextKey, ContextValue] = Field(default_factory=dict, max_length=32,
                                                    description="e.g. device, page, category; logged with each impression")
    request_id: Id | None = Field(default=None, description="your id for this request; it also seeds exploration, "
                                  "so a retried request gets the same slate")


class RecommendedItem(BaseModel):
    item_id: str
    position: int
    propensity: float = Field(description="P(the policy put this item at this position | the items above it)")
    pctr: float
    pcvr: float
    pctcvr: float


class RecommendResponse(BaseModel):
    request_id: str
    user_id: str
    model_version: str
    policy_version: str
    items: list[RecommendedItem]
    candidate_source: Literal["request", "retrieval", "popularity"]
    candidates: int
    cold_start: bool = Field(description="the user has no click history: candidates came from popularity and context")


@dataclass(slots=True)
class CandidateImpression:
    """A candidate as the model's ``predict`` reads it: an :class:`Impression` at slot 0, before any is shown.

    Built per candidate per request (hundreds per request), so it is a plain slotted object with
    the impression's fields rather than a validated pydantic model, which costs ~30x more to make.
    """

    request_id: str
    event_time: int
    user_id: str
    item_id: str
    model_version: str | None
    policy_version: str | None
    context: dict
    features: dict[str, float]
    position: int = 0
    slate_size: int = 1
    propensity: float = 1.0
    event_id: str = ""


class ClientError(Exception):
    """A request the service cannot serve as asked: a 4xx with a message the caller can act on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class NotReady(Exception):
    """No model or no policy is loaded yet (503)."""


def _seed(request_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest(), "little")


def _short_list(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


class PopularityTable:
    """Item popularity (from Feast, re-read in the background) and categories (from the model's catalog).

    Cold-start slates need a ranking of the whole catalog; reading every item's features per
    request would not scale, so the ranking is computed when the table is refreshed (every
    ``refresh_s``, and soon after a new model version brings a new catalog), and a request only
    slices it. A refresh reads the whole catalog's ``item_stats`` from Feast (~0.2 ms per item
    through Feast's Python path), so large catalogs want a longer ``refresh_s``.
    """

    def __init__(self, reader: OnlineFeatureReader | None, refresh_s: float, chunk: int = 100) -> None:
        self.reader, self.refresh_s, self.chunk = reader, refresh_s, chunk
        self._catalog: tuple[str, ...] = ()
        self._categories: dict[str, str] = {}
        self._popularity: dict[str, float] = {}
        self._ranked: list[str] = []
        self._ranked_by_category: dict[str, list[str]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="popularity-refresh", daemon=True)

    def set_catalog(self, item_ids: list[str], categories: dict[str, str]) -> None:
        if tuple(item_ids) != self._catalog or categories != self._categories:
            self._catalog, self._categories = tuple(item_ids), dict(categories)
            # until the next read, keep what is known and rank new items last
            self._rank({item: self._popularity.get(item, 0.0) for item in item_ids})
            self._wake.set()

    def _rank(self, popularity: dict[str, float]) -> None:
        ranked = popular_items(popularity, len(popularity))
        by_category: dict[str, list[str]] = {}
        for item in ranked:
            category = self._categories.get(item)
            if category:
                by_category.setdefault(category, []).append(item)
        # one assignment each: a request reads either the old or the new ranking, never a mix
        self._popularity, self._ranked, self._ranked_by_category = popularity, ranked, by_category

    def refresh(self) -> None:
        catalog = self._catalog
        if self.reader is None or not catalog:
            return
        popularity: dict[str, float] = {}
        for start in range(0, len(catalog), self.chunk):
            ids = list(catalog[start:start + self.chunk])
            scores = self.reader.item_stats(ids, views=("item_stats",)).get("item_popularity_24h") or [None] * len(ids)
            for item, score in zip(ids, scores):
                popularity[item] = float(score) if score is not None else 0.0
        self._rank(popularity)

    def top(self, n: int, category: str | None) -> list[str]:
        """The ``n`` most popular items, those of ``category`` first (see :func:`popular_items`)."""
        ranked, in_category = self._ranked, self._ranked_by_category.get(category or "", [])
        if not in_category:
            return ranked[:n]
        chosen = in_category[:n]
        if len(chosen) < n:
            taken = set(chosen)
            chosen += [item for item in ranked if item not in taken][: n - len(chosen)]
        return chosen

    def start(self) -> "PopularityTable":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.refresh_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - stale popularity is better than none
                log.exception("refreshing item popularity from Feast failed")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class RecommendationService:
    """Recommendations from the serving bundle, Feast and the policy; impressions to Kafka."""

    def __init__(self, settings: ServingSettings, *, registry: ModelRegistry, store=None, kafka=None,
                 metrics: ServingMetrics | None = None, load_model: Callable | None = None,
                 load_policy: Callable | None = None, impression_sink=None) -> None:
        """``impression_sink``: anything with ``log(impressions)`` that takes the impressions instead of
        Kafka (an in-process loop or simulator); without one they go to Kafka when ``kafka`` is given."""
        self.settings = settings
        self.metrics = metrics or ServingMetrics()
        self.registry = registry
        self.store = store
        self.kafka = kafka
        self.reader = OnlineFeatureReader(store, settings.item_feature_ttl_s) if store is not None else None
        self.popularity = PopularityTable(self.reader, settings.popularity_refresh_s)
        self.swapper = VersionSwapper(registry, load_model=load_model, load_policy=load_policy, metrics=self.metrics,
                                      on_swap=self._on_swap)
        self.impressions = impression_sink or (ImpressionLogger(kafka, max_buffer=settings.impression_buffer,
                                                                retry_s=settings.impression_retry_s,
                                                                metrics=self.metrics)
                                               if kafka is not None and settings.log_impressions else None)
        self.listener = (ModelUpdateListener(kafka, self.swapper)
                         if kafka is not None and settings.listen_for_updates else None)
        self.poller = RegistryPoller(self.swapper, settings.registry_poll_s)
        self._rng = np.random.default_rng(settings.seed)
        self._rng_lock = threading.Lock()
        self._started = False

    @classmethod
    def from_settings(cls, settings) -> "RecommendationService":
        """Build from the whole settings tree (``streamrec.settings.Settings``): Feast, registry, Kafka."""
        from feature_store.store import StreamingFeatureStore

        store = StreamingFeatureStore(settings.feature_store)
        if not settings.feature_store.registry_path.exists():
            store.apply()  # a fresh data directory; otherwise the stream worker owns the definitions
        registry = ModelRegistry(settings.serving.registry_dir or settings.data_dir / "registry")
        return cls(settings.serving, registry=registry, store=store, kafka=settings.kafka)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self, listener_wait_s: float = 10.0) -> "RecommendationService":
        if self._started:
            return self
        self._started = True
        import torch

        torch.set_num_threads(self.settings.torch_threads)
        if isinstance(self.impressions, ImpressionLogger):
            self.impressions.start()
        if self.listener is not None:
            self.listener.start(wait_s=listener_wait_s)  # at the topic's end before the registry is read
        self.swapper.load_latest_now()
        self.refresh_popularity()
        self.swapper.start()
        self.poller.start()
        self.popularity.start()
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.listener is not None:
            self.listener.stop()
        self.poller.stop()
        self.swapper.stop()
        self.popularity.stop()
        if isinstance(self.impressions, ImpressionLogger):
            self.impressions.close()
        if self.reader is not None:
            self.reader.close()
        if self.store is not None:
            self.store.close()

    def _on_swap(self, bundle: ServingBundle) -> None:
        self.popularity.set_catalog(bundle.index.item_ids, bundle.model_part.categories)

    def refresh_popularity(self) -> None:
        """Re-read item popularity from Feast now (it is refreshed in the background once started)."""
        try:
            self.popularity.refresh()
        except Exception:  # noqa: BLE001 - a cold-start slate falls back to catalog order
            log.exception("reading item popularity from Feast failed")

    # -- status ---------------------------------------------------------------------------------
    def readiness(self) -> dict[str, Any]:
        bundle = self.swapper.current
        reasons = []
        if self.swapper.serving_version("model") is None:
            reasons.append(f"no model loaded (none valid in the registry at {self.registry.root} yet)")
        if self.swapper.serving_version("policy") is None:
            reasons.append(f"no policy loaded (none valid in the registry at {self.registry.root} yet)")
        return {"ready": bundle is not None, "model_version": bundle.model_version if bundle else None,
                "policy_version": bundle.policy_version if bundle else None, "reasons": reasons}

    def versions(self) -> dict[str, Any]:
        bundle = self.swapper.current
        impressions = None
        if isinstance(self.impressions, ImpressionLogger):
            impressions = {"pending": self.impressions.pending, "sent": self.impressions.sent,
                           "dropped": self.impressions.dropped}
        return {
            "model_version": self.swapper.serving_version("model"),
            "policy_version": self.swapper.serving_version("policy"),
            "serving_since": bundle.loaded_at if bundle else None,
            "catalog_items": len(bundle.index) if bundle else 0,
            "refused": [{"kind": k, "version": v, "reason": r} for (k, v), r in self.swapper.refused.items()],
            "swaps": [{"time": t, "kind": k, "version": v} for t, k, v in self.swapper.history[-50:]],
            "listening_for_updates": bool(self.listener and self.listener.listening),
            "process_id": os.getpid(),  # which replica answered
            "impressions": impressions,
        }

    # -- the request path -----------------------------------------------------------------------
    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        bundle = self.swapper.current  # this request's versions, whatever is swapped in meanwhile
        if bundle is None:
            raise NotReady("; ".join(self.readiness()["reasons"]) or "not ready")
        settings = self.settings
        k = settings.default_k if request.k is None else request.k
        if k > settings.max_k:
            raise ClientError(422, f"k={k} is more than this service serves (max_k={settings.max_k})")
        request_id = request.request_id or uuid.uuid4().hex
        user_id = request.user_id

        if request.item_ids is not None:
            candidates = self._requested_candidates(request.item_ids)
            features = self._read(user_id, candidates)
            self._add_unknown_items(bundle, candidates, features)
            source = "request"
        else:
            candidates, features, source = self._retrieve(bundle, user_id, request.context)
        cold_start = not features.recent_items

        per_candidate = features.per_candidate
        now_ms = int(time.time() * 1000)
        scoring = [CandidateImpression(request_id, now_ms, user_id, item, bundle.model_version, bundle.policy_version,
                                       request.context, per_candidate[i])
                   for i, item in enumerate(candidates)]
        with bundle.guard.reading():
            scores = bundle.model.predict(scoring, {user_id: features.recent_items})
        from policies.export import candidate_features

        policy_input = candidate_features(scores, per_candidate, bundle.policy.feature_names)
        chosen, propensities = bundle.policy.sample_slate(policy_input, k, self._generator(request.request_id))

        items, impressions = [], []
        for position, (index, propensity) in enumerate(zip(chosen, propensities)):
            propensity = min(float(propensity), 1.0)
            item_id = candidates[index]
            items.append(RecommendedItem(item_id=item_id, position=position, propensity=propensity,
                                         pctr=float(scores["pctr"][index]), pcvr=float(scores["pcvr"][index]),
                                         pctcvr=float(scores["pctcvr"][index])))
            impressions.append(Impression(
                event_time=now_ms, request_id=request_id, user_id=user_id, item_id=item_id, position=position,
                slate_size=len(chosen), propensity=propensity, model_version=bundle.model_version,
                policy_version=bundle.policy_version, context=request.context, features=per_candidate[index]))
        if self.impressions is not None:
            self.impressions.log(impressions)
        if cold_start and source == "popularity":
            self.metrics.cold_starts.inc()
        return RecommendResponse(request_id=request_id, user_id=user_id, model_version=bundle.model_version,
                                 policy_version=bundle.policy_version, items=items, candidate_source=source,
                                 candidates=len(candidates), cold_start=cold_start)

    def _generator(self, request_id: str | None) -> np.random.Generator:
        if request_id is not None:
            return np.random.default_rng(_seed(request_id))
        with self._rng_lock:  # numpy generators are not thread-safe; spawn one per request
            return np.random.default_rng(self._rng.integers(1 << 63))

    def _requested_candidates(self, item_ids: list[str]) -> list[str]:
        if len(item_ids) > self.settings.max_request_candidates:
            raise ClientError(422, f"{len(item_ids)} item_ids is more than this service scores per request "
                                   f"(max_request_candidates={self.settings.max_request_candidates})")
        seen: set[str] = set()
        duplicates = [item for item in item_ids if item in seen or seen.add(item)]
        if duplicates:
            raise ClientError(422, f"item_ids must be distinct; repeated: {_short_list(sorted(set(duplicates)))}")
        return list(item_ids)

    def _read(self, user_id: str, item_ids: list[str]) -> RequestFeatures:
        if self.reader is None:
            return request_features(user_id, item_ids, {})
        return self.reader.read(user_id, item_ids)

    def _add_unknown_items(self, bundle: ServingBundle, candidates: list[str], features: RequestFeatures) -> None:
        """Items the model has not seen are scored from their catalog text; items nobody knows are a 422."""
        unknown = [(i, item) for i, item in enumerate(candidates) if not bundle.model.known_item(item)]
        if not unknown:
            return
        missing = [item for i, item in unknown if features.catalog[i] is None]
        if missing and self.reader is not None and self.reader.item_ttl_s > 0:
            fresh = self.reader.refetch(missing)  # a cached "not in the catalog" may be out of date
            features.catalog[:] = [fresh.get(item, entry) for item, entry in zip(candidates, features.catalog)]
            missing = [item for i, item in unknown if features.catalog[i] is None]
        if missing:
            raise ClientError(422, f"unknown item_ids: {_short_list(missing)}: not in the model's catalog nor in the "
                                   "feature store's item_catalog; publish them as Item events on the items topic first")
        now_ms = int(time.time() * 1000)
        new_items = []
        for i, item in unknown:
            entry = features.catalog[i]
            price = entry.get("price")
            new_items.append(Item(event_time=now_ms, item_id=item, title=str(entry.get("title") or "")[:2000],
                                  description=str(entry.get("description") or "")[:20000],
                                  category=str(entry.get("category") or "")[:256],
                                  price=float(price) if price is not None and 0 <= float(price) < float("inf") else None))
        with bundle.guard.writing():  # waits for requests scoring with this model right now
            bundle.model.add_items(new_items)

    def _retrieve(self, bundle: ServingBundle, user_id: str, context: dict) -> tuple[list[str], RequestFeatures, str]:
        user = self.reader.user(user_id) if self.reader is not None else request_features(user_id, [], {})
        n = self.settings.candidates
        if user.recent_items and len(bundle.index):
            with bundle.guard.reading():
                query = bundle.model.user_vector(user_id, user.recent_items, user.user)
            candidates, source = bundle.index.search(query, n), "retrieval"
        else:
            category = context.get(self.settings.context_category_key)
            candidates = self.popularity.top(n, str(category) if category is not None else None)
            if not candidates:  # popularity not read yet: the catalog in its own order
                candidates = bundle.index.item_ids[:n]
            source = "popularity"
        if not candidates:
            raise ClientError(422, f"model {bundle.model_version} has no catalog to retrieve candidates from; "
                                   "pass item_ids in the request")
        if self.reader is None:
            return candidates, request_features(user_id, candidates, {}), source
        items = self.reader.read_items(candidates)
        return candidates, RequestFeatures(user=user.user, user_known=user.user_known, recent_items=user.recent_items,
                                           items=items.items, catalog=items.catalog), source
