"""Serving settings: the ``serving`` section of StreamRec's settings tree.

>>> settings = ServingSettings(port=9000, api_key="s3cret")
>>> settings.port, settings.api_key
(9000, SecretStr('**********'))
>>> try:
...     ServingSettings(max_k=5, default_k=10)
... except ValueError as exc:
...     print(exc.errors()[0]["msg"])
Value error, default_k 10 is larger than max_k 5
"""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator


class ServingSettings(BaseModel):
    """Where the API listens, where it finds models and policies, and how it retrieves, explores and logs."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    registry_dir: str | None = Field(default=None, description="the model registry (directory or file:// URI) that "
                                     "models and policies are loaded from; default: <data_dir>/registry")
    api_key: SecretStr | None = Field(default=None, description="when set, /recommend and /versions need it in X-API-Key")
    # requests
    default_k: int = Field(default=10, ge=1, description="slate size when a request gives none")
    max_k: int = Field(default=100, ge=1, description="the largest slate a request may ask for")
    max_request_candidates: int = Field(default=1000, ge=1, description="the most item_ids one request may give")
    candidates: int = Field(default=200, ge=1, description="candidates retrieved from the catalog when a request gives none")
    item_feature_ttl_s: float = Field(default=5.0, ge=0, description="candidates' Feast rows are reused for this long "
                                      "and refreshed in the background (0: read every candidate on every request)")
    # cold start: users with no click history get the most popular items, narrowed by context
    popularity_refresh_s: float = Field(default=60.0, gt=0, description="how often item popularity is re-read from Feast")
    context_category_key: str = Field(default="category", description="a context key whose value narrows cold-start candidates to one catalog category")
    # impression logging
    log_impressions: bool = True
    impression_buffer: int = Field(default=100_000, ge=1, description="impressions held while Kafka is unreachable; the oldest are dropped past this")
    impression_retry_s: float = Field(default=1.0, gt=0, description="pause between attempts to reach an unreachable broker")
    # hot swap
    listen_for_updates: bool = Field(default=True, description="follow the model-updates topic (each replica reads all of it)")
    registry_poll_s: float = Field(default=30.0, gt=0, description="fallback: how often the registry is checked for newer versions")
    # admission control: a bounded amount of work in hand, so an overload is refused at once instead of queueing
    max_inflight: int = Field(default=3, ge=1, description="/recommend requests being served or waiting for a worker "
                              "thread, per process (per replica under Ray Serve); one more is answered 503 at once. "
                              "Keep it small: more threads contending for the GIL starve the event loop that accepts "
                              "and refuses requests, and the queue moves in front of the admission (3 suits 2 cores)")
    retry_after_s: int = Field(default=1, ge=1, description="the Retry-After header of a request refused by max_inflight")
    # compute
    torch_threads: int = Field(default=1, ge=1, description="intra-op threads per process; requests run concurrently in a thread pool")
    seed: int | None = Field(default=None, description="exploration seed for requests without a request_id (None: from the OS)")
    # Ray Serve (streamrec serve --ray)
    replicas: int = Field(default=2, ge=1)
    ray_address: str | None = Field(default=None, description="an existing Ray cluster (default: start a local one)")
    replica_num_cpus: float = Field(default=1.0, gt=0)

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, value: SecretStr | None) -> SecretStr | None:
        key = None if value is None else value.get_secret_value()
        if key is not None and (not key or key != key.strip()):
            # an empty key would match a request without the header: every request would get in
            raise ValueError("api_key is empty or has surrounding spaces (HTTP headers cannot carry them); "
                             "unset it to serve without a key, or set a real one")
        return value

    @model_validator(mode="after")
    def _k_fits(self) -> "ServingSettings":
        if self.default_k > self.max_k:
            raise ValueError(f"default_k {self.default_k} is larger than max_k {self.max_k}")
        return self
