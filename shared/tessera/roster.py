"""A federation's roster: which organisations take part, their roster index and Ed25519 identity key.

The roster is public: the coordinator creates it (``tessera roster init``) and hands the same file to every
party. Each organisation keeps the private half of its identity key to itself (a Kubernetes Secret, a file
with mode 0600). The roster index is the organisation's Shamir x-coordinate in secure aggregation.

File format (JSON)::

    {"version": 1, "federation": "acme", "curator_user": "curator",
     "members": [{"organisation": "hospital-a", "index": 1, "identity_key": "<64 hex digits>"}, ...]}
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tessera.crypto import SigningKey
from tessera.errors import ConfigurationError
from tessera.secagg.config import ID_PATTERN, Roster
from tessera.storage import atomic_write_bytes

RESERVED_IDS = frozenset({"curator", "guest", "all", "selected"})
Identifier = Annotated[str, Field(pattern=ID_PATTERN.pattern)]


class Member(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    organisation: Identifier
    index: Annotated[int, Field(ge=1, le=10_000)]
    identity_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="Ed25519 public key, hex")]


class RosterFile(BaseModel):
    """The roster as stored on disk; validated strictly (unknown keys, duplicate ids or indices fail)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 1
    federation: Identifier
    curator_user: Identifier = "curator"
    members: tuple[Member, ...]

    @model_validator(mode="after")
    def _consistent(self) -> RosterFile:
        if self.version != 1:
            raise ValueError(f"roster version {self.version} is not supported (this build reads version 1)")
        orgs = [m.organisation for m in self.members]
        indices = [m.index for m in self.members]
        if len(set(orgs)) != len(orgs) or len(set(indices)) != len(indices):
            raise ValueError("organisation ids and indices must be unique")
        reserved = sorted(set(orgs) & RESERVED_IDS | ({self.curator_user} & set(orgs)))
        if reserved:
            raise ValueError(f"organisation ids {reserved} are reserved")
        if len(self.members) < 2:
            raise ValueError("a federation needs at least two organisations")
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

    def secagg_roster(self) -> Roster:
        return Roster({m.index: bytes.fromhex(m.identity_key) for m in self.members})

    # --- files --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> RosterFile:
        """Read and validate a roster; ConfigurationError names the file and the problem."""
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise ConfigurationError(f"roster file {path} does not exist") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "roster"
            raise ConfigurationError(f"roster file {path}: {where}: {first['msg']}") from exc

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, (self.model_dump_json(indent=2) + "\n").encode())


def load_identity_key(path: Path) -> SigningKey:
    """Read an organisation's private identity key (64 hex digits); refuse a file others can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except FileNotFoundError as exc:
        raise ConfigurationError(f"identity key file {path} does not exist") from exc
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.private_bytes().hex() + "\n")


def create_federation(
    federation: str, organisations: list[str], directory: Path, *, curator_user: str = "curator"
) -> RosterFile:
    """Generate identity keys for ``organisations`` into ``directory/keys/`` and write ``directory/roster.json``.

    Refuses to overwrite an existing roster (keys would silently change under running participants).
    """
    roster_path = directory / "roster.json"
    if roster_path.exists():
        raise ConfigurationError(f"{roster_path} already exists; remove it first to create a new federation")
    keys = {organisation: SigningKey.generate() for organisation in organisations}
    try:
        members = tuple(
            Member(organisation=organisation, index=index, identity_key=keys[organisation].public_bytes.hex())
            for index, organisation in enumerate(organisations, start=1)
        )
        roster = RosterFile(federation=federation, curator_user=curator_user, members=members)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "roster"
        raise ConfigurationError(f"{where}: {first['msg']} (got {first.get('input')!r})") from exc
    for organisation, key in keys.items():
        write_identity_key(directory / "keys" / f"{organisation}.key", key)
    roster.save(roster_path)
    return roster


__all__ = [
    "RESERVED_IDS",
    "Member",
    "RosterFile",
    "create_federation",
    "load_identity_key",
    "write_identity_key",
]
