"""Secure-aggregation rounds at scale over a real RabbitMQ broker: many organisations, many rounds, dropouts.

    python bench/load.py --participants 50 --params 100000 --rounds 20 --json
    python bench/load.py --participants 200 --params 100000 --rounds 20 --graph sparse --dropout 0.1 --json

What runs: the harness of ``bench/rounds.py`` (synthetic updates, no training; the real
:class:`~tessera.secagg.curator.CuratorSession` in this process and one real
:class:`~tessera.secagg.participant.ParticipantSession` per participant **process**, each with its own
:class:`~tessera.transport.ParticipantTransport` connection, every message in the wire format inside
``protocol.SecAgg`` framing, one confirmed publish per message, a step's messages together in one
``send_each``),
with what load needs on top:

- **Its own broker.** By default a private RabbitMQ node on free ports (``tests/integration/private_broker.py``;
  needs root and Debian's ``rabbitmq-server``), so its memory and CPU are this benchmark's alone, not those of
  everything else the shared broker serves; ``--broker shared`` uses 127.0.0.1:5672 instead.
- **Forked participants.** The participant processes are forked from this one after the imports (torch comes
  in with ``tessera.protocol``, about 240 MB per process if each imported it again) and before any thread or
  connection exists, so they share the imported code copy-on-write and 200 of them fit in memory and start in
  seconds. Each is a real OS process with its own connection, I/O thread and GIL; nothing runs as threads
  inside a shared process.
- **Dropouts.** ``--dropout f``: in every round, round(f * n) participants chosen afresh (from the seed and the
  round) drop after sending their shares: they never send their masked input, so the curator waits out the
  masked-input timeout (``--masked-timeout``, part of the round time) and removes their pairwise masks with
  the key shares the survivors reveal (the expensive path of the protocol). A participant that dropped stays
  away for the rest of that round.
- **Retries, as the curator service does them.** An attempt that aborts (too few answers in a phase, or a
  secret that cannot be reconstructed because too many of its holders dropped) is retried under a new
  aggregation id with fresh keys, a fresh graph and freshly quantised inputs, with the participants still
  there, up to ``--attempts`` (3, the default of ``rounds.attempts_per_round``). ``aborted_attempts`` counts
  them; ``failed_rounds`` counts rounds that no attempt completed.
- **Exact results.** Each participant quantises with a random generator seeded by (seed, index, round), so
  this process recomputes every survivor's ring vector after the round (not timed) and checks that the
  curator's ring sum equals theirs exactly and the new global weights equal the decoded exact mean bit for
  bit. A completed round whose result differs is counted in ``wrong_results``.

Figures: round time median and p95 over the timed rounds (after ``--warmup``), per-phase medians, CPU seconds
per round of the curator (this process), of all participant processes and of the broker's Erlang VM, the
broker's memory (the VM's RSS sampled after every round, peak and last, and ``rabbitmqctl status`` total at
the end), and the participants' memory (summed PSS, which counts shared pages once, and the median RSS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rounds import process_cpu, sample_count, say, synthetic_update, transport_settings, user_url  # noqa: E402

NUM_CLASSES = 10


def quantiser_rng(seed: int, index: int, round_number: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, round_number, attempt, 7])


def dropping(seed: int, round_number: int, n: int, fraction: float) -> set[int]:
    """Roster indices (1-based) that drop out of ``round_number``."""
    count = round(fraction * n)
    rng = np.random.default_rng([seed, round_number, 13])
    return {int(i) + 1 for i in rng.choice(n, size=count, replace=False)} if count else set()


def encode(layout: Any, seed: int, index: int, round_number: int, attempt: int, params: int) -> np.ndarray:
    """The ring vector of participant ``index`` in an attempt: a retried attempt re-quantises the update
    with fresh randomness (the service trains again after revealing shares; never the same vector)."""
    from tessera.evaluation import EvalCounts

    update = synthetic_update(seed, index, round_number, params)
    vector, _ = layout.encode(
        update.astype(np.float64),
        weight=sample_count(index),
        evaluation=EvalCounts.zero(NUM_CLASSES),
        epsilon=1.0,
        rng=quantiser_rng(seed, index, round_number, attempt),
    )
    return np.asarray(vector)


@dataclass
class Job:
    federation: str
    organisation: str
    curator_user: str
    url: str
    roster_json: str
    identity_hex: str
    params: int
    seed: int
    dropout: float


def participant_main(job: Job, started: Any, results: Any) -> None:
    from tessera import protocol
    from tessera.crypto import SigningKey
    from tessera.errors import ProtocolError
    from tessera.roster import RosterFile
    from tessera.secagg.config import ParticipantPolicy
    from tessera.secagg.messages import MaskedInput, StartAggregation
    from tessera.secagg.participant import ParticipantSession
    from tessera.secagg.wire import WireLimits
    from tessera.secagg.wire import decode as decode_secagg
    from tessera.secagg.wire import encode as encode_secagg
    from tessera.transport import ParticipantTransport

    roster = RosterFile.model_validate_json(job.roster_json)
    index = roster.index_of(job.organisation)
    n = len(roster.members)
    identity = SigningKey(bytes.fromhex(job.identity_hex))
    transport = ParticipantTransport(
        transport_settings(job.url),
        federation=job.federation,
        organisation=job.organisation,
        curator_user=job.curator_user,
    ).start()
    started.put(job.organisation)
    session: ParticipantSession | None = None
    vector: np.ndarray | None = None
    limits: WireLimits | None = None
    max_payload = 4 * job.params + (1 << 16)
    drops = False
    dropped_in = 0
    try:
        while True:
            delivery = transport.receive(timeout=5.0)
            if delivery is None:
                continue
            header, payload = protocol.decode(delivery.body, max_payload=max_payload)
            if isinstance(header, protocol.Finished):
                transport.ack(delivery)
                break
            if isinstance(header, protocol.RoundAnnouncement):
                if drops and header.round == dropped_in:  # gone for the rest of that round (retries too)
                    transport.ack(delivery)
                    continue
                protocol.weights_from_bytes(payload)
                layout = header.layout.layout()
                vector = encode(layout, job.seed, index, header.round, header.attempt, job.params)
                limits = WireLimits(max_participants=n, vector_length=layout.length, ring_bits=32)
                max_payload = max(4 * job.params, limits.max_message_bytes)
                drops = index in dropping(job.seed, header.round, n, job.dropout)
                dropped_in = header.round
                session = None
                ready = protocol.Ready(
                    federation=job.federation,
                    round=header.round,
                    attempt=header.attempt,
                    aggregation=header.aggregation,
                )
                transport.send(protocol.encode(ready), message_type="ready")
            elif isinstance(header, protocol.SecAgg) and limits is not None and vector is not None:
                message = decode_secagg(payload, limits)
                if isinstance(message, StartAggregation):
                    session = ParticipantSession(
                        index=index,
                        identity=identity,
                        roster=roster.secagg_roster(),
                        policy=ParticipantPolicy(
                            federation=job.federation, vector_length=limits.vector_length, ring_bits=32
                        ),
                        vector=vector,
                    )
                try:
                    replies = session.receive(message) if session is not None else []  # type: ignore[arg-type]
                except ProtocolError:  # a leftover of an aborted attempt
                    replies = []
                if session is not None:
                    for reply in replies:
                        if drops and isinstance(reply, MaskedInput):
                            session = None  # gone: sends nothing more in this round
                            break
                        transport.send(
                            protocol.encode(protocol.SecAgg(federation=job.federation), encode_secagg(reply)),
                            message_type="secagg",
                        )
                    if session is not None:
                        session.prepare_masked_input()
            transport.ack(delivery)
        results.put(job.organisation)
    finally:
        transport.close()


def memory_kib(pid: int, field: str) -> int | None:
    """A field of /proc/<pid>/status (VmRSS) or smaps_rollup (Pss), in KiB."""
    name = "smaps_rollup" if field == "Pss" else "status"
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        from tessera.crypto import SigningKey
        from tessera.roster import Member, RosterFile

        self.args = args
        self.n = args.participants
        tag = uuid.uuid4().hex[:8]
        self.federation = f"load-{tag}"
        self.curator_user = f"lc-{tag}"
        self.organisations = [f"l{tag}-p{i:03d}" for i in range(1, self.n + 1)]
        self.passwords = {u: secrets.token_urlsafe(24) for u in (self.curator_user, *self.organisations)}
        self.keys = {o: SigningKey.generate() for o in self.organisations}
        self.roster = RosterFile(
            federation=self.federation,
            curator_user=self.curator_user,
            members=tuple(
                Member(organisation=o, index=i, identity_key=self.keys[o].public_bytes.hex())
                for i, o in enumerate(self.organisations, start=1)
            ),
        )
        rng = np.random.default_rng(args.seed)
        self.weights = (rng.standard_normal(args.params, dtype=np.float32) * 0.1).astype(np.float32)
        self.processes: list[Any] = []
        self.node: Any = None
        self.transport: Any = None
        self.url = os.environ.get("TESSERA_BENCH_AMQP_URL", "amqp://127.0.0.1:5672/")

    def backend(self) -> Any:
        from tessera.transport.provision import RabbitmqctlBackend

        return RabbitmqctlBackend(node=self.node.node if self.node is not None else None, timeout=300)

    def broker_pid(self) -> int | None:
        if self.node is not None:
            return int(self.node.pid() or 0) or None
        from rounds import broker_pid

        return broker_pid()

    def __enter__(self) -> Load:
        from tessera.transport import CuratorTransport, provision

        if self.args.broker == "private":
            from tests.integration.private_broker import PrivateBroker

            self.node = PrivateBroker(start_timeout=300)
            say(f"starting a private RabbitMQ node {self.node.node} on port {self.node.port} ...")
            say(f"  up in {self.node.start():.1f} s")
            self.url = self.node.url
        say(f"provisioning vhost tessera-{self.federation} and {self.n + 1} broker users ...")
        provision(
            self.federation,
            curator_password=self.passwords[self.curator_user],
            organisation_passwords={o: self.passwords[o] for o in self.organisations},
            curator_user=self.curator_user,
            prune=False,
            backend=self.backend(),
        )
        # The curator declares the topology (every inbox) before the participants connect.
        self.transport = CuratorTransport(
            transport_settings(user_url(self.url, self.curator_user, self.passwords[self.curator_user])),
            federation=self.federation,
            organisations=self.organisations,
            curator_user=self.curator_user,
        ).start()
        self.transport.close()  # no thread may exist when the participants fork
        context = mp.get_context("fork")
        self.started, self.results = context.Queue(), context.Queue()
        t0 = time.perf_counter()
        for organisation in self.organisations:
            job = Job(
                federation=self.federation,
                organisation=organisation,
                curator_user=self.curator_user,
                url=user_url(self.url, organisation, self.passwords[organisation]),
                roster_json=self.roster.model_dump_json(),
                identity_hex=self.keys[organisation].private_bytes().hex(),
                params=self.args.params,
                seed=self.args.seed,
                dropout=self.args.dropout,
            )
            process = context.Process(
                target=participant_main, args=(job, self.started, self.results), name=organisation
            )
            process.start()
            self.processes.append(process)
        for _ in self.organisations:
            self.started.get(timeout=600)
        say(f"{self.n} participant processes connected in {time.perf_counter() - t0:.1f} s")
        self.transport = CuratorTransport(
            transport_settings(user_url(self.url, self.curator_user, self.passwords[self.curator_user])),
            federation=self.federation,
            organisations=self.organisations,
            curator_user=self.curator_user,
        ).start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        from tessera.transport import deprovision

        if exc_type is not None:  # an error or Ctrl-C: the participants wait for nothing any more
            for process in self.processes:
                process.terminate()
        deadline = time.monotonic() + 60
        for process in self.processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
        if self.transport is not None:
            self.transport.close()
        try:
            if self.node is None:
                deprovision(
                    self.federation,
                    organisations=self.organisations,
                    curator_user=self.curator_user,
                    backend=self.backend(),
                )
        finally:
            if self.node is not None:
                self.node.close()

    # --- rounds -------------------------------------------------------------------------------------------

    def layout(self) -> Any:
        from tessera.fedavg import UpdateLayout, largest_value_bits

        return UpdateLayout(
            num_params=self.args.params,
            num_classes=NUM_CLASSES,
            clip=0.5,
            ring_bits=32,
            value_bits=largest_value_bits(ring_bits=32, max_weight=65_535, max_participants=self.n),
            max_weight=65_535,
            max_participants=self.n,
        )

    def round(self, r: int, layout: Any) -> dict[str, Any]:
        """A round as the curator service runs it: an attempt that aborts is retried with fresh keys under a
        new aggregation id (``--attempts`` in all), with the participants that were still there."""
        awaited = set(self.organisations)
        attempts: list[dict[str, Any]] = []
        for attempt in range(self.args.attempts):
            result = self.attempt(r, attempt, layout, awaited)
            attempts.append(result)
            if result["failed"] is None:
                break
            awaited = result["still_there"]
        final = dict(attempts[-1])
        final["seconds"] = sum(a["seconds"] for a in attempts)
        final["aborted_attempts"] = [a["failed"] for a in attempts if a["failed"] is not None]
        final["wrong"] = any(a["wrong"] for a in attempts)
        return final

    def attempt(self, r: int, attempt: int, layout: Any, awaited: set[str]) -> dict[str, Any]:
        from tessera import protocol
        from tessera.envelope import secagg_envelopes
        from tessera.errors import ProtocolError
        from tessera.models import ModelSpec
        from tessera.secagg.config import AggregationConfig, Graph, SessionIds, default_threshold
        from tessera.secagg.curator import CuratorSession, PhaseTimeouts
        from tessera.secagg.wire import WireLimits
        from tessera.secagg.wire import decode as decode_secagg

        limits = WireLimits(max_participants=self.n, vector_length=layout.length, ring_bits=32)
        aggregation = f"r{r}a{attempt}-{secrets.token_hex(4)}"
        announcement = protocol.RoundAnnouncement(
            federation=self.federation,
            round=r,
            attempt=attempt,
            aggregation=aggregation,
            model=ModelSpec(name="mlp", kwargs={"synthetic_parameters": self.args.params}),
            model_fingerprint="0" * 64,
            layout=protocol.LayoutHeader.of(layout),
            roster_fingerprint="0" * 64,  # synthetic participants check nothing but the layout
        )
        phases: dict[str, float] = {}
        t0 = mark = time.perf_counter()
        self.transport.broadcast(
            protocol.encode(announcement, protocol.weights_to_bytes(self.weights)), message_type="round"
        )
        ready: set[str] = set()
        deadline = time.perf_counter() + 300
        while ready < awaited:
            delivery = self.transport.receive(timeout=1.0)
            if delivery is None:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"round {r}: {len(ready)} of {len(awaited)} ready")
                continue
            header, _ = protocol.decode(delivery.body, max_payload=limits.max_message_bytes)
            if isinstance(header, protocol.Ready) and header.aggregation == aggregation:
                ready.add(delivery.sender)
            self.transport.ack(delivery)
        phases["ready"] = time.perf_counter() - mark
        mark = time.perf_counter()
        indices = [self.roster.index_of(o) for o in sorted(ready)]
        masked = self.args.masked_timeout if self.args.dropout > 0 else 300.0
        session = CuratorSession(
            config=AggregationConfig.create(
                ids=SessionIds(federation=self.federation, round=r, aggregation=aggregation),
                participants=indices,
                vector_length=layout.length,
                ring_bits=32,
                threshold=default_threshold(len(indices)),
                graph=Graph(self.args.graph),
                graph_seed=secrets.token_bytes(32),
            ),
            roster=self.roster.secagg_roster(),
            timeouts=PhaseTimeouts(
                advertise=300, share=300, masked_input=masked, consistency=300, unmask=300
            ),
        )

        def send(outgoing: list[Any]) -> None:
            # As the curator service does: all of one step's messages in one send_each (their confirms
            # overlap), one publish per message (several recipients: to.selected with BCC).
            self.transport.send_each(secagg_envelopes(self.federation, outgoing, self.roster.organisation_of))

        phase = session.phase.value
        late = 0
        send(session.start(time.monotonic()))
        while not session.finished:
            wait = max(0.0, min(1.0, (session.next_deadline or time.monotonic()) - time.monotonic()))
            delivery = self.transport.receive(timeout=wait)
            if delivery is not None:
                header, payload = protocol.decode(delivery.body, max_payload=limits.max_message_bytes)
                out: list[Any] = []
                if isinstance(header, protocol.SecAgg):
                    message = decode_secagg(payload, limits)
                    sender = self.roster.index_of(delivery.sender)
                    try:
                        out = session.receive(sender, message, time.monotonic())  # type: ignore[arg-type]
                    except ProtocolError:  # late for its phase (a slow one past the timeout): dropped
                        late += 1
                self.transport.ack(delivery)
                send(out)
            send(session.poll(time.monotonic()))
            if session.phase.value != phase:
                now = time.perf_counter()
                phases[phase] = now - mark
                phase, mark = session.phase.value, now
        seconds = time.perf_counter() - t0
        if session.result is None:
            logged = list(session.phase_log.values())
            there = logged[min(len(logged), 3) - 1][1] if logged else frozenset(indices)  # masked inputs
            return {
                "seconds": seconds,
                "phases": phases,
                "failed": session.abort_reason,
                "wrong": False,
                "late": late,
                "still_there": {self.roster.organisation_of(i) for i in there},
            }
        before = self.weights
        aggregate = layout.decode(session.result.total)
        self.weights = (self.weights + aggregate.mean_update).astype(np.float32)
        seconds = time.perf_counter() - t0
        survivors = sorted(session.result.survivors)
        # Not timed: the exact expectation, recomputed from the survivors' deterministic inputs.
        expected = np.zeros(layout.length, dtype=np.uint32)
        for index in survivors:
            expected += encode(layout, self.args.seed, index, r, attempt, self.args.params)
        exact = np.array_equal(expected, np.asarray(session.result.total))
        exact &= np.array_equal(
            self.weights, (before + layout.decode(expected).mean_update).astype(np.float32)
        )
        dropped = dropping(self.args.seed, r, self.n, self.args.dropout) & set(indices)
        return {
            "seconds": seconds,
            "phases": phases,
            "failed": None,
            "wrong": not exact,
            "survivors": len(survivors),
            "dropped_as_planned": not (set(survivors) & dropped),
            "unplanned_dropouts": len(set(indices) - dropped - set(survivors)),
            "late": late,
        }

    def cpu(self) -> dict[str, float]:
        out = {"curator": sum(os.times()[:2])}
        out["participants"] = sum(process_cpu(p.pid) or 0.0 for p in self.processes)
        pid = self.broker_pid()
        cpu = process_cpu(pid) if pid else None
        if cpu is not None:
            out["broker"] = cpu
        return out

    def broker_status_memory(self) -> int | None:
        base = ["rabbitmqctl", "-q", *(["-n", self.node.node] if self.node is not None else [])]
        with contextlib.suppress(subprocess.SubprocessError, OSError, ValueError, KeyError):
            done = subprocess.run(
                [*base, "status", "--formatter", "json"], capture_output=True, text=True, timeout=120
            )
            memory = json.loads(done.stdout)["memory"]
            return int(memory["total"]["rss"])
        return None

    def run(self) -> dict[str, Any]:
        from tessera import protocol

        layout = self.layout()
        rounds: list[dict[str, Any]] = []
        broker_rss: list[int] = []
        for r in range(1, self.args.warmup + self.args.rounds + 1):
            cpu0 = self.cpu()
            result = self.round(r, layout)
            cpu1 = self.cpu()
            result["cpu"] = {k: cpu1[k] - cpu0[k] for k in cpu1 if k in cpu0}
            pid = self.broker_pid()
            rss = memory_kib(pid, "VmRSS") if pid else None
            if rss is not None:
                broker_rss.append(rss * 1024)
            kind = "warm-up" if r <= self.args.warmup else "timed"
            say(
                f"  round {r} ({kind}): {result['seconds']:.2f} s  "
                + " ".join(f"{k}={v:.2f}" for k, v in result["phases"].items())
                + f"  survivors={result.get('survivors')} unplanned={result.get('unplanned_dropouts')}"
                + f" aborted={len(result['aborted_attempts'])} failed={result['failed']} wrong={result['wrong']}"
                + "  cpu: "
                + " ".join(f"{k}={v:.2f}" for k, v in result["cpu"].items())
                + (f"  broker_rss={rss / 1024:.0f} MiB" if rss else "")
            )
            if r > self.args.warmup:
                rounds.append(result)
        pss = [memory_kib(p.pid, "Pss") for p in self.processes]
        rss = [memory_kib(p.pid, "VmRSS") for p in self.processes]
        status_memory = self.broker_status_memory()
        self.transport.broadcast(
            protocol.encode(
                protocol.Finished(federation=self.federation, rounds_completed=len(rounds), reason="done")
            ),
            message_type="finished",
        )
        for _ in self.processes:
            self.results.get(timeout=300)
        return self.figures(rounds, broker_rss, status_memory, pss, rss)

    def figures(
        self,
        rounds: list[dict[str, Any]],
        broker_rss: list[int],
        status_memory: int | None,
        pss: list[int | None],
        rss: list[int | None],
    ) -> dict[str, Any]:
        def q(values: list[float], p: float) -> float:
            ordered = sorted(values)
            return round(ordered[min(len(ordered) - 1, int(np.ceil(p * len(ordered))) - 1)], 3)

        times = [r["seconds"] for r in rounds]
        completed = [r for r in rounds if r["failed"] is None]
        phases = sorted({p for r in completed for p in r["phases"]})
        cpu_keys = sorted({k for r in rounds for k in r["cpu"]})
        mib = 1024 * 1024
        return {
            "participants": self.n,
            "params": self.args.params,
            "graph": self.args.graph,
            "dropout": self.args.dropout,
            "masked_timeout_s": self.args.masked_timeout if self.args.dropout > 0 else None,
            "broker": self.args.broker,
            "rounds": len(rounds),
            "warmup_rounds": self.args.warmup,
            "failed_rounds": sum(1 for r in rounds if r["failed"] is not None),
            "aborted_attempts": sum(len(r["aborted_attempts"]) for r in rounds),
            "abort_reasons": [reason for r in rounds for reason in r["aborted_attempts"]],
            "wrong_results": sum(1 for r in rounds if r["wrong"]),
            "round_s_median": round(statistics.median(times), 3),
            "round_s_p95": q(times, 0.95),
            "round_s": [round(t, 3) for t in times],
            "phases_s_median": {
                p: round(statistics.median([r["phases"][p] for r in completed if p in r["phases"]]), 3)
                for p in phases
            },
            "cpu_s_per_round_median": {
                k: round(statistics.median([r["cpu"][k] for r in rounds if k in r["cpu"]]), 3)
                for k in cpu_keys
            },
            "cpu_s_per_round_p95": {
                k: q([r["cpu"][k] for r in rounds if k in r["cpu"]], 0.95) for k in cpu_keys
            },
            "broker_rss_mib_peak": round(max(broker_rss) / mib, 1) if broker_rss else None,
            "broker_rss_mib_last": round(broker_rss[-1] / mib, 1) if broker_rss else None,
            "broker_status_total_rss_mib": round(status_memory / mib, 1) if status_memory else None,
            "participants_pss_mib_sum": round(sum(v for v in pss if v) / 1024, 1),
            "participant_rss_mib_median": round(statistics.median([v for v in rss if v]) / 1024, 1),
            "survivors_median": statistics.median([r["survivors"] for r in completed]) if completed else None,
            "unplanned_dropouts": sum(r.get("unplanned_dropouts", 0) for r in rounds),
            "planned_dropouts_excluded": all(r.get("dropped_as_planned", True) for r in rounds),
            "late_messages": sum(r.get("late", 0) for r in rounds),
            "cpus": len(os.sched_getaffinity(0)),
            "load_average_at_end": [round(v, 1) for v in os.getloadavg()],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--participants", type=int, default=50)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--graph", choices=["full", "sparse"], default="full")
    parser.add_argument("--dropout", type=float, default=0.0, help="fraction dropping in every round")
    parser.add_argument(
        "--masked-timeout", type=float, default=10.0, help="masked-input phase timeout with dropouts, s"
    )
    parser.add_argument(
        "--attempts", type=int, default=3, help="attempts per round, as rounds.attempts_per_round"
    )
    parser.add_argument("--broker", choices=["private", "shared"], default="private")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.participants < 3 or not 0 <= args.dropout < 1 / 3:
        parser.error("need --participants >= 3 and 0 <= --dropout < 1/3 (the threshold is floor(2n/3)+1)")
    # Imported here, before the participants fork, so they share the code instead of importing it again.
    import tessera.secagg.participant
    import tessera.transport  # noqa: F401
    from tessera import protocol  # noqa: F401
    from tessera.settings import LoggingSettings, configure_logging

    configure_logging(LoggingSettings(level="warning"))
    try:
        with Load(args) as load:
            figures = load.run()
    except Exception as exc:
        say(f"bench/load.py failed: {type(exc).__name__}: {exc}")
        raise
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))
    return 0 if figures["failed_rounds"] == 0 and figures["wrong_results"] == 0 else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
