"""The HTTP face of the recommendation service (FastAPI), shared by uvicorn and Ray Serve.

Routes: ``POST /recommend``, ``GET /healthz`` (the process answers), ``GET /readyz`` (a model
and a policy are loaded; 503 until then), ``GET /versions`` (what serves, what was refused,
recent swaps, the impression buffer) and ``GET /metrics`` (Prometheus text). With an API key
configured, ``/recommend`` and ``/versions`` need it in the ``X-API-Key`` header. With
``serving.max_inflight`` recommendations in hand, another ``/recommend`` is answered 503 with
``Retry-After`` at once and counted in ``streamrec_serving_shed_total`` (admission control).

Every client mistake is a 4xx whose body says what to fix: ``{"error": "...", "details": [...]}``.
A 500 means a bug in StreamRec, never a bad request.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.service import ClientError, NotReady, RecommendationService, RecommendRequest, RecommendResponse

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
_ENDPOINTS = {"/recommend", "/healthz", "/readyz", "/versions", "/metrics"}


_UNION_TAGS = {"bool", "int", "float", "str", "constrained-str", "constrained-float", "list[constrained-str]"}
EXAMPLE_BODY = '{"user_id": "u1", "k": 10}'


def _describe(exc: RequestValidationError) -> list[str]:
    """One line per wrong field, e.g. ``k: Input should be greater than or equal to 1``."""
    by_field: dict[str, list[str]] = {}
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            at = f" at character {loc[0]}" if loc else ""
            by_field.setdefault("body", []).append(f"not valid JSON ({reason}{at}); send a JSON object like {EXAMPLE_BODY}")
            continue
        loc = [part for part in loc if part not in _UNION_TAGS]  # the tried alternatives of a union, not fields
        where = ".".join(loc) or "body"
        message = error.get("msg", "invalid")
        if where == "body" and error.get("type") in ("model_attributes_type", "dict_type", "missing"):
            message = f"must be a JSON object like {EXAMPLE_BODY}"
        messages = by_field.setdefault(where, [])
        if message not in messages:
            messages.append(message)
    return [f"{where}: {' or '.join(messages)}" for where, messages in list(by_field.items())[:10]]


class AdmissionControl:
    """ASGI middleware: past ``serving.max_inflight`` recommendations in hand, a 503 with Retry-After at once.

    The outermost layer, in plain ASGI, so refusing costs the event loop as little as possible:
    the work runs in the thread pool, where an unbounded queue would make every request late
    instead of refusing a few. Counted on the event loop, so no lock is needed.
    """

    def __init__(self, app, service_of: Callable[[], RecommendationService | None]) -> None:
        self.app, self.service_of = app, service_of
        self.inflight = 0

    async def __call__(self, scope, receive, send) -> None:
        service = self.service_of() if scope["type"] == "http" and scope["path"] == "/recommend" else None
        if service is None:
            await self.app(scope, receive, send)
            return
        metrics, settings = service.metrics, service.settings
        if self.inflight >= settings.max_inflight:
            metrics.shed.inc()
            metrics.requests.labels(endpoint="/recommend", status="503").inc()
            body = json.dumps({"error": f"overloaded: {settings.max_inflight} requests are in hand "
                                        f"(serving.max_inflight); retry after {settings.retry_after_s} s"}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", str(settings.retry_after_s).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.inflight += 1
        metrics.inflight.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight -= 1
                metrics.inflight.dec()

        async def send_releasing(message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()  # before the last bytes leave: a client that asks again at once must find the slot free
            await send(message)

        try:
            await self.app(scope, receive, send_releasing)
        finally:
            release()


def create_app(service: RecommendationService | None = None, *,
               service_factory: Callable[[], RecommendationService] | None = None) -> FastAPI:
    """The API over ``service`` (started and stopped by the caller), or over one that
    ``service_factory`` builds when the app starts and that is stopped when it shuts down
    (how ``streamrec serve`` and every Ray Serve replica run it)."""
    if (service is None) == (service_factory is None):
        raise ValueError("give exactly one of service and service_factory")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if service_factory is None:
            app.state.service = service
            yield
            return
        built = service_factory().start()
        app.state.service = built
        try:
            yield
        finally:
            built.stop()

    app = FastAPI(title="StreamRec recommendations", version="1", lifespan=lifespan)
    if service is not None:
        app.state.service = service  # usable without running the lifespan (in-process tests)

    def current(request: Request) -> RecommendationService:
        return request.app.state.service

    def require_key(request: Request) -> None:
        expected = current(request).settings.api_key
        if expected is None:
            return
        given = request.headers.get(API_KEY_HEADER, "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.get_secret_value().encode("utf-8")):
            raise ClientError(401, f"missing or wrong API key: send it in the {API_KEY_HEADER} header")

    @app.middleware("http")
    async def measure(request: Request, call_next):
        started = time.perf_counter()
        endpoint = request.url.path if request.url.path in _ENDPOINTS else "other"
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics = request.app.state.service.metrics if hasattr(request.app.state, "service") else None
            if metrics is not None:
                metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
                metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
                if status >= 400:
                    metrics.errors.labels(endpoint=endpoint, kind="client" if status < 500 else "server").inc()

    app.add_middleware(AdmissionControl, service_of=lambda: getattr(app.state, "service", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "invalid request", "details": _describe(exc)}, status_code=422)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady) -> JSONResponse:
        return JSONResponse({"error": f"not ready: {exc}"}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": "internal error; see the service log"}, status_code=500)

    @app.post("/recommend", response_model=RecommendResponse, dependencies=[Depends(require_key)])
    def recommend(body: RecommendRequest, request: Request) -> RecommendResponse:
        # a plain def: FastAPI runs it in its thread pool, so Feast and torch never block the event loop
        return current(request).recommend(body)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        state = current(request).readiness()
        return JSONResponse(state, status_code=200 if state["ready"] else 503)

    @app.get("/versions", dependencies=[Depends(require_key)])
    def versions(request: Request) -> dict[str, Any]:
        return current(request).versions()

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        service_metrics = current(request).metrics
        return Response(service_metrics.render(), media_type=service_metrics.content_type)

    return app

