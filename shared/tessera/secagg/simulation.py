"""In-process driver: one aggregation with n participants and a dropout schedule, no broker.

Every message goes through the real wire format (encoded by its sender, decoded by its receiver with the
limits of the configuration), so what it measures -- bytes and seconds per party and phase -- is what the
services pay, minus the network. Used by the tests, the benchmark and research at large n.
"""

from __future__ import annotations

import enum
import time
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from tessera.crypto import RandomSource, SigningKey, system_random
from tessera.errors import ProtocolError
from tessera.secagg.config import AggregationConfig, ParticipantPolicy, Roster
from tessera.secagg.curator import CuratorSession, Outgoing, PhaseTimeouts
from tessera.secagg.messages import (
    AdvertisedKeys,
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShares,
    ForwardedShares,
    MaskedInput,
    ParticipantMessage,
    RingVector,
    StartAggregation,
    SurvivorList,
    UnmaskRequest,
    UnmaskShares,
)
from tessera.secagg.participant import ParticipantSession
from tessera.secagg.wire import WireLimits, decode, encode


class DropPoint(enum.Enum):
    """The phase a participant vanishes before: it sends nothing in that phase or after."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked_input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"


# Which curator message asks for which phase's answer.
_PHASE_OF: dict[type, DropPoint] = {
    StartAggregation: DropPoint.ADVERTISE,
    AdvertisedKeys: DropPoint.SHARE,
    ForwardedShares: DropPoint.MASKED_INPUT,
    SurvivorList: DropPoint.CONSISTENCY,
    UnmaskRequest: DropPoint.UNMASK,
}
_ORDER = list(DropPoint)
_REPLY_TYPES = (AdvertiseKeys, EncryptedShares, MaskedInput, ConsistencySignature, UnmaskShares)


@dataclass(kw_only=True, eq=False)
class SimulationResult:
    """What one simulated aggregation produced and cost."""

    total: RingVector | None
    survivors: frozenset[int]
    abort_reason: str | None
    participant_seconds: dict[int, dict[str, float]] = field(default_factory=dict)
    curator_seconds: dict[str, float] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    curator_view: list[tuple[int, ParticipantMessage]] = field(default_factory=list)
    bad_share_senders: frozenset[int] = frozenset()
    # The graph the curator derived after AdvertiseKeys (everyone but itself, for the full graph).
    neighbours: Mapping[int, frozenset[int]] = field(default_factory=dict)
    participant_errors: list[tuple[int, ProtocolError]] = field(default_factory=list)
    curator_errors: list[tuple[int, ProtocolError]] = field(default_factory=list)


def make_federation(n: int, rand: RandomSource = system_random) -> tuple[Roster, dict[int, SigningKey]]:
    """Identity keys for participants 1..n and the roster holding their public halves."""
    keys = {u: SigningKey.generate(rand) for u in range(1, n + 1)}
    return Roster({u: k.public_bytes for u, k in keys.items()}), keys


def simulate(
    config: AggregationConfig,
    inputs: Mapping[int, RingVector],
    *,
    dropouts: Mapping[int, DropPoint] | None = None,
    roster: Roster | None = None,
    identities: Mapping[int, SigningKey] | None = None,
    rand: RandomSource = system_random,
    record_view: bool = False,
    premask: Collection[int] = (),
) -> SimulationResult:
    """Run one aggregation in process; ``inputs`` maps each invited participant to its ring vector.

    Participants in ``premask`` compute their masked input right after sending their shares
    (:meth:`ParticipantSession.prepare_masked_input`, as the services do), the others on ForwardedShares.
    """
    dropouts = dict(dropouts or {})
    if roster is None or identities is None:
        roster, identities = make_federation(max(config.participants), rand)
    limits = WireLimits.for_config(config)
    policy = ParticipantPolicy(
        federation=config.ids.federation, vector_length=config.vector_length, ring_bits=config.ring_bits
    )
    participants = {
        u: ParticipantSession(
            index=u, identity=identities[u], roster=roster, policy=policy, vector=inputs[u], rand=rand
        )
        for u in config.participants
    }
    curator = CuratorSession(config=config, roster=roster, timeouts=PhaseTimeouts())
    result = SimulationResult(total=None, survivors=frozenset(), abort_reason=None)
    seconds: dict[int, dict[str, float]] = {u: defaultdict(float) for u in config.participants}
    curator_seconds: dict[str, float] = defaultdict(float)
    bytes_up: dict[int, int] = defaultdict(int)
    bytes_down: dict[int, int] = defaultdict(int)
    clock = 0.0

    def timed_curator(phase: str, fn: object, *args: object) -> list[Outgoing]:
        started = time.perf_counter()
        out: list[Outgoing] = fn(*args)  # type: ignore[operator]
        curator_seconds[phase] += time.perf_counter() - started
        return out

    started = time.perf_counter()
    outgoing = curator.start(clock)
    curator_seconds["advertise"] += time.perf_counter() - started
    while outgoing:
        replies: list[tuple[int, bytes]] = []
        for item in outgoing:
            phase = _PHASE_OF.get(type(item.message))
            encode_started = time.perf_counter()
            payload = encode(item.message)
            curator_seconds[(phase or DropPoint.UNMASK).value] += time.perf_counter() - encode_started
            for u in item.recipients:
                drop = dropouts.get(u)
                if phase is None or (drop is not None and _ORDER.index(drop) <= _ORDER.index(phase)):
                    # Abort messages and messages to vanished participants are not answered.
                    if phase is None and drop is None:
                        participants[u].receive(decode(payload, limits))  # type: ignore[arg-type]
                    continue
                bytes_down[u] += len(payload)
                t0 = time.perf_counter()
                try:
                    answers = participants[u].receive(decode(payload, limits))  # type: ignore[arg-type]
                except ProtocolError as exc:
                    # The participant refuses this step (e.g. too few neighbours left): it stops answering.
                    result.participant_errors.append((u, exc))
                    dropouts[u] = phase
                    answers = []
                encoded = [encode(a) for a in answers]
                if u in premask:
                    participants[u].prepare_masked_input()
                seconds[u][phase.value] += time.perf_counter() - t0
                for data in encoded:
                    bytes_up[u] += len(data)
                    replies.append((u, data))
        outgoing = []
        for u, data in replies:
            t0 = time.perf_counter()
            message = decode(data, limits)
            assert isinstance(message, _REPLY_TYPES)
            phase_name = curator.phase.value
            if record_view:
                result.curator_view.append((u, message))
            try:
                outgoing.extend(curator.receive(u, message, clock))
            except ProtocolError as exc:
                result.curator_errors.append((u, exc))
            curator_seconds[phase_name] += time.perf_counter() - t0
        if not outgoing and not curator.finished:
            # Somebody vanished: let the phase deadline pass.
            assert curator.next_deadline is not None
            clock = curator.next_deadline
            outgoing = timed_curator(curator.phase.value, curator.poll, clock)

    result.participant_seconds = {u: dict(p) for u, p in seconds.items()}
    result.curator_seconds = dict(curator_seconds)
    result.bytes_up = dict(bytes_up)
    result.bytes_down = dict(bytes_down)
    result.neighbours = dict(curator.neighbours)
    if curator.result is not None:
        result.total = curator.result.total
        result.survivors = curator.result.survivors
        result.bad_share_senders = curator.result.bad_share_senders
    else:
        result.abort_reason = curator.abort_reason
    return result


__all__ = ["DropPoint", "SimulationResult", "make_federation", "simulate"]
