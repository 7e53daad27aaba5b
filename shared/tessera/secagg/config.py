"""What every party must agree on before an aggregation starts: ids, roster, threshold, sizes, graph.

The curator builds an :class:`AggregationConfig` and sends it in the first message; each participant checks it
against its own :class:`ParticipantPolicy` before doing anything (PITFALLS.md: Flower crashed every client
with a config it only fixed up on the server). Both sides call :meth:`AggregationConfig.validate`.
"""

from __future__ import annotations

import enum
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from tessera.crypto import KEY_BYTES, digest
from tessera.errors import ConfigurationError

ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
AGGREGATION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_PARTICIPANTS = 10_000
MAX_VECTOR_LENGTH = 1 << 31
RingBits = Literal[32, 64]


class Graph(enum.Enum):
    """Who masks against and shares with whom: everyone (Bonawitz) or a sparse Harary graph (SecAgg+)."""

    FULL = "full"
    SPARSE = "sparse"


@dataclass(frozen=True, kw_only=True)
class SessionIds:
    """(federation, round, aggregation): everything signed, encrypted or derived is bound to these."""

    federation: str
    round: int
    aggregation: str

    def __post_init__(self) -> None:
        if not ID_PATTERN.match(self.federation):
            raise ConfigurationError(f"federation id {self.federation!r} must match {ID_PATTERN.pattern}")
        if not 0 <= self.round < 2**63:
            raise ConfigurationError(f"round {self.round} must be in [0, 2^63)")
        if not AGGREGATION_ID_PATTERN.match(self.aggregation):
            raise ConfigurationError(
                f"aggregation id {self.aggregation!r} must match {AGGREGATION_ID_PATTERN.pattern}"
            )

    def context(self) -> bytes:
        """Canonical, unambiguous bytes of the ids (length-prefixed), used as signing/KDF context."""
        fed = self.federation.encode()
        agg = self.aggregation.encode()
        return (
            b"tessera-secagg-v1"
            + struct.pack(">B", len(fed))
            + fed
            + struct.pack(">QB", self.round, len(agg))
            + agg
        )

    def __str__(self) -> str:
        return f"{self.federation}/{self.round}/{self.aggregation}"


@dataclass(frozen=True)
class Roster:
    """The federation's members: roster index (1-based, the Shamir x-coordinate) -> Ed25519 public key."""

    identity_keys: Mapping[int, bytes]

    def __post_init__(self) -> None:
        for index, key in self.identity_keys.items():
            if not 1 <= index <= MAX_PARTICIPANTS:
                raise ConfigurationError(f"roster index {index} must be in [1, {MAX_PARTICIPANTS}]")
            if len(key) != KEY_BYTES:
                raise ConfigurationError(f"identity key of participant {index} must be {KEY_BYTES} bytes")

    def __contains__(self, index: object) -> bool:
        return index in self.identity_keys

    def key(self, index: int) -> bytes:
        return self.identity_keys[index]


def default_threshold(n: int) -> int:
    """floor(2n/3) + 1 (SECAGG.md), capped at n."""
    return min(n, 2 * n // 3 + 1)


def minimum_threshold(n: int) -> int:
    """floor(n/2) + 1: below it two disjoint halves could each reconstruct (SECAGG.md)."""
    return n // 2 + 1


def default_neighbours(n: int) -> int:
    """Degree of the SecAgg+ graph: an even number of order log n (Bell et al. 2020)."""
    k = 2 * max(1, (n - 1).bit_length())
    return min(k, n - 1 if (n - 1) % 2 == 0 else n - 2)


@dataclass(frozen=True, kw_only=True)
class AggregationConfig:
    """Parameters of one aggregation. ``participants`` are roster indices invited to it."""

    ids: SessionIds
    participants: tuple[int, ...]
    threshold: int
    vector_length: int
    ring_bits: RingBits
    graph: Graph = Graph.FULL
    neighbours: int = 0
    neighbourhood_threshold: int = 0
    graph_seed: bytes = field(default=bytes(KEY_BYTES))

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n(self) -> int:
        return len(self.participants)

    def validate(self) -> None:
        """Raise ConfigurationError naming the field if the configuration cannot work safely."""
        n = self.n
        if n < 2 or n > MAX_PARTICIPANTS:
            raise ConfigurationError(f"participants: {n} invited; need between 2 and {MAX_PARTICIPANTS}")
        if list(self.participants) != sorted(set(self.participants)) or self.participants[0] < 1:
            raise ConfigurationError("participants must be distinct roster indices >= 1, in ascending order")
        if not minimum_threshold(n) <= self.threshold <= n:
            raise ConfigurationError(
                f"threshold {self.threshold} must be between floor(n/2)+1 = {minimum_threshold(n)} and n = {n}"
            )
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            raise ConfigurationError(
                f"vector_length {self.vector_length} must be in [1, {MAX_VECTOR_LENGTH}]"
            )
        if self.ring_bits not in (32, 64):
            raise ConfigurationError(f"ring_bits {self.ring_bits} must be 32 or 64")
        if len(self.graph_seed) != KEY_BYTES:
            raise ConfigurationError(f"graph_seed must be {KEY_BYTES} bytes")
        if self.graph is Graph.SPARSE:
            k = self.neighbours
            if k < 2 or k % 2 or k >= n:
                raise ConfigurationError(f"neighbours {k} must be even, at least 2 and below n = {n}")
            holders = k + 1
            if not holders // 2 + 1 <= self.neighbourhood_threshold <= holders:
                raise ConfigurationError(
                    f"neighbourhood_threshold {self.neighbourhood_threshold} must be between "
                    f"floor((k+1)/2)+1 = {holders // 2 + 1} and k+1 = {holders}"
                )
        elif self.neighbours or self.neighbourhood_threshold:
            raise ConfigurationError("neighbours and neighbourhood_threshold apply to the sparse graph only")

    def is_sparse_for(self, advertised: int) -> bool:
        """Whether the SecAgg+ graph is really sparse once ``advertised`` (|U1|) participants are known."""
        return self.graph is Graph.SPARSE and self.neighbours < advertised - 1

    def share_threshold(self, advertised: int) -> int:
        """Shares needed to reconstruct one participant's secret, given |U1| = ``advertised``.

        A sparse graph that degenerates to the full graph (k >= |U1| - 1) falls back to the global threshold,
        which |U1| always meets.
        """
        return self.neighbourhood_threshold if self.is_sparse_for(advertised) else self.threshold

    @classmethod
    def create(
        cls,
        *,
        ids: SessionIds,
        participants: Iterable[int],
        vector_length: int,
        ring_bits: RingBits,
        threshold: int | None = None,
        graph: Graph = Graph.FULL,
        neighbours: int | None = None,
        neighbourhood_threshold: int | None = None,
        graph_seed: bytes | None = None,
    ) -> AggregationConfig:
        """A configuration with the documented defaults filled in."""
        members = tuple(sorted(set(participants)))
        n = len(members)
        k = nt = 0
        if graph is Graph.SPARSE:
            k = neighbours if neighbours is not None else default_neighbours(n)
            nt = neighbourhood_threshold if neighbourhood_threshold is not None else default_threshold(k + 1)
        return cls(
            ids=ids,
            participants=members,
            threshold=threshold if threshold is not None else default_threshold(n),
            vector_length=vector_length,
            ring_bits=ring_bits,
            graph=graph,
            neighbours=k,
            neighbourhood_threshold=nt,
            graph_seed=graph_seed if graph_seed is not None else bytes(KEY_BYTES),
        )


@dataclass(frozen=True, kw_only=True)
class AggregationRules:
    """The federation's rules for every aggregation (fixed in the roster, checked by every participant):
    the smallest aggregation, the threshold, and the graph.

    ``threshold_fraction`` None means floor(2n/3)+1; a fraction f means ceil(f·n), never below
    floor(n/2)+1. The sparse graph applies from ``sparse_from`` invited participants on, with neighbourhoods
    of ``neighbours`` (default: :func:`default_neighbours`).
    """

    min_participants: int = 3
    threshold_fraction: float | None = None
    graph: Graph = Graph.FULL
    neighbours: int | None = None
    sparse_from: int = 9

    def threshold(self, invited: int) -> int:
        """The threshold an aggregation over ``invited`` participants must use (at least)."""
        if self.threshold_fraction is None:
            return default_threshold(invited)
        return max(
            minimum_threshold(invited), min(invited, math.ceil(self.threshold_fraction * invited - 1e-9))
        )

    def graph_for(self, invited: int) -> Graph:
        return Graph.SPARSE if self.graph is Graph.SPARSE and invited >= self.sparse_from else Graph.FULL

    def neighbours_for(self, invited: int) -> int:
        """The SecAgg+ neighbourhood size for ``invited`` participants (even, below ``invited``)."""
        k = self.neighbours if self.neighbours is not None else default_neighbours(invited)
        return min(k, invited - 1 if (invited - 1) % 2 == 0 else invited - 2)

    def check(self, config: AggregationConfig) -> None:
        """Raise ConfigurationError if ``config`` is weaker than these rules allow."""
        n = config.n
        if n < self.min_participants:
            raise ConfigurationError(
                f"{n} participants invited, the federation's minimum is {self.min_participants}"
            )
        required = self.threshold(n)
        if config.threshold < required:
            raise ConfigurationError(
                f"threshold {config.threshold} is below the federation's {required} for {n} participants"
            )
        if config.graph is Graph.SPARSE:
            if self.graph_for(n) is Graph.FULL:
                raise ConfigurationError("the federation uses the full graph; a sparse graph is refused")
            k = self.neighbours_for(n)
            if config.neighbours < k:
                raise ConfigurationError(f"{config.neighbours} neighbours, the federation's minimum is {k}")
            floor = default_threshold(config.neighbours + 1)
            if config.neighbourhood_threshold < floor:
                raise ConfigurationError(
                    f"neighbourhood threshold {config.neighbourhood_threshold} is below {floor} for "
                    f"{config.neighbours} neighbours"
                )


@dataclass(frozen=True, kw_only=True)
class ParticipantPolicy:
    """What a participant accepts from a curator, checked before it joins an aggregation."""

    federation: str
    vector_length: int
    ring_bits: RingBits
    min_threshold: int | None = None  # None: floor(n/2)+1 of the invited set (and the rules' threshold)
    allow_sparse: bool = True
    rules: AggregationRules | None = None

    def check(self, config: AggregationConfig, own_index: int) -> None:
        """Raise ConfigurationError if the curator's configuration is not acceptable to this participant."""
        if config.ids.federation != self.federation:
            raise ConfigurationError(f"federation {config.ids.federation!r} is not {self.federation!r}")
        if own_index not in config.participants:
            raise ConfigurationError(f"participant {own_index} is not invited to {config.ids}")
        if config.vector_length != self.vector_length:
            raise ConfigurationError(
                f"vector_length {config.vector_length} differs from this participant's {self.vector_length}"
            )
        if config.ring_bits != self.ring_bits:
            raise ConfigurationError(
                f"ring_bits {config.ring_bits} differs from this participant's {self.ring_bits}"
            )
        floor = self.min_threshold if self.min_threshold is not None else minimum_threshold(config.n)
        if config.threshold < floor:
            raise ConfigurationError(
                f"threshold {config.threshold} is below this participant's minimum {floor}"
            )
        if config.graph is Graph.SPARSE and not self.allow_sparse:
            raise ConfigurationError("this participant does not accept the sparse (SecAgg+) graph")
        if self.rules is not None:
            self.rules.check(config)


def neighbourhoods(
    config: AggregationConfig, members: Iterable[int], *, seed: bytes | None = None
) -> dict[int, frozenset[int]]:
    """Each member's neighbours among ``members`` (U1): everyone else, or the SecAgg+ Harary graph.

    The sparse graph is a Harary graph H(k, |U1|) over a permutation of U1 derived from ``seed`` (default:
    the config's graph seed), so every party computes the same symmetric graph from the same inputs (Bell et
    al. 2020). The protocol passes the seed :func:`tessera.secagg._common.graph_seed` derives from the
    advertisements of U1, which the curator cannot choose.
    """
    ordered = sorted(set(members))
    if not config.is_sparse_for(len(ordered)):
        everyone = frozenset(ordered)
        return {u: everyone - {u} for u in ordered}
    seed = (config.graph_seed if seed is None else seed) + config.ids.context()
    ring = sorted(ordered, key=lambda u: digest(seed + struct.pack(">I", u)))
    half = config.neighbours // 2
    size = len(ring)
    graph: dict[int, set[int]] = {u: set() for u in ring}
    for position, u in enumerate(ring):
        for step in range(1, half + 1):
            v = ring[(position + step) % size]
            graph[u].add(v)
            graph[v].add(u)
    return {u: frozenset(vs) for u, vs in graph.items()}


__all__ = [
    "ID_PATTERN",
    "AggregationConfig",
    "AggregationRules",
    "Graph",
    "ParticipantPolicy",
    "RingBits",
    "Roster",
    "SessionIds",
    "default_neighbours",
    "default_threshold",
    "minimum_threshold",
    "neighbourhoods",
]
