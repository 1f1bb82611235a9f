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

import difflib
import os
import typing
from collections.abc import Mapping
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

from feature_store.config import FeatureStoreSettings
from learner.config import LearnerSettings
from policies.config import PolicySettings
from serving.config import ServingSettings
from streaming.config import KafkaSettings
from streaming.joiner import JoinerConfig


class ReplaySettings(BaseModel):
    speed: float = Field(default=0.0, ge=0.0, description="event-time seconds per wall second; 0 = as fast as possible")
    progress: bool = True


class StreamSettings(BaseModel):
    app_id: str = Field(default="streamrec-stream", description="Faust app id: consumer group and changelog prefix")
    sweep_interval_s: float = Field(default=1.0, gt=0, description="how often quiet users' windows are checked")
    idle_after_s: float = Field(
        default=3.0, ge=0,
        description="an input read to its end stops holding the watermark back after this long with nothing new",
    )
    feature_batch: int = Field(default=1000, ge=1, description="feature updates per Feast push")
    instance_id: str | None = Field(
        default=None,
        description="static group membership: a stable name per worker (e.g. the pod name) lets a restarted "
        "worker take its partitions back at once instead of after the session timeout",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    joiner: JoinerConfig = Field(default_factory=JoinerConfig)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    feature_store: FeatureStoreSettings = Field(default_factory=FeatureStoreSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
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


ENV_PREFIX = "STREAMREC_"


def unknown_environment_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """``STREAMREC_*`` variables that name no setting, each with a hint; pydantic would ignore them silently.

    >>> unknown_environment_settings({"STREAMREC_KAFKA__BOOTSTRAP_SERVER": "b:9092", "STREAMREC_LOG_LEVEL": "INFO"})
    ['STREAMREC_KAFKA__BOOTSTRAP_SERVER (did you mean STREAMREC_KAFKA__BOOTSTRAP_SERVERS?)']
    """
    problems = []
    for var in sorted(os.environ if environ is None else environ):
        if not var.upper().startswith(ENV_PREFIX) or var.upper() == f"{ENV_PREFIX}CONFIG":
            continue
        model: Any = Settings
        path = var[len(ENV_PREFIX):].lower().split("__")
        for depth, part in enumerate(path):
            fields = model.model_fields
            if part not in fields:
                close = difflib.get_close_matches(part, list(fields), n=1)
                hint = ""
                if close:
                    hint = " (did you mean " + ENV_PREFIX + "__".join([*path[:depth], close[0]]).upper() + "?)"
                problems.append(f"{var}{hint}")
                break
            nested = _model_in(fields[part].annotation)
            if nested is None:
                break  # a plain value, or a mapping whose keys are free
            model = nested
    return problems


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # Optional[Model], Model | None
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree from defaults, a YAML/TOML file, the environment and ``overrides``."""
    unknown = unknown_environment_settings()
    if unknown:
        raise SettingsError("these STREAMREC_* variables name no setting: " + ", ".join(unknown))
    path = config_file or os.environ.get("STREAMREC_CONFIG")
    if path is None:
        try:
            return Settings(**overrides)
        except ValidationError as exc:
            raise SettingsError(f"STREAMREC_* variables or arguments are invalid:\n{_describe(exc)}") from None
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
        raise SettingsError(f"settings in {path} or STREAMREC_* variables are invalid:\n{_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    """One line per wrong setting, without its value: pydantic's own message would echo the input,
    and the input may be a password or an API key (or a whole section holding one)."""
    return "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                     for e in exc.errors(include_url=False, include_input=False))
