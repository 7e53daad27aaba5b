"""A federation's roster: its members' public identity keys and the parameters no curator may change.

Who makes what (docs/deploy.md walks through it):

1. **At each company**: ``tessera identity init`` creates the organisation's Ed25519 identity key where the
   participant runs (the private key never leaves that machine; the file is 0600) and prints the public key
   and its fingerprint, which the company sends to the coordinator.
2. **At the coordinator**: ``tessera roster build`` assembles the roster from the organisations' *public*
   keys and the federation's parameters, and prints the roster's fingerprint.
3. **Every company** compares that fingerprint out of band (it is short enough to read over the phone) and
   pins it in its participant's settings (``TESSERA_ROSTER_FINGERPRINT``): the participant refuses to start
   with any other roster, and refuses a round whose announcement names another roster.

The coordinator therefore never holds a company's signing key, which is what the active-adversary
protection of Bonawitz et al. rests on: a curator that could sign advertisements as the other companies
could simulate them all and unmask the one that is left. (``tessera roster init-demo`` still writes every
key in one place, for demos and tests only, and says so.)

The roster also fixes what a participant checks in every announcement (:class:`FederationParameters`): the
threshold rule, the smallest aggregation, the SecAgg+ graph and neighbourhood size, the layout of the
vector (ring, clipping, quantisation, weights) and the privacy mode. A curator announcing anything else is
refused.

File format (JSON), version 2::

    {"version": 2, "federation": "acme", "curator_user": "curator",
     "members": [{"organisation": "hospital-a", "index": 1, "identity_key": "<64 hex digits>"}, ...],
     "parameters": {"min_participants": 3, "threshold_fraction": null, "graph": "full", "neighbours": null,
                    "layout": {"ring_bits": 32, "clip": 0.5, "value_bits": null, "max_weight": 65535},
                    "privacy": {"mode": "local"}}}

A version 1 file (no ``parameters``) is read with the defaults. The fingerprint is the SHA-256 of the
canonical JSON of the whole roster (sorted keys, no spaces), so any change to a member, a key or a
parameter changes it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tessera.crypto import CryptoFailure, SigningKey, check_identity_public_key, group_hex
from tessera.errors import ConfigurationError
from tessera.fedavg import UpdateLayout, largest_value_bits
from tessera.secagg.config import ID_PATTERN, AggregationRules, Graph, Roster
from tessera.skellam import SkellamMechanism
from tessera.storage import atomic_write_bytes

RESERVED_IDS = frozenset({"curator", "guest", "all", "selected"})
Identifier = Annotated[str, Field(pattern=ID_PATTERN.pattern)]
FINGERPRINT_PATTERN = r"^[0-9a-f]{64}$"
SPARSE_FROM = 9
"""The SecAgg+ graph is used from this many invited participants on; below it every neighbourhood would be
almost everybody anyway, and the full graph is stronger."""


class Member(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    organisation: Identifier
    index: Annotated[int, Field(ge=1, le=10_000)]
    identity_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Ed25519 public key, hex")]


class LayoutParameters(BaseModel):
    """How updates are encoded into the ring (``tessera.fedavg.UpdateLayout``): the same at every party."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ring_bits: Literal[32, 64] = Field(default=32, description="masked vectors live in Z_(2^ring_bits)")
    clip: float = Field(
        default=0.5, gt=0, allow_inf_nan=False, description="update coordinates clipped to ±clip"
    )
    value_bits: int | None = Field(
        default=None,
        ge=2,
        le=53,
        description="bits per quantised coordinate (default: the most the ring allows)",
    )
    max_weight: int = Field(
        default=65_535,
        ge=1,
        le=2**40,
        description="largest training-sample count (FedAvg weight) of one member",
    )


class PrivacyMode(enum.Enum):
    """Where the differential-privacy noise comes from (docs/privacy-modes.md)."""

    LOCAL = "local"  # each organisation's DP-SGD adds all of its own noise to its update
    DISTRIBUTED = (
        "distributed"  # one DP-SGD step per aggregation; noise shares add up under secure aggregation
    )


class PrivacyParameters(BaseModel):
    """The privacy mode, and for distributed DP-SGD the mechanism every organisation runs
    (:mod:`tessera.skellam`): clipping norm C, resolution γC, noise multiplier z of the aggregate noise, and
    how many colluding survivors T the noise must withstand."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: PrivacyMode = Field(default=PrivacyMode.LOCAL, description="local or distributed")
    noise_multiplier: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="distributed: the aggregate noise's standard deviation in units of the L2 sensitivity",
    )
    clip_norm: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="distributed: per-example gradient clipping norm C",
    )
    resolution: float = Field(
        default=4096.0,
        ge=16,
        le=2.0**20,
        description="distributed: integer units per clipping norm (the scale γ is resolution / C)",
    )
    colluders: int = Field(
        default=0, ge=0, description="distributed: survivors that may collude with the curator (T)"
    )

    @model_validator(mode="after")
    def _complete(self) -> PrivacyParameters:
        distributed = self.mode is PrivacyMode.DISTRIBUTED
        if distributed and (self.noise_multiplier is None or self.clip_norm is None):
            raise ValueError("the distributed mode needs noise_multiplier and clip_norm")
        if not distributed and (
            self.noise_multiplier is not None or self.clip_norm is not None or self.colluders
        ):
            raise ValueError("noise_multiplier, clip_norm and colluders apply to the distributed mode only")
        return self

    def mechanism(self, dimension: int) -> SkellamMechanism:
        """The distributed mechanism for a model of ``dimension`` parameters."""
        if self.noise_multiplier is None or self.clip_norm is None:
            raise ConfigurationError("the local privacy mode has no federation-wide mechanism")
        return SkellamMechanism(
            clip=self.clip_norm,
            scale=self.resolution / self.clip_norm,
            dimension=dimension,
            noise_multiplier=self.noise_multiplier,
        )


class FederationParameters(BaseModel):
    """What the curator must not change on its own; every participant checks it in every announcement."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_participants: int = Field(
        default=3,
        ge=3,
        description="fewest participants an aggregation may invite (with two, each could subtract its own "
        "update from the sum)",
    )
    threshold_fraction: float | None = Field(
        default=None,
        gt=0.5,
        le=1,
        description="threshold as a fraction of the invited participants (default floor(2n/3)+1, never "
        "below floor(n/2)+1)",
    )
    graph: Graph = Field(
        default=Graph.FULL, description="full (Bonawitz) or sparse (SecAgg+, from 9 invited)"
    )
    neighbours: int | None = Field(
        default=None,
        ge=2,
        description="SecAgg+ neighbourhood size k, even (default: of order log n, tessera.secagg.config."
        "default_neighbours)",
    )
    layout: LayoutParameters = Field(default_factory=LayoutParameters)
    privacy: PrivacyParameters = Field(default_factory=PrivacyParameters)

    @model_validator(mode="after")
    def _neighbours_even(self) -> FederationParameters:
        if self.privacy.mode is PrivacyMode.DISTRIBUTED and self.layout.ring_bits != 64:
            raise ValueError(
                "the distributed privacy mode needs layout.ring_bits 64 (integer sums of gradients)"
            )
        if self.privacy.colluders >= self.min_participants:
            raise ValueError(
                f"privacy.colluders {self.privacy.colluders} must be below min_participants "
                f"{self.min_participants}: the noise would rest on nobody"
            )
        if self.neighbours is not None and self.neighbours % 2:
            raise ValueError(f"neighbours must be even, got {self.neighbours}")
        if self.neighbours is not None and self.graph is Graph.FULL:
            raise ValueError("neighbours applies to the sparse graph only")
        return self

    def rules(self) -> AggregationRules:
        """The aggregation rules these parameters fix (tessera.secagg.config.AggregationRules)."""
        return AggregationRules(
            min_participants=self.min_participants,
            threshold_fraction=self.threshold_fraction,
            graph=self.graph,
            neighbours=self.neighbours,
            sparse_from=SPARSE_FROM,
        )


class RosterFile(BaseModel):
    """The roster as stored on disk; validated strictly (unknown keys, duplicate ids or indices fail)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 2
    federation: Identifier
    curator_user: Identifier = "curator"
    members: tuple[Member, ...]
    parameters: FederationParameters = Field(default_factory=FederationParameters)

    @model_validator(mode="after")
    def _consistent(self) -> RosterFile:
        if self.version not in (1, 2):
            raise ValueError(
                f"roster version {self.version} is not supported (this build reads versions 1 and 2)"
            )
        orgs = [m.organisation for m in self.members]
        indices = [m.index for m in self.members]
        if len(set(orgs)) != len(orgs) or len(set(indices)) != len(indices):
            raise ValueError("organisation ids and indices must be unique")
        keys = [m.identity_key for m in self.members]
        if len(set(keys)) != len(keys):
            raise ValueError("two members have the same identity key")
        reserved = sorted(set(orgs) & RESERVED_IDS | ({self.curator_user} & set(orgs)))
        if reserved:
            raise ValueError(f"organisation ids {reserved} are reserved")
        if len(self.members) < 2:
            raise ValueError("a federation needs at least two organisations")
        if self.parameters.min_participants > len(self.members):
            raise ValueError(
                f"parameters.min_participants {self.parameters.min_participants} exceeds the "
                f"{len(self.members)} members"
            )
        for member in self.members:
            try:
                check_identity_public_key(bytes.fromhex(member.identity_key))
            except CryptoFailure as exc:
                raise ValueError(
                    f"identity key of {member.organisation!r} is not an Ed25519 public key"
                ) from exc
        return self

    # --- lookups ------------------------------------------------------------------------------------------

    @property
    def organisations(self) -> tuple[str, ...]:
        return tuple(m.organisation for m in self.members)

    def index_of(self, organisation: str) -> int:
        for member in self.members:
            if member.organisation == organisation:
                return member.index
        raise KeyError(organisation)

    def organisation_of(self, index: int) -> str:
        for member in self.members:
            if member.index == index:
                return member.organisation
        raise KeyError(index)

    def update_layout(self, *, num_params: int, num_classes: int) -> UpdateLayout:
        """The layout of the vector every member submits for a model of ``num_params`` parameters: the
        roster's encoding parameters, with a bit budget for all of its members."""
        layout = self.parameters.layout
        n = len(self.members)
        return UpdateLayout(
            num_params=num_params,
            num_classes=num_classes,
            clip=layout.clip,
            ring_bits=layout.ring_bits,
            value_bits=layout.value_bits
            or largest_value_bits(
                ring_bits=layout.ring_bits, max_weight=layout.max_weight, max_participants=n
            ),
            max_weight=layout.max_weight,
            max_participants=n,
        )

    def secagg_roster(self) -> Roster:
        return Roster({m.index: bytes.fromhex(m.identity_key) for m in self.members})

    def fingerprint(self) -> str:
        """SHA-256 (64 hex digits) of the canonical JSON of the roster: what each company pins."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"tessera-roster-v2\x00" + canonical.encode()).hexdigest()

    # --- files --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path, *, fingerprint: str | None = None) -> RosterFile:
        """Read and validate a roster; with ``fingerprint``, refuse any roster but the pinned one.

        ConfigurationError names the file and the problem.
        """
        try:
            roster = cls.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise ConfigurationError(f"roster file {path} does not exist") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "roster"
            raise ConfigurationError(f"roster file {path}: {where}: {first['msg']}") from exc
        if roster.version == 1:
            roster = roster.model_copy(update={"version": 2})
        if fingerprint is not None and not secure_fingerprint_equal(roster.fingerprint(), fingerprint):
            raise ConfigurationError(
                f"roster file {path} has fingerprint {roster.fingerprint()}, but this organisation pinned "
                f"{normalise_fingerprint(fingerprint)}: it is not the roster the companies agreed on. Compare "
                "fingerprints with the coordinator and the other companies before you change either"
            )
        return roster

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, (self.model_dump_json(indent=2) + "\n").encode())


def normalise_fingerprint(text: str) -> str:
    """A fingerprint as 64 lower-case hex digits, whatever spaces, colons or case it was written with."""
    return "".join(ch for ch in text.lower() if ch not in " :-\t\n")


def secure_fingerprint_equal(actual: str, pinned: str) -> bool:
    return hmac.compare_digest(normalise_fingerprint(actual), normalise_fingerprint(pinned))


def display_fingerprint(fingerprint: str) -> str:
    """For people: groups of four hex digits."""
    return group_hex(bytes.fromhex(normalise_fingerprint(fingerprint)))


# --- identity keys ----------------------------------------------------------------------------------------


def load_identity_key(path: Path) -> SigningKey:
    """Read an organisation's private identity key (64 hex digits); refuse a file others can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except FileNotFoundError as exc:
        raise ConfigurationError(
            f"identity key file {path} does not exist (create it with `tessera identity init`)"
        ) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and not os.environ.get("TESSERA_ALLOW_SHARED_KEY_FILE"):
        # Kubernetes Secret volumes default to 0644 via a symlink; operators set defaultMode 0400 (the chart does).
        raise ConfigurationError(
            f"identity key file {path} is readable by group or others (mode {stat.filemode(mode)}); chmod 600 it"
        )
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise ConfigurationError(f"identity key file {path} must hold 64 hex digits") from exc
    if len(raw) != 32:
        raise ConfigurationError(f"identity key file {path} must hold 64 hex digits")
    return SigningKey(raw)


def write_identity_key(path: Path, key: SigningKey) -> None:
    """Write a private identity key, 0600, refusing to replace an existing file (that would orphan the
    organisation's roster entry silently)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigurationError(
            f"identity key file {path} already exists; it is this organisation's identity in its roster. "
            "Remove it only if you mean to replace the identity (the coordinator must then rebuild the roster)"
        ) from exc
    with os.fdopen(fd, "w") as handle:
        handle.write(key.private_bytes().hex() + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def create_identity(path: Path, *, if_missing: bool = False) -> tuple[SigningKey, bool]:
    """The organisation's identity key at ``path``: created (0600) unless ``if_missing`` and it exists.

    Returns (key, created). Creating over an existing file is refused (see :func:`write_identity_key`).
    """
    if if_missing and path.exists():
        return load_identity_key(path), False
    key = SigningKey.generate()
    write_identity_key(path, key)
    return key, True


# --- building a roster ------------------------------------------------------------------------------------


def build_roster(
    federation: str,
    public_keys: Mapping[str, bytes],
    *,
    parameters: FederationParameters | None = None,
    curator_user: str = "curator",
) -> RosterFile:
    """A roster from the organisations' public keys (in the given order: roster index 1, 2, ...).

    ConfigurationError names the first invalid field (ids, reserved names, a key that is not Ed25519...).
    """
    try:
        members = tuple(
            Member(organisation=organisation, index=index, identity_key=bytes(key).hex())
            for index, (organisation, key) in enumerate(public_keys.items(), start=1)
        )
        return RosterFile(
            federation=federation,
            curator_user=curator_user,
            members=members,
            parameters=parameters or FederationParameters(),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "roster"
        raise ConfigurationError(f"{where}: {first['msg']} (got {first.get('input')!r})") from exc


def create_demo_federation(
    federation: str,
    organisations: list[str],
    directory: Path,
    *,
    curator_user: str = "curator",
    parameters: FederationParameters | None = None,
) -> RosterFile:
    """FOR DEMOS AND TESTS ONLY: every organisation's private key in ``directory/keys/`` and the roster in
    ``directory/roster.json``, all made in one place.

    Whoever holds these keys can act as every organisation; in a real federation each company creates its
    own key (``tessera identity init``) and the coordinator builds the roster from public keys only
    (``tessera roster build``). Refuses to overwrite an existing roster.
    """
    roster_path = directory / "roster.json"
    if roster_path.exists():
        raise ConfigurationError(f"{roster_path} already exists; remove it first to create a new federation")
    if len(set(organisations)) != len(organisations):
        raise ConfigurationError(f"organisation ids must be unique, got {organisations}")
    keys = {organisation: SigningKey.generate() for organisation in organisations}
    roster = build_roster(
        federation,
        {o: k.public_bytes for o, k in keys.items()},
        parameters=parameters,
        curator_user=curator_user,
    )
    for organisation, key in keys.items():
        write_identity_key(directory / "keys" / f"{organisation}.key", key)
    roster.save(roster_path)
    return roster


__all__ = [
    "FINGERPRINT_PATTERN",
    "RESERVED_IDS",
    "FederationParameters",
    "LayoutParameters",
    "Member",
    "PrivacyMode",
    "PrivacyParameters",
    "RosterFile",
    "build_roster",
    "create_demo_federation",
    "create_identity",
    "display_fingerprint",
    "load_identity_key",
    "normalise_fingerprint",
    "secure_fingerprint_equal",
    "write_identity_key",
]
