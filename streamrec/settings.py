"""StreamRec's one settings tree.

Values come, highest priority first, from: arguments in code, ``STREAMREC_*`` environment
variables (nested with ``__``, e.g. ``STREAMREC_KAFKA__BOOTSTRAP_SERVERS``), a YAML or TOML file
(``--config`` on the CLI or ``STREAMREC_CONFIG``), and the defaults below. Each package declares
its own section; this module only composes them.

>>> import os
>>> os.environ["STREAMREC_KAFKA__PARTITIONS"] = "12"
>>> load_settings().kafka.partitions
12
>>> del os.environ["STREAMREC_KAFKA__PARTITIONS"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from streaming.config import KafkaSettings


class ReplaySettings(BaseModel):
    speed: float = Field(default=0.0, ge=0.0, description="event-time seconds per wall second; 0 = as fast as possible")
    progress: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    data_dir: Path = Field(default=Path("streamrec-data"), description="where demo logs, registry and reports go")
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the file sources read yaml_file / toml_file from model_config, set by load_settings
        return (
            init_settings,
            env_settings,
            YamlConfigSettingsSource(settings_cls),
            TomlConfigSettingsSource(settings_cls),
        )


class SettingsError(ValueError):
    pass


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree from defaults, a YAML/TOML file, the environment and ``overrides``."""
    path = config_file or os.environ.get("STREAMREC_CONFIG")
    if path is None:
        try:
            return Settings(**overrides)
        except ValidationError as exc:
            raise SettingsError(f"STREAMREC_* variables or arguments are invalid:\n{exc}") from None
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"settings file {path} does not exist")
    if path.suffix not in (".yaml", ".yml", ".toml"):
        raise SettingsError(f"settings file {path} must be .yaml, .yml or .toml")
    key = "toml_file" if path.suffix == ".toml" else "yaml_file"
    from_file = type("Settings", (Settings,), {"model_config": {**Settings.model_config, key: path}, "__module__": __name__})
    try:
        return from_file(**overrides)
    except ValidationError as exc:
        raise SettingsError(f"settings in {path} or STREAMREC_* variables are invalid:\n{exc}") from None
