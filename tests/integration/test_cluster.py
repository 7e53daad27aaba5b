"""A node of a three-node RabbitMQ cluster dies while a federation trains; the federation completes.

The cluster is the test's own (``rabbitmq-cluster.sh`` via the ``rabbit_cluster`` fixture): provisioning
runs against it like against one broker (users, vhost and permissions are cluster-wide), every queue is a
quorum queue (replicated on all three nodes, so one node's loss leaves a majority), and every process is
given all three addresses. Node 1, the one whose address the processes' URLs name (so every connection is
on it, and it leads every queue: quorum leaders go to the declaring client's node), is SIGKILLed while
round 1 trains (round 2 then runs on the two survivors). The processes reconnect to node 2 or 3, whose replicas elect new leaders; what the broker
confirmed before the kill is on a majority and survives. A secure-aggregation phase that outlasts the
outage may abort and be retried; afterwards :func:`invariants.check_federation` holds (exact sums of the
recorded inputs, fresh keys and aggregation ids, ε counted once per trained update).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from .invariants import check_federation

pytestmark = pytest.mark.integration

ROUNDS = 2


def test_federation_completes_when_a_cluster_node_dies_mid_training(rabbit_cluster, federation):
    print(f"cluster started in {rabbit_cluster.start_seconds:.1f} s")
    started = time.monotonic()
    fed = federation(
        organisations=3,
        broker=rabbit_cluster,
        queue_type="quorum",
        curator={"rounds": {"max_rounds": ROUNDS, "training_timeout": 30.0, "rejoin_wait": 30.0}},
        participant={"faults": {"record_inputs": True}},
    )
    processes = fed.start(curator_after="broker_connected")
    curator = processes["curator"]
    # Provisioned through node 1, visible on node 3; every queue replicated on all three nodes.
    assert fed.curator_user in rabbit_cluster.ctl(2, "list_users")
    queues = json.loads(
        rabbit_cluster.ctl(
            2, "list_queues", "-p", fed.vhost, "name", "type", "members", "--formatter", "json"
        )
    )
    assert {q["type"] for q in queues} == {"quorum"} and all(len(q["members"]) == 3 for q in queues), queues

    fed.wait_event(curator, "round_announced", 120.0, round=1)
    rabbit_cluster.kill(0)
    killed_at = time.monotonic()
    print(f"node 1 killed {killed_at - started:.1f} s into the test, in round 1")

    report = fed.finish(timeout=180.0)
    print(f"federation finished {time.monotonic() - killed_at:.1f} s after the kill")
    assert report["rounds_completed"] == ROUNDS
    assert report["restarts"] == 0, "the curator process itself never restarted"
    for name in ["curator", *fed.organisations]:
        connected = [e for e in fed.events(name) if e["event"] == "broker_connected"]
        assert len(connected) >= 2, f"{name} did not reconnect after the kill"
        assert connected[0]["address"] == rabbit_cluster.addresses[0], connected[0]
        assert all(e["address"] in rabbit_cluster.addresses[1:] for e in connected[1:]), connected

    facts = check_federation(fed, report)
    per_round = Counter(header.round for header in facts["announced"])
    aggregations = {r: {h.aggregation for h in facts["announced"] if h.round == r} for r in per_round}
    assert all(len(aggregations[r]) == 1 for r in aggregations if r != 1), aggregations
    assert [r["round"] for r in report["history"]] == list(range(1, ROUNDS + 1))
    print(f"wall time {time.monotonic() - started:.1f} s")
