"""Dropout-tolerant secure aggregation (Bonawitz et al. 2017; SecAgg+ sparse graph of Bell et al. 2020).

Sans-I/O: :class:`ParticipantSession` and :class:`CuratorSession` take messages and return messages, with
time and randomness passed in. :mod:`tessera.secagg.wire` turns messages into bytes and back;
:func:`simulate` runs a whole aggregation in process. See ``../shared/design/SECAGG.md``.
"""

from tessera.secagg.config import AggregationConfig, Graph, ParticipantPolicy, Roster, SessionIds
from tessera.secagg.curator import AggregationResult, CuratorPhase, CuratorSession, Outgoing, PhaseTimeouts
from tessera.secagg.participant import ParticipantSession, ParticipantState
from tessera.secagg.simulation import DropPoint, SimulationResult, make_federation, simulate
from tessera.secagg.wire import WireLimits, decode, encode

__all__ = [
    "AggregationConfig",
    "AggregationResult",
    "CuratorPhase",
    "CuratorSession",
    "DropPoint",
    "Graph",
    "Outgoing",
    "ParticipantPolicy",
    "ParticipantSession",
    "ParticipantState",
    "PhaseTimeouts",
    "Roster",
    "SessionIds",
    "SimulationResult",
    "WireLimits",
    "decode",
    "encode",
    "make_federation",
    "simulate",
]
