"""Property tests: for random n, t, m, ring and dropouts before every phase, the output is the plain sum of
the survivors' inputs bit for bit, and below the threshold the round aborts with no output (SECAGG.md)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tessera.secagg.config import AggregationConfig, Graph, SessionIds, minimum_threshold, neighbourhoods
from tessera.secagg.simulation import DropPoint, make_federation, simulate

from .conftest import seeded_rand

PHASES = list(DropPoint)


@st.composite
def scenarios(
    draw: st.DrawFn, graph: Graph
) -> tuple[AggregationConfig, dict[int, np.ndarray], dict[int, DropPoint], frozenset[int]]:
    n = draw(st.integers(min_value=3 if graph is Graph.FULL else 6, max_value=40))
    threshold = draw(st.integers(min_value=minimum_threshold(n), max_value=n))
    m = draw(st.integers(min_value=1, max_value=48))
    ring_bits = draw(st.sampled_from([32, 64]))
    extra = {}
    if graph is Graph.SPARSE:
        k = draw(st.sampled_from([k for k in range(2, n, 2)]))
        extra = {"neighbours": k, "neighbourhood_threshold": draw(st.integers((k + 1) // 2 + 1, k + 1))}
    config = AggregationConfig.create(
        ids=SessionIds(federation="prop", round=draw(st.integers(0, 2**40)), aggregation="p"),
        participants=range(1, n + 1),
        vector_length=m,
        ring_bits=ring_bits,
        threshold=threshold,
        graph=graph,
        graph_seed=draw(st.binary(min_size=32, max_size=32)),
        **extra,
    )
    # Most participants stay; some drop before a random phase (sometimes enough to fall below t).
    drop_rate = draw(st.sampled_from([0.0, 0.1, 0.3, 0.6]))
    dropouts = {}
    for u in config.participants:
        if draw(st.floats(0, 1)) < drop_rate:
            dropouts[u] = draw(st.sampled_from(PHASES))
    seed = draw(st.integers(0, 2**32))
    dtype = np.uint32 if ring_bits == 32 else np.uint64
    rng = np.random.default_rng(seed)
    inputs = {
        u: rng.integers(0, np.iinfo(dtype).max, m, dtype=dtype, endpoint=True) for u in config.participants
    }
    # Some participants mask ahead of ForwardedShares (as the services do), including ones whose
    # neighbours drop between ShareKeys and ForwardedShares: the sum must not care.
    premask = frozenset(u for u in config.participants if draw(st.booleans()))
    return config, inputs, dropouts, premask


def _alive(config: AggregationConfig, dropouts: dict[int, DropPoint], phase: DropPoint) -> set[int]:
    """Participants that answer in ``phase``."""
    return {
        u for u in config.participants if u not in dropouts or PHASES.index(dropouts[u]) > PHASES.index(phase)
    }


def _expected_full(config: AggregationConfig, dropouts: dict[int, DropPoint]) -> set[int] | None:
    """Oracle for the full graph: U3 if every phase keeps at least t participants, else None (abort)."""
    sets = [_alive(config, dropouts, phase) for phase in PHASES]
    if any(len(s) < config.threshold for s in sets):
        return None
    return sets[PHASES.index(DropPoint.MASKED_INPUT)]


def _plain_sum(inputs: dict[int, np.ndarray], members: frozenset[int] | set[int], m: int) -> np.ndarray:
    total = np.zeros(m, dtype=next(iter(inputs.values())).dtype)
    for u in members:
        total += inputs[u]
    return total


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(scenarios(Graph.FULL))
def test_full_graph_sum_is_exact_or_aborts(scenario: tuple) -> None:
    config, inputs, dropouts, premask = scenario
    roster, identities = make_federation(config.n, seeded_rand(config.ids.round))
    outcome = simulate(
        config, inputs, dropouts=dropouts, roster=roster, identities=identities, premask=premask
    )
    expected = _expected_full(config, dropouts)
    if expected is None:
        assert outcome.total is None
        assert outcome.abort_reason and "threshold" in outcome.abort_reason
    else:
        assert outcome.abort_reason is None
        assert outcome.survivors == expected
        assert outcome.total is not None
        assert np.array_equal(outcome.total, _plain_sum(inputs, expected, config.vector_length))
    assert not outcome.curator_errors


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(scenarios(Graph.SPARSE))
def test_sparse_graph_sum_is_exact_or_aborts_legitimately(scenario: tuple) -> None:
    config, inputs, dropouts, premask = scenario
    roster, identities = make_federation(config.n, seeded_rand(config.ids.round))
    outcome = simulate(
        config, inputs, dropouts=dropouts, roster=roster, identities=identities, premask=premask
    )
    u1 = _alive(config, dropouts, DropPoint.ADVERTISE)
    if outcome.total is not None:
        assert outcome.survivors <= _alive(config, dropouts, DropPoint.MASKED_INPUT)
        assert len(outcome.survivors) >= config.threshold
        assert np.array_equal(outcome.total, _plain_sum(inputs, outcome.survivors, config.vector_length))
    else:
        # Fails closed only for a reason: some phase or some neighbourhood fell below its threshold.
        assert outcome.abort_reason
        if len(u1) >= config.threshold:
            graph = outcome.neighbours
            final = _alive(config, dropouts, DropPoint.UNMASK) - {u for u, _ in outcome.participant_errors}
            u2 = _alive(config, dropouts, DropPoint.SHARE)
            short = [u for u in u2 if len((graph[u] | {u}) & final) < config.share_threshold(len(u1))]
            assert short or len(final) < config.threshold, outcome.abort_reason
    if not dropouts:
        assert outcome.total is not None


@pytest.mark.parametrize("graph", [Graph.FULL, Graph.SPARSE])
def test_masking_ahead_takes_out_the_masks_of_neighbours_that_dropped_before_sharing(graph: Graph) -> None:
    n, m = 12, 300
    rng = np.random.default_rng(8)
    inputs = {u: rng.integers(0, 2**32, m, dtype=np.uint32) for u in range(1, n + 1)}
    roster, identities = make_federation(n, seeded_rand(8))
    config = AggregationConfig.create(
        ids=SessionIds(federation="f", round=1, aggregation="premask"),
        participants=range(1, n + 1),
        vector_length=m,
        ring_bits=32,
        graph=graph,
        graph_seed=bytes(range(32)),
    )
    # 3 and 7 advertise keys, so everybody masks against them ahead, then send no shares.
    dropouts = {3: DropPoint.SHARE, 7: DropPoint.SHARE}
    outcomes = [
        simulate(config, inputs, dropouts=dropouts, roster=roster, identities=identities, premask=premask)
        for premask in (frozenset(), frozenset(range(1, n + 1)))
    ]
    survivors = frozenset(range(1, n + 1)) - {3, 7}
    for outcome in outcomes:
        assert outcome.survivors == survivors and outcome.total is not None
        assert np.array_equal(outcome.total, _plain_sum(inputs, survivors, m))


def test_sparse_and_full_graph_give_the_same_sum() -> None:
    n, m = 24, 200
    rng = np.random.default_rng(3)
    inputs = {u: rng.integers(0, 2**32, m, dtype=np.uint32) for u in range(1, n + 1)}
    roster, identities = make_federation(n, seeded_rand(3))
    dropouts = {4: DropPoint.MASKED_INPUT, 9: DropPoint.UNMASK}
    totals = []
    for graph in (Graph.FULL, Graph.SPARSE):
        config = AggregationConfig.create(
            ids=SessionIds(federation="f", round=1, aggregation=graph.value),
            participants=range(1, n + 1),
            vector_length=m,
            ring_bits=32,
            graph=graph,
            graph_seed=bytes(range(32)),
        )
        outcome = simulate(config, inputs, dropouts=dropouts, roster=roster, identities=identities)
        assert outcome.survivors == frozenset(range(1, n + 1)) - {4}
        totals.append(outcome.total)
    assert np.array_equal(totals[0], totals[1])
    assert np.array_equal(totals[0], _plain_sum(inputs, frozenset(range(1, n + 1)) - {4}, m))


def test_sparse_graph_is_symmetric_regular_and_deterministic() -> None:
    config = AggregationConfig.create(
        ids=SessionIds(federation="f", round=1, aggregation="g"),
        participants=range(1, 101),
        vector_length=1,
        ring_bits=32,
        graph=Graph.SPARSE,
        graph_seed=bytes(32),
    )
    members = set(range(1, 101)) - {7, 50}
    graph = neighbourhoods(config, members, seed=bytes(32))
    assert graph == neighbourhoods(config, sorted(members, reverse=True), seed=bytes(32))
    for u, vs in graph.items():
        assert len(vs) == config.neighbours and u not in vs
        assert all(u in graph[v] for v in vs)
