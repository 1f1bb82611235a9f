"""Kafka and topic settings: the ``kafka`` section of StreamRec's settings tree.

The application shell (``streamrec.settings``) composes these into one tree that files and
``STREAMREC_*`` environment variables fill; this package only declares its own section.
"""

from __future__ import annotations

import logging
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
# the stream worker's own topics: events re-keyed by item_id, and feature updates on their way to Feast
INTERNAL_TOPICS = ("item-activity", "feature-updates", "join-ticks")


class _RedactSecrets(logging.Filter):
    """Masks known secrets in the Kafka clients' log records: at DEBUG, kafka-python logs every
    request it sends, the SASL PLAIN one with the password in it, and the raw bytes too."""

    MASK = "**********"

    def __init__(self) -> None:
        super().__init__()
        self.forms: set[str] = set()  # each secret as text and as it shows inside a bytes repr

    def add(self, secret: str) -> None:
        data = secret.encode()
        # a repr escapes quotes one way or the other depending on the text around: both spellings
        self.forms |= {secret, repr(secret)[1:-1], repr(secret + "'\"")[1:-4], repr(data)[2:-1],
                       repr(data + b"'\"")[2:-4]} - {""}

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's own error to report
            return True
        if any(form in message for form in self.forms):
            for form in sorted(self.forms, key=len, reverse=True):
                message = message.replace(form, self.MASK)
            record.msg, record.args = message, ()
        return True


_REDACT = _RedactSecrets()


def hide_in_client_logs(*secrets: SecretStr | None) -> None:
    """Mask these secrets in what kafka-python and aiokafka log (filters on their loggers; records
    below a logger's level are never formatted, so this costs nothing unless they log)."""
    for secret in secrets:
        if secret is not None and secret.get_secret_value():
            _REDACT.add(secret.get_secret_value())
    # the loggers that print requests and raw bytes, created here if their module is not imported yet
    names = {"kafka.net.connection", "kafka.protocol.parser", "kafka.net.transport", "aiokafka.conn"}
    names |= {name for name in list(logging.Logger.manager.loggerDict) if name.split(".")[0] in ("kafka", "aiokafka")}
    for name in names:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


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
    reconnect_backoff_max_ms: int = Field(
        default=1_000, ge=50, description="longest pause between attempts to reach a broker that went away (as in "
        "Java clients; kafka-python's own 30 s would leave a client idle that long after a broker restart)")

    def topic(self, suffix: str) -> str:
        if suffix not in TOPICS and suffix not in INTERNAL_TOPICS:
            raise KeyError(f"unknown topic {suffix!r}; StreamRec's topics are {', '.join(TOPICS)}")
        return self.topic_prefix + suffix

    def topic_for(self, event: Event | str) -> str:
        event_type = event if isinstance(event, str) else event.type  # type: ignore[attr-defined]
        return self.topic(TOPIC_OF_TYPE[event_type])

    def all_topics(self) -> list[str]:
        return [self.topic(suffix) for suffix in TOPICS]

    def client_options(self) -> dict[str, Any]:
        """Connection and security options shared by every kafka-python client."""
        hide_in_client_logs(self.sasl_plain_password, self.ssl_password)
        options: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "bootstrap_timeout_ms": self.bootstrap_timeout_ms,
            "reconnect_backoff_max_ms": self.reconnect_backoff_max_ms,
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
        elif self.ssl_certfile:  # an encrypted key then fails at once, instead of OpenSSL prompting on the terminal
            options["ssl_password"] = ""
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
