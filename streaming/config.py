"""Kafka and topic settings: the ``kafka`` section of StreamRec's settings tree.

The application shell (``streamrec.settings``) composes these into one tree that files and
``STREAMREC_*`` environment variables fill; this package only declares its own section.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr

from streaming.events import Event

# topic suffix -> (event type it carries, the field its messages are keyed by)
TOPICS: dict[str, tuple[str, str]] = {
    "impressions": ("impression", "user_id"),
    "clicks": ("click", "user_id"),
    "purchases": ("purchase", "user_id"),
    "items": ("item", "item_id"),
    "examples": ("example", "user_id"),
    "model-updates": ("model_update", "kind"),
    "dlq": ("dead_letter", "original_key"),
}
TOPIC_OF_TYPE = {event_type: suffix for suffix, (event_type, _) in TOPICS.items()}


class KafkaSettings(BaseModel):
    """Where the cluster is, how to reach it securely, and how StreamRec's topics look."""

    bootstrap_servers: str = "localhost:9092"
    client_id: str = "streamrec"
    topic_prefix: str = "streamrec."
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    retention_ms: int = Field(default=7 * 24 * 3600 * 1000, ge=-1, description="-1 keeps events forever")
    # security, passed through to every kafka-python client
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    # producer
    acks: Literal["all", "1", "0"] = "all"
    retries: int = Field(default=2_147_483_647, ge=0)
    compression_type: Literal["lz4", "gzip", "snappy", "zstd"] | None = "lz4"
    linger_ms: int = Field(default=5, ge=0)
    batch_size: int = Field(default=256 * 1024, ge=1024)
    delivery_timeout_ms: int = Field(default=120_000, ge=1000)
    # consumer
    group_id: str = "streamrec"
    group_instance_id: str | None = Field(
        default=None,
        description="static membership: a stable name per process (e.g. the pod name) lets a restarted "
        "consumer take its partitions back at once instead of waiting for the group to rebalance",
    )
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    max_poll_records: int = Field(default=2000, ge=1)
    poll_timeout_ms: int = Field(default=500, ge=0)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(default=30_000, ge=1000)
    bootstrap_timeout_ms: int = Field(default=30_000, ge=100, description="how long a client waits for a first broker")

    def topic(self, suffix: str) -> str:
        if suffix not in TOPICS:
            raise KeyError(f"unknown topic {suffix!r}; StreamRec's topics are {', '.join(TOPICS)}")
        return self.topic_prefix + suffix

    def topic_for(self, event: Event | str) -> str:
        event_type = event if isinstance(event, str) else event.type  # type: ignore[attr-defined]
        return self.topic(TOPIC_OF_TYPE[event_type])

    def all_topics(self) -> list[str]:
        return [self.topic(suffix) for suffix in TOPICS]

    def client_options(self) -> dict[str, Any]:
        """Connection and security options shared by every kafka-python client."""
        options: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
        }
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
        if self.sasl_plain_username is not None:
            options["sasl_plain_username"] = self.sasl_plain_username
        if self.sasl_plain_password is not None:
            options["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name):
                options[name] = getattr(self, name)
        if self.ssl_password is not None:
            options["ssl_password"] = self.ssl_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            options["ssl_check_hostname"] = self.ssl_check_hostname
        return options

    def producer_options(self) -> dict[str, Any]:
        return {
            **self.client_options(),
            "acks": "all" if self.acks == "all" else int(self.acks),
            "retries": self.retries,
            "compression_type": self.compression_type,
            "linger_ms": self.linger_ms,
            "batch_size": self.batch_size,
            "delivery_timeout_ms": self.delivery_timeout_ms,
            "enable_idempotence": self.acks == "all",
        }

    def consumer_options(self, group_id: str | None = None) -> dict[str, Any]:
        return {
            **self.client_options(),
            "group_id": group_id or self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": self.auto_offset_reset,
            "max_poll_records": self.max_poll_records,
            "session_timeout_ms": self.session_timeout_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
            "group_instance_id": self.group_instance_id,
        }
