"""Benchmark of one secure aggregation, run in process by the simulation driver (no network).

    python bench/secagg.py --participants 50 --params 100000 [--dropout 0.1] [--graph full|sparse] [--json]

``--dropout F`` makes round(F * N) participants vanish after ShareKeys (before sending their masked input),
the expensive case: the curator must reconstruct their mask keys and recompute their pairwise masks.
Figures: ``participant_s`` (largest total compute of one participant), ``curator_s``, ``total_s`` (curator
time plus, per phase, the slowest participant), ``exact`` (sum equals the plain sum of survivors' inputs),
``bytes_up_per_participant`` (largest upload of one participant, wire-encoded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import numpy as np
from tessera.secagg.config import AggregationConfig, Graph, SessionIds
from tessera.secagg.simulation import DropPoint, SimulationResult, make_federation, simulate


def curator_seconds(outcome: SimulationResult) -> float:
    """The curator's compute over all phases."""
    return sum(outcome.curator_seconds.values())


def participant_seconds(outcome: SimulationResult) -> float:
    """The largest total compute of one participant."""
    return max((sum(p.values()) for p in outcome.participant_seconds.values()), default=0.0)


def total_seconds(outcome: SimulationResult) -> float:
    """Curator time plus, for each phase, the slowest participant (the critical path without network)."""
    slowest: dict[str, float] = defaultdict(float)
    for phases in outcome.participant_seconds.values():
        for phase, seconds in phases.items():
            slowest[phase] = max(slowest[phase], seconds)
    return curator_seconds(outcome) + sum(slowest.values())


def run(
    participants: int, params: int, dropout: float, graph: str, ring_bits: int, seed: int
) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    ids = SessionIds(federation="bench", round=1, aggregation=f"a{seed}")
    config = AggregationConfig.create(
        ids=ids,
        participants=range(1, participants + 1),
        vector_length=params,
        ring_bits=32 if ring_bits == 32 else 64,
        graph=Graph(graph),
        graph_seed=rng.bytes(32),
    )
    dtype = np.uint32 if ring_bits == 32 else np.uint64
    inputs = {
        u: rng.integers(0, np.iinfo(dtype).max, params, dtype=dtype, endpoint=True)
        for u in config.participants
    }
    dropped = rng.choice(participants, size=round(dropout * participants), replace=False) + 1
    schedule = {int(u): DropPoint.MASKED_INPUT for u in dropped}
    roster, identities = make_federation(participants)
    started = time.perf_counter()
    outcome = simulate(config, inputs, dropouts=schedule, roster=roster, identities=identities)
    wall = time.perf_counter() - started
    exact = False
    if outcome.total is not None:
        expected = np.zeros(params, dtype=dtype)
        for u in outcome.survivors:
            expected += inputs[u]
        exact = bool(np.array_equal(outcome.total, expected))
    return {
        "participants": participants,
        "params": params,
        "dropout": dropout,
        "dropped": len(schedule),
        "threshold": config.threshold,
        "graph": graph,
        "neighbours": config.neighbours if config.graph is Graph.SPARSE else participants - 1,
        "ring_bits": ring_bits,
        "participant_s": round(participant_seconds(outcome), 4),
        "curator_s": round(curator_seconds(outcome), 4),
        "total_s": round(total_seconds(outcome), 4),
        "wall_s": round(wall, 3),
        "exact": exact,
        "aborted": outcome.abort_reason,
        "bytes_up_per_participant": max(outcome.bytes_up.values()),
        "vector_bytes_float32": 4 * params,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--participants", type=int, default=50)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--graph", choices=["full", "sparse"], default="full")
    parser.add_argument("--ring-bits", type=int, choices=[32, 64], default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median run by total_s is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    runs = []
    for i in range(args.repeat):
        print(f"run {i + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
        runs.append(
            run(args.participants, args.params, args.dropout, args.graph, args.ring_bits, args.seed + i)
        )
    runs.sort(key=lambda r: float(r["total_s"]))  # type: ignore[arg-type]
    figures = runs[len(runs) // 2]
    figures["repeats"] = args.repeat
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>26}: {value}")
    return 0 if figures["exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
