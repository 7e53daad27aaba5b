"""Splitting and reassembly under limits (pure; injected clock)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tessera.transport.chunking import Complete, Pending, Reassembler, ReassemblyLimits, Rejected, split


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(**limits: float) -> tuple[Reassembler[int], Clock]:
    clock = Clock()
    return Reassembler(ReassemblyLimits(**limits), clock), clock


def feed(r: Reassembler[int], chunks: list[bytes], *, sender="a", mid="m", order=None, fingerprint=None):
    outcomes = []
    for i in order if order is not None else range(len(chunks)):
        outcomes.append(
            r.add(sender=sender, message_id=mid, index=i, count=len(chunks), body=chunks[i], token=i,
                  fingerprint=fingerprint)
        )  # fmt: skip
    return outcomes


@given(st.binary(max_size=2000), st.integers(1, 300), st.randoms(use_true_random=False))
def test_any_order_reassembles(body: bytes, size: int, rng: random.Random) -> None:
    chunks = split(body, size)
    assert b"".join(chunks) == body and all(0 < len(c) <= size for c in chunks if body)
    r, _ = make(max_chunks=len(chunks))
    order = list(range(len(chunks)))
    rng.shuffle(order)
    *pending, last = feed(r, chunks, order=order)
    assert all(isinstance(o, Pending) for o in pending)
    assert isinstance(last, Complete) and last.body == body and sorted(last.tokens) == sorted(order)
    assert r.partial_messages == 0 and r.partial_bytes == 0 and r.held_tokens == 0


def test_split_small_payload_is_one_chunk():
    assert split(b"", 8) == [b""] and split(b"12345678", 8) == [b"12345678"]
    assert split(b"123456789", 8) == [b"12345678", b"9"]
    with pytest.raises(ValueError):
        split(b"x", 0)


def test_contradicting_count_rejects_whole_message_and_remembers_it():
    r, _ = make()
    assert isinstance(r.add(sender="a", message_id="m", index=0, count=3, body=b"0", token=1), Pending)
    out = r.add(sender="a", message_id="m", index=1, count=4, body=b"1", token=2)
    assert isinstance(out, Rejected) and out.reason == "chunk_count_contradicts_siblings"
    assert out.tokens == (1, 2)
    late = r.add(sender="a", message_id="m", index=2, count=3, body=b"2", token=3)
    assert isinstance(late, Rejected) and late.reason == "message_already_rejected" and late.tokens == (3,)
    assert r.partial_messages == 0 and r.partial_bytes == 0


def test_contradicting_properties_reject():
    r, _ = make()
    r.add(sender="a", message_id="m", index=0, count=2, body=b"0", token=1, fingerprint=("t1",))
    out = r.add(sender="a", message_id="m", index=1, count=2, body=b"1", token=2, fingerprint=("t2",))
    assert isinstance(out, Rejected) and out.reason == "chunk_properties_contradict_siblings"


def test_identical_duplicate_is_absorbed_different_duplicate_rejects():
    r, _ = make()
    r.add(sender="a", message_id="m", index=0, count=2, body=b"0", token=1)
    assert isinstance(r.add(sender="a", message_id="m", index=0, count=2, body=b"0", token=2), Pending)
    done = r.add(sender="a", message_id="m", index=1, count=2, body=b"1", token=3)
    assert isinstance(done, Complete) and done.body == b"01" and done.tokens == (1, 2, 3)
    r.add(sender="a", message_id="n", index=0, count=2, body=b"0", token=4)
    out = r.add(sender="a", message_id="n", index=0, count=2, body=b"X", token=5)
    assert (
        isinstance(out, Rejected)
        and out.reason == "chunk_body_contradicts_duplicate"
        and out.tokens == (4, 5)
    )


def test_senders_never_mix():
    r, _ = make()
    r.add(sender="a", message_id="m", index=0, count=2, body=b"a0", token=1)
    r.add(sender="b", message_id="m", index=1, count=2, body=b"b1", token=2)
    assert r.partial_messages == 2


@pytest.mark.parametrize(
    ("limits", "index", "count", "reason"),
    [
        ({"max_chunks": 4}, 0, 5, "chunk_count_out_of_range"),
        ({}, 0, 0, "chunk_count_out_of_range"),
        ({}, 3, 3, "chunk_index_out_of_range"),
        ({}, -1, 3, "chunk_index_out_of_range"),
    ],
)
def test_header_ranges(limits, index, count, reason):
    r, _ = make(**limits)
    out = r.add(sender="a", message_id="m", index=index, count=count, body=b"x", token=1)
    assert isinstance(out, Rejected) and out.reason == reason


def test_size_limits():
    r, _ = make(max_message_bytes=10)
    r.add(sender="a", message_id="m", index=0, count=3, body=b"x" * 6, token=1)
    out = r.add(sender="a", message_id="m", index=1, count=3, body=b"x" * 6, token=2)
    assert isinstance(out, Rejected) and out.reason == "message_too_large" and out.tokens == (1, 2)
    r, _ = make(max_partial_bytes=10, max_partials_per_sender=5)
    r.add(sender="a", message_id="m1", index=0, count=2, body=b"x" * 6, token=1)
    out = r.add(sender="a", message_id="m2", index=0, count=2, body=b"x" * 6, token=2)
    assert isinstance(out, Rejected) and out.reason == "partial_bytes_budget_exhausted"
    assert r.partial_bytes == 6


def test_partial_message_limits_per_sender_and_total():
    r, _ = make(max_partials_per_sender=1, max_partial_messages=2)
    assert isinstance(r.add(sender="a", message_id="1", index=0, count=2, body=b"", token=1), Pending)
    out = r.add(sender="a", message_id="2", index=0, count=2, body=b"", token=2)
    assert isinstance(out, Rejected) and out.reason == "too_many_partial_messages_from_sender"
    assert isinstance(r.add(sender="b", message_id="1", index=0, count=2, body=b"", token=3), Pending)
    out = r.add(sender="c", message_id="1", index=0, count=2, body=b"", token=4)
    assert isinstance(out, Rejected) and out.reason == "too_many_partial_messages"


def test_duplicates_are_bounded():
    r, _ = make()
    r.add(sender="a", message_id="m", index=0, count=2, body=b"0", token=0)
    outcomes = [r.add(sender="a", message_id="m", index=0, count=2, body=b"0", token=t) for t in range(1, 5)]
    assert isinstance(outcomes[-1], Rejected) and outcomes[-1].reason == "too_many_duplicate_chunks"


def test_incomplete_messages_time_out():
    r, clock = make(partial_timeout=10)
    r.add(sender="a", message_id="m", index=0, count=2, body=b"0", token=1)
    clock.now = 9
    assert r.expire() == []
    clock.now = 11
    [out] = r.expire()
    assert out.reason == "partial_message_timed_out" and out.tokens == (1,)
    assert r.partial_messages == 0 and r.partial_bytes == 0


def test_clear_forgets_without_rejecting():
    r, _ = make()
    r.add(sender="a", message_id="m", index=0, count=2, body=b"0", token=1)
    r.clear()
    assert r.held_tokens == 0 and r.partial_bytes == 0
    # after a reconnect the broker redelivers every chunk; the message completes normally
    done = feed(r, [b"0", b"1"])[-1]
    assert isinstance(done, Complete) and done.body == b"01"
