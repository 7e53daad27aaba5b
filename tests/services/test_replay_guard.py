"""The participant's replay guard: the same decisions as an in-memory reference whatever the order of
announcements and restarts, and a damaged file is an error, never a silent reset."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tessera.errors import ConfigurationError, ProtocolError
from tessera.participant.replay import FILE_NAME, ReplayGuard

# An announcement (round, aggregation id) or a restart (None): small ranges so repeats are common.
steps = st.lists(
    st.one_of(st.none(), st.tuples(st.integers(1, 4), st.sampled_from(["x", "y", "z"]))), max_size=30
)


def reference(history: list[tuple[int, str]], round_number: int, aggregation: str) -> bool:
    """Admitted iff no later round and not this (round, id) was admitted before (the guard's contract)."""
    if history and round_number < max(r for r, _ in history):
        return False
    return (round_number, aggregation) not in history


@settings(max_examples=100, deadline=None)
@given(steps)
def test_guard_admits_exactly_what_a_never_restarted_reference_admits(sequence):
    with tempfile.TemporaryDirectory() as directory:
        state_dir = Path(directory)
        guard = ReplayGuard(state_dir)
        admitted: list[tuple[int, str]] = []
        for step in sequence:
            if step is None:
                guard = ReplayGuard(state_dir)  # a restart from the same state directory
                continue
            expected = reference(admitted, *step)
            try:
                guard.admit(*step)
                accepted = True
            except ProtocolError as exc:
                accepted = False
                assert ("stale" if step[0] < max(r for r, _ in admitted) else "repeated") in exc.reason
            assert accepted == expected, (step, admitted)
            if accepted:
                admitted.append(step)


@pytest.mark.parametrize(
    "content",
    [
        "{",
        "[]",
        '{"format_version": 2, "round": 1, "aggregations": []}',
        '{"format_version": 1, "round": 0, "aggregations": []}',
        '{"format_version": 1, "round": 1, "aggregations": "r1a0"}',
        '{"format_version": 1, "aggregations": []}',
    ],
)
def test_damaged_guard_is_an_error_not_a_reset(tmp_path, content):
    (tmp_path / FILE_NAME).write_text(content)
    with pytest.raises(ConfigurationError, match=r"replay guard .* is damaged"):
        ReplayGuard(tmp_path)


def test_guard_is_written_before_admit_returns(tmp_path):
    ReplayGuard(tmp_path).admit(3, "r3a0-aa")
    assert ReplayGuard(tmp_path).round == 3
    with pytest.raises(ProtocolError, match="repeated announcement of aggregation r3a0-aa"):
        ReplayGuard(tmp_path).admit(3, "r3a0-aa")
    with pytest.raises(ProtocolError, match="stale announcement of round 2 during round 3"):
        ReplayGuard(tmp_path).admit(2, "r2a0-bb")
