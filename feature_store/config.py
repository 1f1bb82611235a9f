"""Feature store settings: the ``feature_store`` section of StreamRec's settings tree, and the
Feast configuration (``feature_store.yaml``) it stands for.

The embedded default keeps everything under ``data_dir``: a file registry, a SQLite online store
and one parquet file per view as the offline store. Production points the online store at Redis.

>>> settings = FeatureStoreSettings(data_dir="/srv/features", online_store="redis",
...                                 redis_connection_string="redis-0:6379,db=1", redis_password="s3cret")
>>> repo_config(settings).online_store.connection_string
'redis-0:6379,db=1,password="s3cret"'
>>> print(feature_store_yaml(settings))  # the password stays in the environment, not on disk
project: streamrec
provider: local
registry: /srv/features/registry.db
online_store:
  type: redis
  connection_string: redis-0:6379,db=1,password=${STREAMREC_FEATURE_STORE__REDIS_PASSWORD}
offline_store:
  type: file
entity_key_serialization_version: 3
<BLANKLINE>
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from feast.repo_config import RepoConfig
from pydantic import BaseModel, Field, SecretStr, field_validator

PASSWORD_ENV = "STREAMREC_FEATURE_STORE__REDIS_PASSWORD"  # the settings tree's variable for redis_password
ENTITY_KEY_SERIALIZATION_VERSION = 3  # the only version Feast 0.4x+ writes


class FeatureStoreSettings(BaseModel):
    """Where the feature store keeps its registry and offline data, and which online store it reads."""

    data_dir: Path = Field(default=Path("streamrec-data/feature_store"),
                           description="registry, SQLite online store and offline parquet files")
    project: str = Field(default="streamrec", pattern=r"^[A-Za-z0-9][A-Za-z0-9_]*$",
                         description="Feast project; separates StreamRec's keys from others' in a shared Redis")
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection_string: str = Field(
        default="127.0.0.1:6379",
        description="host:port[,db=N][,ssl=true][,username=NAME]; Feast's Redis connection string",
    )
    redis_password: SecretStr | None = None
    offline_max_parts: int = Field(default=32, ge=2,
                                   description="a view's offline folder is compacted to one file past this many parts")

    @field_validator("redis_password")
    @classmethod
    def _no_comma(cls, value: SecretStr | None) -> SecretStr | None:
        # Feast splits its connection string on commas; a password containing one cannot be passed
        if value is not None and "," in value.get_secret_value():
            raise ValueError("the Redis password cannot contain ',' (Feast's connection string splits on it)")
        return value

    @field_validator("redis_connection_string")
    @classmethod
    def _no_inline_password(cls, value: str) -> str:
        if any(part.strip().startswith("password=") for part in value.split(",")):
            raise ValueError("put the Redis password in redis_password (a secret), not in the connection string")
        return value

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.db"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "online.db"

    @property
    def yaml_path(self) -> Path:
        return self.data_dir / "feature_store.yaml"


def _config_dict(settings: FeatureStoreSettings, redis_password: str | None) -> dict[str, Any]:
    if settings.online_store == "sqlite":
        online: dict[str, Any] = {"type": "sqlite", "path": str(settings.sqlite_path)}
    else:
        connection = settings.redis_connection_string
        if redis_password is not None:
            connection += f",password={redis_password}"
        online = {"type": "redis", "connection_string": connection}
    return {
        "project": settings.project,
        "provider": "local",
        "registry": str(settings.registry_path),
        "online_store": online,
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": ENTITY_KEY_SERIALIZATION_VERSION,
    }


def repo_config(settings: FeatureStoreSettings) -> RepoConfig:
    """Feast's configuration for ``settings``, built in code (no YAML file is read)."""
    password = None
    if settings.redis_password is not None:
        # Feast json-decodes each connection parameter: quoting keeps "123" or "true" a string
        password = json.dumps(settings.redis_password.get_secret_value())
    config = RepoConfig(**_config_dict(settings, password))
    config.repo_path = settings.data_dir
    return config


def feature_store_yaml(settings: FeatureStoreSettings) -> str:
    """``feature_store.yaml`` for the ``feast`` CLI; the Redis password is read from the environment."""
    password = f"${{{PASSWORD_ENV}}}" if settings.redis_password is not None else None
    return yaml.safe_dump(_config_dict(settings, password), sort_keys=False)


def write_feature_store_yaml(settings: FeatureStoreSettings) -> Path:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.yaml_path.write_text(feature_store_yaml(settings), encoding="utf-8")
    return settings.yaml_path
