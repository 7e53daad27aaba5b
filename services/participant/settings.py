"""An organisation's participant configuration: environment variables ``TESSERA_*`` (nested with ``__``).

Example::

    TESSERA_FEDERATION=acme
    TESSERA_ORGANISATION=hospital-a
    TESSERA_ROSTER_FILE=/etc/tessera/roster.json
    TESSERA_ROSTER_FINGERPRINT=3f2a...e91c   # from `tessera roster build`, checked out of band
    TESSERA_IDENTITY_KEY_FILE=/etc/tessera/identity/key
    TESSERA_STATE_DIR=/var/lib/tessera/participant
    TESSERA_BROKER__URL=amqps://broker.example:5671/
    TESSERA_BROKER__USERNAME=hospital-a
    TESSERA_BROKER__PASSWORD_FILE=/etc/tessera/broker/password
    TESSERA_MODEL__NAME=mlp
    TESSERA_MODEL__KWARGS={"input_dim": 30, "hidden": [32], "num_classes": 2}
    TESSERA_NUM_CLASSES=2
    TESSERA_DATA__PATH=/data/records.csv
    TESSERA_DATA__LABEL_COLUMN=diagnosis
    TESSERA_PRIVACY__TARGET_EPSILON=3
    TESSERA_PRIVACY__DELTA=1e-5
    TESSERA_PRIVACY__PLANNED_ROUNDS=10
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tessera.models import ModelSpec
from tessera.secagg.config import ID_PATTERN
from tessera.settings import (
    BrokerSettings,
    HealthSettings,
    LoggingSettings,
    load_settings,
)


class DataSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(description="the organisation's local data: CSV, MNIST-style IDX (images file) or NPZ")
    format: Literal["csv", "idx", "npz"] | None = Field(
        default=None, description="default: from the file name"
    )
    labels_path: Path | None = Field(default=None, description="IDX labels file (default: MNIST naming)")
    label_column: str | None = Field(default=None, description="the label column of a CSV file")
    drop_columns: tuple[str, ...] = Field(default=(), description="CSV columns that are not features (ids)")
    encoding_file: Path | None = Field(
        default=None,
        description="feature encoding (JSON) shared by all organisations so CSV features are encoded alike",
    )
    label_classes: tuple[str, ...] | None = Field(
        default=None, description="CSV label values in class order (default: sorted values)"
    )
    validation_fraction: float = Field(default=0.2, ge=0, lt=1, description="share held out for evaluation")
    split_seed: int = Field(default=0, ge=0, description="seed of the train/validation split (keep it fixed)")


class PrivacySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(
        default=True, description="DP-SGD on; false trains WITHOUT differential privacy (logged loudly)"
    )
    target_epsilon: float = Field(
        default=3.0, gt=0, description="epsilon for this organisation's records, total"
    )
    delta: float = Field(default=1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee")
    max_grad_norm: float = Field(default=1.0, gt=0, description="per-example gradient clipping norm")
    planned_rounds: int = Field(default=10, ge=1, description="rounds the budget is planned for")
    local_epochs: float = Field(default=1.0, gt=0, description="epochs of local training per round")
    batch_size: int = Field(default=64, ge=1, description="expected batch size (Poisson sampling)")
    lr: float = Field(default=0.1, gt=0, description="local learning rate (of round 1, see lr_decay)")
    lr_decay: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="the learning rate of round r is lr * lr_decay^(r-1); 1 keeps it constant. Under DP-SGD "
        "the noise per step is fixed by the budget, so smaller late steps average more of it away",
    )
    momentum: float = Field(default=0.0, ge=0, lt=1, description="local SGD momentum")
    accountant: Literal["rdp", "prv"] = Field(
        default="rdp", description="privacy accountant of the local mode (the distributed mode's is skellam)"
    )
    class_weights: tuple[float, ...] | None = Field(
        default=None,
        description="distributed mode: weight of each class in the per-example loss, before per-example "
        "clipping (the DP guarantee is per record whatever the weights)",
    )

    def round_lr(self, round_number: int) -> float:
        """The local learning rate of federated round ``round_number`` (1-based)."""
        return self.lr * self.lr_decay ** max(0, round_number - 1)


StallPoint = Literal["ready", "advertise", "shares", "masked_input", "consistency", "unmask"]
"""Where a participant can be told to hang: before sending its ``ready`` report (after training), or before
sending the secure-aggregation message of that phase (AdvertiseKeys, EncryptedShares, MaskedInput,
ConsistencySignature, UnmaskShares)."""


class FaultInjection(BaseModel):
    """For resilience and security tests only: make this participant hang at a chosen point so a test can kill
    it there, slow it down, have it record what it submits so a test can recompute the aggregate, or
    misbehave as a hostile insider would. Never set in production (no chart value renders these)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stall_before: StallPoint | None = Field(
        default=None, description="TESTING ONLY: hang before sending this message"
    )
    stall_seconds: float = Field(default=3600.0, gt=0, description="TESTING ONLY: how long to hang")
    stall_round: int = Field(default=1, ge=1, description="TESTING ONLY: the round in which to hang")
    advertise_low_order_key: bool = Field(
        default=False,
        description="TESTING ONLY: act as a hostile insider that advertises an all-zero (low-order) masking "
        "key, signed with its own identity key, in every aggregation",
    )
    slow_seconds: float = Field(
        default=0.0,
        ge=0,
        description="TESTING ONLY: sleep this long after training in every round (a slow organisation)",
    )
    record_inputs: bool = Field(
        default=False,
        description="TESTING ONLY: write the ring vector this participant submits to each aggregation to "
        "<state_dir>/fault-injection/inputs/<aggregation>.npz, so a test can recompute the exact sum; it "
        "is this organisation's update in the clear, so never in production",
    )


class ParticipantSettings(BaseSettings):
    """Every setting of ``tessera participant``."""

    model_config = SettingsConfigDict(
        env_prefix="TESSERA_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    federation: str = Field(pattern=ID_PATTERN.pattern, description="federation id")
    organisation: str = Field(pattern=ID_PATTERN.pattern, description="this organisation's id in the roster")
    roster_file: Path = Field(description="the federation's roster (from the coordinator)")
    roster_fingerprint: str = Field(
        pattern=r"^[0-9a-fA-F :]{64,95}$",
        description="the roster's fingerprint, compared with the coordinator and the other companies out of "
        "band: this participant refuses any other roster, and any round announced under another",
    )
    identity_key_file: Path = Field(
        description="this organisation's private Ed25519 identity key (hex, 0600; `tessera identity init`)"
    )
    state_dir: Path = Field(
        default=Path("/var/lib/tessera/participant"), description="privacy accountant and local state"
    )
    model: ModelSpec = Field(description="the architecture this organisation agreed to train")
    num_classes: int = Field(ge=2, description="number of classes of the task")
    allowed_imports: tuple[str, ...] = Field(
        default=(), description="user model factories (package.module:factory) this participant may build"
    )
    data: DataSettings
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    training_seed: int | None = Field(
        default=None, description="seed for sampling and noise; leave unset in production (OS entropy)"
    )
    faults: FaultInjection = Field(default_factory=FaultInjection, description="testing only")
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)


def load_participant_settings(env_file: Path | None = None, **overrides: Any) -> ParticipantSettings:
    """Build the settings from the environment (and ``env_file``); ConfigurationError names every bad field."""
    return load_settings(ParticipantSettings, env_file, **overrides)


__all__ = ["DataSettings", "ParticipantSettings", "PrivacySettings", "load_participant_settings"]
