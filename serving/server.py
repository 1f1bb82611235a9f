"""Running the API: one uvicorn process, or Ray Serve replicas of the same FastAPI app.

``settings`` is StreamRec's whole settings tree (``streamrec.settings.Settings``: its
``serving``, ``kafka``, ``feature_store`` and ``data_dir`` sections); this package reads it and
never imports the application shell.

Under Ray Serve each replica builds its own :class:`~serving.service.RecommendationService` when
it starts (``__serve_build_asgi_app__``, then the app's lifespan), so every replica runs its own
``model-updates`` listener and registry poller and swaps versions by itself: an update reaches
every replica without any coordination between them. Replicas need the registry directory and
the feature store at the same paths (a shared mount, or Redis for the online store).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from serving.app import create_app
from serving.service import RecommendationService

log = logging.getLogger(__name__)

RAY_APP_NAME = "streamrec"


class ServingUnavailable(RuntimeError):
    """The serving runtime cannot start (e.g. Ray Serve is not installed); the message says what to do."""


def build_app(settings: Any):
    """The FastAPI app that builds, starts and stops its service with the app's lifespan."""
    return create_app(service_factory=lambda: RecommendationService.from_settings(settings))


def run_uvicorn(settings: Any, log_level: str = "info") -> None:
    import uvicorn

    serving = settings.serving
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it
    # found: with this one, a graceful stop exits 0 rather than "killed by SIGTERM"
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stopped_gracefully)
    try:
        uvicorn.run(build_app(settings), host=serving.host, port=serving.port, log_level=log_level.lower(),
                    access_log=False, timeout_graceful_shutdown=10)
    except _Stopped:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Stopped(Exception):
    """SIGTERM after uvicorn's graceful shutdown."""


def _stopped_gracefully(signum, frame) -> None:
    raise _Stopped()


def _ray_serve():
    try:
        from ray import serve
    except ImportError as exc:  # ray[rllib] alone lacks Serve's own dependencies (grpcio, ...)
        raise ServingUnavailable(f"Ray Serve cannot be imported ({exc}); install it with pip install 'ray[serve]'") from None
    return serve


def ray_deployment(settings: Any, replicas: int | None = None):
    """The Ray Serve application: ``replicas`` copies of the API, each with its own hot swap."""
    serve = _ray_serve()

    class StreamRecServing:
        """One replica: holds the settings; the app (and its service) are built at replica start."""

        def __init__(self, replica_settings: Any) -> None:
            self.settings = replica_settings

        def __serve_build_asgi_app__(self):
            return build_app(self.settings)

    ingress = serve.ingress()(StreamRecServing)
    deployment = serve.deployment(
        ingress,
        name="StreamRecServing",
        num_replicas=replicas or settings.serving.replicas,
        ray_actor_options={"num_cpus": settings.serving.replica_num_cpus},
        health_check_period_s=10,
    )
    return deployment.bind(settings)


def run_ray_serve(settings: Any, *, blocking: bool = True, replicas: int | None = None, num_cpus: int | None = None):
    """Start (or join) Ray, start Serve's HTTP proxy on the configured host and port, deploy the app."""
    import ray

    serve = _ray_serve()
    serving = settings.serving
    if not ray.is_initialized():
        if serving.ray_address:
            ray.init(address=serving.ray_address)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options={"host": serving.host, "port": serving.port})
    handle = serve.run(ray_deployment(settings, replicas), name=RAY_APP_NAME, route_prefix="/", blocking=blocking)
    return handle
