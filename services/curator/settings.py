"""The curator's configuration: environment variables ``TESSERA_*`` (nested with ``__``), or an env file.

Example::

    TESSERA_FEDERATION=acme
    TESSERA_ROSTER_FILE=/etc/tessera/roster.json
    TESSERA_STATE_DIR=/var/lib/tessera/curator
    TESSERA_BROKER__URL=amqps://broker.example:5671/
    TESSERA_BROKER__USERNAME=curator
    TESSERA_BROKER__PASSWORD_FILE=/etc/tessera/broker/password
    TESSERA_MODEL__NAME=mlp
    TESSERA_MODEL__KWARGS={"input_dim": 30, "hidden": [32], "num_classes": 2}
    TESSERA_NUM_CLASSES=2
    TESSERA_ROUNDS__MAX_ROUNDS=20
    TESSERA_ROUNDS__TARGET_ACCURACY=0.95
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from tessera.models import ModelSpec
from tessera.secagg.config import ID_PATTERN
from tessera.settings import (
    BrokerSettings,
    HealthSettings,
    LoggingSettings,
    load_settings,
)


class RoundSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_rounds: int = Field(default=20, ge=1, le=100_000, description="stop after this many completed rounds")
    target_accuracy: float | None = Field(
        default=None, gt=0, le=1, description="stop once the secure-averaged accuracy reaches this"
    )
    min_participants: int = Field(
        default=3,
        ge=3,
        description="fewest participants a round may aggregate over (at least 3: with two, each could "
        "subtract its own update from the sum); fewer left ends training",
    )
    training_timeout: float = Field(
        default=600.0,
        gt=0,
        description="seconds participants have to evaluate and train before aggregation starts",
    )
    rejoin_wait: float = Field(
        default=60.0,
        gt=0,
        description="seconds a round waits for a participant that missed its previous round (not ready by "
        "the training deadline, or gone during secure aggregation) before going on without it, so that one "
        "dead participant does not cost every later round the whole training_timeout; any message from it "
        "restores the full wait",
    )
    attempts_per_round: int = Field(
        default=3, ge=1, description="a round that aborts is retried with fresh keys this many times in all"
    )
    seed: int = Field(default=0, ge=0, description="seed of the initial global model")


class SecAggSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    ring_bits: Literal[32, 64] = Field(default=32, description="masked vectors live in Z_(2^ring_bits)")
    clip: float = Field(default=0.5, gt=0, description="each update coordinate is clipped to [-clip, clip]")
    value_bits: int | None = Field(
        default=None,
        ge=2,
        le=53,
        description="bits per quantised coordinate (default: the most the ring allows)",
    )
    max_weight: int = Field(
        default=65_535, ge=1, description="largest training-sample count (FedAvg weight) of one participant"
    )
    graph: Literal["full", "sparse"] = Field(
        default="full", description="full (Bonawitz) or sparse (SecAgg+)"
    )
    threshold_fraction: float | None = Field(
        default=None,
        gt=0.5,
        le=1,
        description="threshold as a fraction of the invited (default floor(2n/3)+1)",
    )
    phase_timeout: float = Field(
        default=60.0, gt=0, description="seconds each secure-aggregation phase waits"
    )

    @field_validator("ring_bits", mode="before")
    @classmethod
    def _ring_bits_from_text(cls, value: Any) -> Any:
        # Environment variables arrive as text, and pydantic does not coerce "64" to Literal[32, 64].
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value


class ValidationSetSettings(BaseModel):
    """An optional validation set the curator holds itself (public or synthetic data)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(description="CSV, IDX or NPZ file")
    labels_path: Path | None = Field(default=None, description="IDX labels file, for IDX images")
    label_column: str | None = Field(default=None, description="label column of a CSV file")


class CuratorFaultInjection(BaseModel):
    """For resilience tests only: hold the curator between two rounds so a test can disturb it there (stop
    the broker, kill the curator). Never set in production (no chart value renders these)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pause_before_round: int | None = Field(
        default=None, ge=1, description="TESTING ONLY: sleep before announcing this round (first attempt)"
    )
    pause_seconds: float = Field(default=5.0, gt=0, description="TESTING ONLY: how long to sleep")


class CuratorSettings(BaseSettings):
    """Every setting of ``tessera curator``."""

    model_config = SettingsConfigDict(
        env_prefix="TESSERA_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    federation: str = Field(
        pattern=ID_PATTERN.pattern, description="federation id (the vhost is tessera-<id>)"
    )
    roster_file: Path = Field(description="the federation's roster (tessera roster init)")
    state_dir: Path = Field(
        default=Path("/var/lib/tessera/curator"), description="checkpoints, metrics history and reports"
    )
    model: ModelSpec = Field(description="architecture of the global model; travels with the weights")
    num_classes: int = Field(ge=2, description="number of classes of the task")
    rounds: RoundSettings = Field(default_factory=RoundSettings)
    secagg: SecAggSettings = Field(default_factory=SecAggSettings)
    validation: ValidationSetSettings | None = Field(default=None, description="curator-held validation set")
    faults: CuratorFaultInjection = Field(default_factory=CuratorFaultInjection, description="testing only")
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _model_classes(self) -> CuratorSettings:
        declared = self.model.kwargs.get("num_classes")
        if declared is not None and declared != self.num_classes:
            raise ValueError(
                f"model.kwargs.num_classes {declared} differs from num_classes {self.num_classes}"
            )
        return self


def load_curator_settings(env_file: Path | None = None, **overrides: Any) -> CuratorSettings:
    """Build the settings from the environment (and ``env_file``); ConfigurationError names every bad field."""
    return load_settings(CuratorSettings, env_file, **overrides)


__all__ = [
    "CuratorSettings",
    "RoundSettings",
    "SecAggSettings",
    "ValidationSetSettings",
    "load_curator_settings",
]
