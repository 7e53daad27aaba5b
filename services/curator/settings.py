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
from typing import Any

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
    min_participants: int | None = Field(
        default=None,
        ge=3,
        description="fewest participants a round may aggregate over; fewer left ends training (default, and "
        "at least: the roster's parameters.min_participants, which participants enforce)",
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
    max_offences: int = Field(
        default=3,
        ge=1,
        description="a participant that sends this many messages no honest participant sends (bad signatures, "
        "invalid keys, malformed shares) is excluded for the rest of the training",
    )
    attempts_per_round: int = Field(
        default=3, ge=1, description="a round that aborts is retried with fresh keys this many times in all"
    )
    seed: int = Field(default=0, ge=0, description="seed of the initial global model")
    keep_weights: int = Field(
        default=5,
        ge=0,
        le=100_000,
        description="also keep the global weights after each of the last this many rounds in "
        "<state_dir>/rounds/, for `tessera model export --round N` (0: only the latest, in the checkpoint; "
        "each file is 4 bytes per parameter)",
    )


class SecAggSettings(BaseModel):
    """Operational settings of secure aggregation. What every participant checks (threshold, graph, ring,
    clipping, quantisation, privacy mode) is not here: it is in the roster (``tessera roster build``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    phase_timeout: float = Field(
        default=60.0, gt=0, description="seconds each secure-aggregation phase waits"
    )


class ServerSettings(BaseModel):
    """The curator's own work on the model: its optimiser step in the distributed privacy mode
    (post-processing of a DP value: it costs no privacy; unused in the local mode, where the update is the
    federated average), and how the model is evaluated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float = Field(
        default=1.0, gt=0, description="learning rate of the curator's SGD step (distributed mode)"
    )
    momentum: float = Field(default=0.0, ge=0, lt=1, description="SGD momentum (distributed mode)")
    lr_decay: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="the learning rate of step s is lr * lr_decay^(s-1) (distributed mode)",
    )
    decision_threshold: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="two-class tasks: participants (and the curator's validation) predict class 1 from this "
        "probability on, instead of the most probable class; an evaluation setting, announced every round",
    )
    evaluate_every: int = Field(
        default=1,
        ge=1,
        description="participants evaluate the announced model every this many rounds (and in the first and "
        "the last); distributed DP-SGD runs hundreds of short rounds",
    )


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

    # A string, not a list: one environment variable, "2" or "2,3" (an int is accepted from code).
    pause_before_round: str = Field(
        default="",
        description="TESTING ONLY: sleep before announcing these rounds (comma-separated), once each",
    )

    @field_validator("pause_before_round", mode="before")
    @classmethod
    def _rounds_as_text(cls, value: object) -> object:
        if value is None:
            return ""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("pause_before_round")
    @classmethod
    def _check_rounds(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip() and not (part.strip().isdigit() and int(part) >= 1):
                raise ValueError(f"not a round number (1, 2, ...): {part.strip()!r}")
        return value

    @property
    def pause_rounds(self) -> frozenset[int]:
        return frozenset(int(part) for part in self.pause_before_round.split(",") if part.strip())

    pause_seconds: float = Field(default=5.0, gt=0, description="TESTING ONLY: how long to sleep")


class CuratorSettings(BaseSettings):
    """Every setting of ``tessera curator``."""

    model_config = SettingsConfigDict(
        env_prefix="TESSERA_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    federation: str = Field(
        pattern=ID_PATTERN.pattern, description="federation id (the vhost is tessera-<id>)"
    )
    roster_file: Path = Field(description="the federation's roster (tessera roster build)")
    roster_fingerprint: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F :]{64,95}$",
        description="if set, refuse to start with any other roster (the fingerprint `tessera roster build` "
        "printed)",
    )
    state_dir: Path = Field(
        default=Path("/var/lib/tessera/curator"), description="checkpoints, metrics history and reports"
    )
    model: ModelSpec = Field(description="architecture of the global model; travels with the weights")
    num_classes: int = Field(ge=2, description="number of classes of the task")
    rounds: RoundSettings = Field(default_factory=RoundSettings)
    secagg: SecAggSettings = Field(default_factory=SecAggSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
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
    "ServerSettings",
    "ValidationSetSettings",
    "load_curator_settings",
]
