"""A step-by-step harness: a curator and n participants driven against each other in memory.

Unlike the simulation driver, it stops between phases so tests can tamper with, replay, drop or inject
messages, and check that state did not change.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from tessera.crypto import SigningKey
from tessera.secagg.config import AggregationConfig, Graph, ParticipantPolicy, Roster, SessionIds
from tessera.secagg.curator import CuratorSession, Outgoing
from tessera.secagg.messages import ParticipantMessage, RingVector
from tessera.secagg.participant import ParticipantSession


def seeded_rand(seed: int) -> Callable[[int], bytes]:
    """Deterministic bytes for reproducible tests (never used outside tests)."""
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


@dataclass
class Harness:
    config: AggregationConfig
    roster: Roster
    identities: dict[int, SigningKey]
    inputs: dict[int, RingVector]
    participants: dict[int, ParticipantSession]
    curator: CuratorSession
    now: float = 0.0
    pending: list[Outgoing] = field(default_factory=list)
    replies: list[tuple[int, ParticipantMessage]] = field(default_factory=list)

    def start(self) -> None:
        self.pending = self.curator.start(self.now)

    def deliver(self, *, skip: frozenset[int] = frozenset()) -> list[tuple[int, ParticipantMessage]]:
        """Hand every pending curator message to its recipients; collect their replies (not yet delivered)."""
        self.replies = []
        for item in self.pending:
            for u in item.recipients:
                if u not in skip:
                    self.replies.extend((u, m) for m in self.participants[u].receive(item.message))
        self.pending = []
        return self.replies

    def collect(self, *, skip: frozenset[int] = frozenset(), close: bool = True) -> list[Outgoing]:
        """Feed the collected replies to the curator; then close the phase by deadline if it is still open."""
        out: list[Outgoing] = []
        for u, message in self.replies:
            if u not in skip:
                out.extend(self.curator.receive(u, message, self.now))
        self.replies = []
        if close and not out and not self.curator.finished:
            assert self.curator.next_deadline is not None
            self.now = self.curator.next_deadline
            out = self.curator.poll(self.now)
        self.pending = out
        return out

    def step(self, *, skip: frozenset[int] = frozenset()) -> list[Outgoing]:
        self.deliver(skip=skip)
        return self.collect()

    def run(self) -> None:
        while self.pending:
            self.step()

    def plain_sum(self, members: frozenset[int] | set[int]) -> RingVector:
        total = np.zeros(self.config.vector_length, dtype=self.inputs[next(iter(self.inputs))].dtype)
        for u in members:
            total += self.inputs[u]
        return total


def make_harness(
    n: int = 5,
    *,
    m: int = 16,
    ring_bits: int = 32,
    threshold: int | None = None,
    graph: Graph = Graph.FULL,
    seed: int = 1,
    round_id: int = 1,
    aggregation: str = "a0",
) -> Harness:
    rand = seeded_rand(seed)
    identities = {u: SigningKey.generate(rand) for u in range(1, n + 1)}
    roster = Roster({u: k.public_bytes for u, k in identities.items()})
    config = AggregationConfig.create(
        ids=SessionIds(federation="fed", round=round_id, aggregation=aggregation),
        participants=range(1, n + 1),
        vector_length=m,
        ring_bits=32 if ring_bits == 32 else 64,
        threshold=threshold,
        graph=graph,
        graph_seed=rand(32),
    )
    dtype = np.uint32 if ring_bits == 32 else np.uint64
    rng = np.random.default_rng(seed)
    inputs = {u: rng.integers(0, np.iinfo(dtype).max, m, dtype=dtype, endpoint=True) for u in identities}
    policy = ParticipantPolicy(federation="fed", vector_length=m, ring_bits=config.ring_bits)
    participants = {
        u: ParticipantSession(
            index=u, identity=identities[u], roster=roster, policy=policy, vector=inputs[u], rand=rand
        )
        for u in identities
    }
    curator = CuratorSession(config=config, roster=roster)
    return Harness(config, roster, identities, inputs, participants, curator)


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    yield make_harness
