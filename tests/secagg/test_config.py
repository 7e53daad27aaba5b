"""Configuration is validated once, on both sides, before a round starts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tessera.errors import ConfigurationError, ProtocolError
from tessera.secagg.config import AggregationConfig, Graph, ParticipantPolicy, SessionIds
from tessera.secagg.messages import StartAggregation
from tessera.secagg.participant import ParticipantState

from .conftest import make_harness

IDS = SessionIds(federation="fed", round=1, aggregation="a0")


def test_defaults_follow_secagg_md() -> None:
    config = AggregationConfig.create(ids=IDS, participants=range(1, 51), vector_length=10, ring_bits=32)
    assert config.threshold == 34  # floor(2n/3) + 1
    sparse = AggregationConfig.create(
        ids=IDS, participants=range(1, 201), vector_length=10, ring_bits=32, graph=Graph.SPARSE
    )
    assert sparse.neighbours % 2 == 0 and 8 <= sparse.neighbours <= 20


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"threshold": 2}, "threshold 2 must be between floor\\(n/2\\)\\+1 = 3"),
        ({"threshold": 6}, "and n = 5"),
        ({"vector_length": 0}, "vector_length 0"),
        ({"ring_bits": 16}, "ring_bits 16"),
        ({"participants": (1, 1, 2, 3, 4)}, "distinct roster indices"),
        ({"graph": Graph.SPARSE, "neighbours": 3, "neighbourhood_threshold": 3}, "neighbours 3 must be even"),
        ({"neighbours": 2}, "sparse graph only"),
    ],
)
def test_invalid_configurations_name_the_field(changes: dict, message: str) -> None:
    base = AggregationConfig.create(ids=IDS, participants=range(1, 6), vector_length=10, ring_bits=32)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)} | changes
    with pytest.raises(ConfigurationError, match=message):
        AggregationConfig(**fields)


def test_ids_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="federation id"):
        SessionIds(federation="Bad Fed", round=1, aggregation="a")
    with pytest.raises(ConfigurationError, match="round"):
        SessionIds(federation="fed", round=-1, aggregation="a")


def test_participant_refuses_a_configuration_its_policy_rejects() -> None:
    h = make_harness(5, m=16)
    h.start()
    start = h.pending[0].message
    assert isinstance(start, StartAggregation)
    p = h.participants[1]
    low = object.__new__(AggregationConfig)  # a hostile curator skips its own validation
    for f in dataclasses.fields(start.config):
        object.__setattr__(low, f.name, getattr(start.config, f.name))
    object.__setattr__(low, "threshold", 1)
    with pytest.raises(ProtocolError, match="threshold 1 must be between"):
        p.receive(StartAggregation(config=low))
    other_length = dataclasses.replace(start.config, vector_length=17)
    with pytest.raises(ProtocolError, match="vector_length 17 differs"):
        p.receive(StartAggregation(config=other_length))
    strict = ParticipantPolicy(federation="fed", vector_length=16, ring_bits=32, min_threshold=5)
    with pytest.raises(ConfigurationError, match="below this participant's minimum 5"):
        strict.check(start.config, 1)
    assert p.state is ParticipantState.READY
    assert p.receive(start)


def test_participant_input_must_match_its_policy() -> None:
    h = make_harness(3, m=4)
    from tessera.errors import LocalUsageError
    from tessera.secagg.participant import ParticipantSession

    with pytest.raises(LocalUsageError, match="length 4"):
        ParticipantSession(
            index=1,
            identity=h.identities[1],
            roster=h.roster,
            policy=ParticipantPolicy(federation="fed", vector_length=4, ring_bits=32),
            vector=np.zeros(5, dtype=np.uint32),
        )
