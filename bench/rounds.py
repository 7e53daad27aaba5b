"""Wall time of one federated round over the REAL RabbitMQ broker, secure aggregation on or off.

    python bench/rounds.py --participants 10 --params 1000000 --rounds 3 --secure on|off|both [--json]

No training: each participant makes a synthetic update (seeded Gaussian, std 0.01), so what is measured is
the round's communication and aggregation, the part secure aggregation changes. Both modes run in the same
harness, on the same broker topology, with the same round message:

- The curator broadcasts a ``round`` message (a :class:`tessera.protocol.RoundAnnouncement` with the
  4·M-byte float32 global weights, routing key ``to.all``) and waits for the broker's confirm.
- ``--secure off``: each participant answers with its float32 update (4·M bytes, its sample count in an
  AMQP header); the curator sums the updates as they arrive and divides by the total weight.
- ``--secure on``: exactly what the services do (``tessera.curator.rounds`` / ``tessera.participant.client``):
  the participant quantises its update into the 32-bit ring with :class:`tessera.fedavg.UpdateLayout`
  (weight = its sample count, plus the 214 count coordinates of a 10-class layout) and sends ``ready``; the
  curator runs :class:`~tessera.secagg.curator.CuratorSession` (full graph, threshold floor(2n/3)+1) against
  one :class:`~tessera.secagg.participant.ParticipantSession` per participant, every message in the secagg
  wire format inside :class:`tessera.protocol.SecAgg` framing, one confirmed publish per message (a message
  for several participants goes out once, routing key ``to.selected`` with their keys in the ``BCC``
  header), all of one protocol step's messages in one ``send_each`` so that their confirms overlap; each
  participant masks its input right after sending its shares
  (:meth:`~tessera.secagg.participant.ParticipantSession.prepare_masked_input`, as the service does) unless
  ``--mask-ahead off``; then the curator decodes the average from the ring sum.

Figures (medians over ``--rounds`` timed rounds, after ``--warmup`` untimed ones): ``round_s_median``,
per-phase medians (plain: broadcast / upload / aggregate; secure: broadcast / ready / advertise / share /
masked_input / consistency / unmask / decode), ``bytes_up_per_participant`` (everything one participant
publishes in one round, framing included), ``max_abs_error`` of the new global weights against the exact
float64 weighted mean (recomputed outside the timed section), and where the time goes: the curator's time
blocked waiting for messages vs. handling them vs. publishing (``curator_s_median``), each step of the
slowest participant in wall and CPU seconds (``participant_slowest_s_median``), the CPU of each step summed
over all participants (``participants_cpu_sum_s_median``; ``thread_main_cpu`` and ``thread_io_cpu`` are all
of a participant's main thread, steps included, and all of its transport's I/O thread) and the CPU seconds per round of the curator
process, all participant processes and the local broker (``cpu_s_per_round_median``). ``--profile`` adds a
cProfile of the curator's timed rounds on stderr.

Processes, not threads: the curator runs in this process and every participant in its own OS process
(``spawn``), each with its own pika connection and I/O thread, as in a deployment. With threads, the eleven
endpoints' pure-Python work (pika framing of 4 MB bodies, wire encoding, protocol state machines) would
share one GIL and be serialised on one core, which says more about CPython than about the protocol; with
processes the OS schedules them over both cores. The machine has 2 cores, so the participants' work still
competes with the curator's for CPU: the figures are an upper bound for a deployment where each
organisation computes on its own hardware. Each run provisions a fresh vhost and broker users with unique
names (broker users are global), and removes them at the end, also after a failure.

The broker is RabbitMQ on 127.0.0.1:5672 (``TESSERA_BENCH_AMQP_URL`` to change it), administered with
``rabbitmqctl``; without them the benchmark exits with status 2 and says what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import multiprocessing as mp
import os
import pstats
import secrets
import statistics
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

BROKER_URL = os.environ.get("TESSERA_BENCH_AMQP_URL", "amqp://127.0.0.1:5672/")
NUM_CLASSES = 10
UPDATE_STD = 0.01


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def user_url(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5672}"
    return f"{parts.scheme}://{netloc}/"


def transport_settings(url: str) -> Any:
    from pydantic import SecretStr
    from tessera.transport import ConnectionSettings, TransportSettings

    return TransportSettings(
        connection=ConnectionSettings(url=SecretStr(url), heartbeat=30),
        start_timeout=60.0,
        publish_timeout=120.0,
    )


def synthetic_update(seed: int, index: int, round_number: int, params: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index, round_number])
    return rng.standard_normal(params, dtype=np.float32) * np.float32(UPDATE_STD)


def sample_count(index: int) -> int:
    """A synthetic FedAvg weight per participant (uneven on purpose)."""
    return 1000 + 250 * index


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads) from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """The local RabbitMQ node's Erlang VM, to account its CPU (None if not on this host)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as handle:
                if handle.read().strip() == "beam.smp":
                    return int(entry)
    return None


# --- participant process ------------------------------------------------------------------------------------


@dataclass
class ParticipantJob:
    federation: str
    organisation: str
    curator_user: str
    url: str
    roster_json: str
    identity_hex: str
    secure: bool
    params: int
    seed: int
    mask_ahead: bool = True


def participant_main(job: ParticipantJob, started: Any, results: Any) -> None:
    """One organisation: answer round messages until ``finished``; report per-round figures at the end."""
    from tessera import protocol
    from tessera.crypto import SigningKey
    from tessera.evaluation import EvalCounts
    from tessera.roster import RosterFile
    from tessera.secagg.config import ParticipantPolicy
    from tessera.secagg.messages import StartAggregation
    from tessera.secagg.participant import ParticipantSession
    from tessera.secagg.wire import WireLimits
    from tessera.secagg.wire import decode as decode_secagg
    from tessera.secagg.wire import encode as encode_secagg
    from tessera.settings import LoggingSettings, configure_logging
    from tessera.transport import ParticipantTransport

    configure_logging(LoggingSettings(level="warning"))
    roster = RosterFile.model_validate_json(job.roster_json)
    index = roster.index_of(job.organisation)
    identity = SigningKey(bytes.fromhex(job.identity_hex))
    transport = ParticipantTransport(
        transport_settings(job.url),
        federation=job.federation,
        organisation=job.organisation,
        curator_user=job.curator_user,
    ).start()
    started.put(job.organisation)
    # Where the rest of a participant's CPU goes: its main thread (the steps below, plus decoding, waiting
    # and handing messages over) and the transport's I/O thread (pika: frames, acks, publishes).
    io_clock = time.pthread_getcpuclockid(transport._thread.ident)  # type: ignore[union-attr]
    marks = [time.thread_time(), time.clock_gettime(io_clock)]

    def thread_cpu(into: dict[str, float]) -> None:
        now = [time.thread_time(), time.clock_gettime(io_clock)]
        into["thread_main_cpu"] = now[0] - marks[0]
        into["thread_io_cpu"] = now[1] - marks[1]
        marks[:] = now

    rng = np.random.default_rng([job.seed, index, 999])
    per_round: list[dict[str, float]] = []
    stats: dict[str, float] = defaultdict(float)
    session: ParticipantSession | None = None
    vector: np.ndarray | None = None
    limits: WireLimits | None = None
    max_payload = 4 * job.params + (1 << 16)

    def send(body: bytes, message_type: str, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        transport.send(body, message_type=message_type, **kwargs)
        stats["publish_s"] += time.perf_counter() - t0
        stats["bytes_up"] += len(body)

    def step(name: str, t0: float, c0: float) -> None:
        """Wall seconds and CPU seconds (this thread) of one step of this participant."""
        stats[f"{name}_s"] += time.perf_counter() - t0
        stats[f"{name}_cpu"] += time.thread_time() - c0

    try:
        while True:
            delivery = transport.receive(timeout=5.0)
            if delivery is None:
                continue
            header, payload = protocol.decode(delivery.body, max_payload=max_payload)
            if isinstance(header, protocol.Finished):
                transport.ack(delivery)
                break
            if isinstance(header, protocol.RoundAnnouncement) and stats:
                thread_cpu(stats)
                per_round.append(dict(stats))  # the previous round is over
                stats = defaultdict(float)
            stats["bytes_down"] += len(delivery.body)
            if isinstance(header, protocol.RoundAnnouncement):
                t0, c0 = time.perf_counter(), time.thread_time()
                protocol.weights_from_bytes(payload)  # the services decode and check the weights too
                update = synthetic_update(job.seed, index, header.round, job.params)
                step("make_update", t0, c0)
                if not job.secure:
                    send(update.tobytes(), "update", headers={"weight": sample_count(index)})
                else:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    layout = header.layout.layout()
                    vector, _ = layout.encode(
                        update.astype(np.float64),
                        weight=sample_count(index),
                        evaluation=EvalCounts.zero(NUM_CLASSES),
                        epsilon=1.0,
                        rng=rng,
                    )
                    limits = WireLimits(
                        max_participants=len(roster.members),
                        vector_length=layout.length,
                        ring_bits=layout.ring_bits,
                    )
                    max_payload = max(4 * job.params, limits.max_message_bytes)
                    step("quantise", t0, c0)
                    ready = protocol.Ready(
                        federation=job.federation,
                        round=header.round,
                        attempt=header.attempt,
                        aggregation=header.aggregation,
                    )
                    send(protocol.encode(ready), "ready")
            elif isinstance(header, protocol.SecAgg):
                assert limits is not None and vector is not None
                t0, c0 = time.perf_counter(), time.thread_time()
                message = decode_secagg(payload, limits)
                if isinstance(message, StartAggregation):
                    session = ParticipantSession(
                        index=index,
                        identity=identity,
                        roster=roster.secagg_roster(),
                        policy=ParticipantPolicy(
                            federation=job.federation,
                            vector_length=limits.vector_length,
                            ring_bits=limits.ring_bits,
                        ),
                        vector=vector,
                    )
                assert session is not None
                replies = session.receive(message)  # type: ignore[arg-type]
                bodies = [
                    protocol.encode(protocol.SecAgg(federation=job.federation), encode_secagg(r))
                    for r in replies
                ]
                step(f"secagg_{type(message).__name__}", t0, c0)
                for body in bodies:
                    send(body, "secagg")
                t0, c0 = time.perf_counter(), time.thread_time()
                if job.mask_ahead and session.prepare_masked_input():  # as the service does, after its shares
                    step("mask_ahead", t0, c0)
            transport.ack(delivery)
        if stats:
            thread_cpu(stats)
            per_round.append(dict(stats))
        results.put((job.organisation, per_round))
    finally:
        transport.close()


# --- curator ------------------------------------------------------------------------------------------------


@dataclass
class CuratorClock:
    """Where the curator's time goes within a round."""

    waiting_s: float = 0.0
    handling_s: float = 0.0
    publishing_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


class Harness:
    def __init__(self, args: argparse.Namespace, secure: bool) -> None:
        from tessera.crypto import SigningKey
        from tessera.roster import Member, RosterFile

        self.args = args
        self.secure = secure
        self.n = args.participants
        self.params = args.params
        tag = uuid.uuid4().hex[:8]
        self.federation = f"bench-{tag}"
        self.curator_user = f"bc-{tag}"
        self.organisations = [f"b{tag}-p{i:02d}" for i in range(1, self.n + 1)]
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
        self.processes: list[Any] = []
        self.profiler = cProfile.Profile() if args.profile else None
        self.transport: Any = None
        self.provisioned = False
        rng = np.random.default_rng(args.seed)
        self.weights = (rng.standard_normal(self.params, dtype=np.float32) * 0.1).astype(np.float32)

    # --- set-up and tear-down -----------------------------------------------------------------------------

    def __enter__(self) -> Harness:
        from tessera.transport import CuratorTransport, provision

        say(f"provisioning vhost tessera-{self.federation} and {self.n + 1} broker users ...")
        provision(
            self.federation,
            curator_password=self.passwords[self.curator_user],
            organisation_passwords={o: self.passwords[o] for o in self.organisations},
            curator_user=self.curator_user,
        )
        self.provisioned = True
        self.transport = CuratorTransport(
            transport_settings(user_url(BROKER_URL, self.curator_user, self.passwords[self.curator_user])),
            federation=self.federation,
            organisations=self.organisations,
            curator_user=self.curator_user,
        ).start()
        context = mp.get_context("spawn")
        self.started = context.Queue()
        self.results = context.Queue()
        for organisation in self.organisations:
            job = ParticipantJob(
                federation=self.federation,
                organisation=organisation,
                curator_user=self.curator_user,
                url=user_url(BROKER_URL, organisation, self.passwords[organisation]),
                roster_json=self.roster.model_dump_json(),
                identity_hex=self.keys[organisation].private_bytes().hex(),
                secure=self.secure,
                params=self.params,
                seed=self.args.seed,
                mask_ahead=self.args.mask_ahead == "on",
            )
            process = context.Process(
                target=participant_main, args=(job, self.started, self.results), name=organisation
            )
            process.start()
            self.processes.append(process)
        say(f"started {self.n} participant processes; waiting for their broker connections ...")
        for _ in self.organisations:
            self.started.get(timeout=180)
        return self

    def __exit__(self, *exc: object) -> None:
        from tessera.transport import deprovision

        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                say(f"participant process {process.name} (pid {process.pid}) did not exit; terminating it")
                process.terminate()
                process.join(timeout=10)
        if self.transport is not None:
            self.transport.close()
        if self.provisioned:
            try:
                deprovision(self.federation, organisations=self.organisations, curator_user=self.curator_user)
            except Exception as exc:  # cleanup must not hide the outcome
                say(f"could not remove vhost tessera-{self.federation} and its users: {exc}")

    def finish(self) -> dict[str, list[dict[str, float]]]:
        from tessera import protocol

        header = protocol.Finished(federation=self.federation, rounds_completed=0, reason="benchmark over")
        self.transport.broadcast(protocol.encode(header), message_type="finished")
        reports = {}
        for _ in self.processes:
            organisation, per_round = self.results.get(timeout=120)
            reports[organisation] = per_round
        return reports

    # --- one round ----------------------------------------------------------------------------------------

    def layout(self) -> Any:
        from tessera.fedavg import UpdateLayout, largest_value_bits

        return UpdateLayout(
            num_params=self.params,
            num_classes=NUM_CLASSES,
            clip=0.5,
            ring_bits=32,
            value_bits=largest_value_bits(ring_bits=32, max_weight=65_535, max_participants=self.n),
            max_weight=65_535,
            max_participants=self.n,
        )

    def announce(self, round_number: int, clock: CuratorClock) -> float:
        from tessera import protocol
        from tessera.models import ModelSpec

        announcement = protocol.RoundAnnouncement(
            federation=self.federation,
            round=round_number,
            attempt=0,
            aggregation=f"r{round_number}a0-{secrets.token_hex(4)}",
            model=ModelSpec(name="mlp", kwargs={"synthetic_parameters": self.params}),
            model_fingerprint="0" * 64,
            layout=protocol.LayoutHeader.of(self._layout),
            roster_fingerprint="0" * 64,  # synthetic participants check nothing but the layout
        )
        t0 = time.perf_counter()
        body = protocol.encode(announcement, protocol.weights_to_bytes(self.weights))
        self.transport.broadcast(body, message_type="round")
        now = time.perf_counter()
        clock.phases["broadcast"] = now - t0
        clock.publishing_s += now - t0
        self._aggregation = announcement.aggregation
        return now

    def receive(self, clock: CuratorClock, timeout: float) -> Any:
        """The next delivery, or None after ``timeout`` s; raises at once if a participant process died."""
        t0 = time.perf_counter()
        deadline = t0 + timeout
        while True:
            delivery = self.transport.receive(timeout=max(0.0, min(1.0, deadline - time.perf_counter())))
            if delivery is not None or time.perf_counter() >= deadline:
                break
            dead = [f"{p.name} (exit code {p.exitcode})" for p in self.processes if not p.is_alive()]
            if dead:
                raise RuntimeError(
                    f"participant processes died: {', '.join(dead)}; see their traceback above"
                )
        clock.waiting_s += time.perf_counter() - t0
        return delivery

    def plain_round(self, round_number: int) -> CuratorClock:
        clock = CuratorClock()
        started = self.announce(round_number, clock)
        total = np.zeros(self.params, dtype=np.float64)
        weight = 0
        received: set[str] = set()
        while len(received) < self.n:
            delivery = self.receive(clock, 60.0)
            if delivery is None:
                raise TimeoutError(f"round {round_number}: {len(received)} of {self.n} updates in 60 s")
            t0 = time.perf_counter()
            update = np.frombuffer(delivery.body, dtype="<f4")
            if update.shape != (self.params,) or delivery.sender in received:
                raise RuntimeError(f"unexpected message from {delivery.sender}")
            w = int(delivery.headers["weight"])
            total += update.astype(np.float64) * w  # summed on arrival, as the secure sum is
            weight += w
            received.add(delivery.sender)
            self.transport.ack(delivery)
            clock.handling_s += time.perf_counter() - t0
        uploaded = time.perf_counter()
        clock.phases["upload"] = uploaded - started
        self.weights = (self.weights + total / weight).astype(np.float32)
        clock.phases["aggregate"] = time.perf_counter() - uploaded
        clock.handling_s += clock.phases["aggregate"]
        return clock

    def secure_round(self, round_number: int) -> CuratorClock:
        from tessera import protocol
        from tessera.envelope import secagg_envelopes
        from tessera.secagg.config import AggregationConfig, Graph, SessionIds, default_threshold
        from tessera.secagg.curator import CuratorSession, PhaseTimeouts
        from tessera.secagg.wire import WireLimits
        from tessera.secagg.wire import decode as decode_secagg

        layout = self._layout
        limits = WireLimits(max_participants=self.n, vector_length=layout.length, ring_bits=32)
        clock = CuratorClock()
        mark = self.announce(round_number, clock)
        ready: set[str] = set()
        while len(ready) < self.n:
            delivery = self.receive(clock, 60.0)
            if delivery is None:
                raise TimeoutError(f"round {round_number}: {len(ready)} of {self.n} ready in 60 s")
            header, _ = protocol.decode(delivery.body, max_payload=limits.max_message_bytes)
            assert isinstance(header, protocol.Ready) and header.aggregation == self._aggregation
            ready.add(delivery.sender)
            self.transport.ack(delivery)
        now = time.perf_counter()
        clock.phases["ready"] = now - mark
        mark = now

        indices = [self.roster.index_of(o) for o in sorted(ready)]
        t0 = time.perf_counter()
        config = AggregationConfig.create(
            ids=SessionIds(federation=self.federation, round=round_number, aggregation=self._aggregation),
            participants=indices,
            vector_length=layout.length,
            ring_bits=32,
            threshold=default_threshold(len(indices)),
            graph=Graph.FULL,
            graph_seed=secrets.token_bytes(32),
        )
        session = CuratorSession(
            config=config,
            roster=self.roster.secagg_roster(),
            timeouts=PhaseTimeouts(advertise=60, share=60, masked_input=60, consistency=60, unmask=60),
        )
        clock.handling_s += time.perf_counter() - t0

        def send(outgoing: list[Any]) -> None:
            t0 = time.perf_counter()
            envelopes = secagg_envelopes(self.federation, outgoing, self.roster.organisation_of)
            t1 = time.perf_counter()
            clock.handling_s += t1 - t0
            # As the curator service does: all of one step's messages in one send_each (their confirms
            # overlap), one publish per message (to several organisations with the BCC header).
            self.transport.send_each(envelopes)
            clock.publishing_s += time.perf_counter() - t1

        phase = session.phase.value
        send(session.start(time.monotonic()))
        while not session.finished:
            delivery = self.receive(clock, 1.0)
            if delivery is not None:
                t0 = time.perf_counter()
                header, payload = protocol.decode(delivery.body, max_payload=limits.max_message_bytes)
                assert isinstance(header, protocol.SecAgg)
                message = decode_secagg(payload, limits)
                out = session.receive(self.roster.index_of(delivery.sender), message, time.monotonic())  # type: ignore[arg-type]
                self.transport.ack(delivery)
                clock.handling_s += time.perf_counter() - t0
                send(out)
            send(session.poll(time.monotonic()))
            if session.phase.value != phase:
                now = time.perf_counter()
                clock.phases[phase] = now - mark
                phase, mark = session.phase.value, now
        if session.result is None:
            raise RuntimeError(f"aggregation aborted: {session.abort_reason}")
        t0 = time.perf_counter()
        aggregate = layout.decode(session.result.total)
        self.weights = (self.weights + aggregate.mean_update).astype(np.float32)
        clock.phases["decode"] = time.perf_counter() - t0
        clock.handling_s += clock.phases["decode"]
        return clock

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the curator process, all participant processes, and the broker."""
        out = {"curator": sum(os.times()[:2])}
        out["participants"] = sum(process_cpu(p.pid) or 0.0 for p in self.processes)
        broker = broker_pid()
        cpu = process_cpu(broker) if broker is not None else None
        if cpu is not None:
            out["broker"] = cpu
        return out

    def run(self) -> dict[str, Any]:
        self._layout = self.layout()
        rounds = self.args.warmup + self.args.rounds
        timed: list[tuple[float, CuratorClock, float]] = []
        for r in range(1, rounds + 1):
            before = self.weights.astype(np.float64)
            cpu_before = self.cpu()
            profiling = self.profiler is not None and r > self.args.warmup
            if profiling:
                self.profiler.enable()
            t0 = time.perf_counter()
            clock = self.secure_round(r) if self.secure else self.plain_round(r)
            seconds = time.perf_counter() - t0
            if profiling:
                self.profiler.disable()
            clock.cpu = {k: v - cpu_before[k] for k, v in self.cpu().items() if k in cpu_before}
            error = self.check(r, before)
            kind = "warm-up" if r <= self.args.warmup else "timed"
            say(
                f"  {'secure' if self.secure else 'plain'} round {r} ({kind}): {seconds:.3f} s  "
                + " ".join(f"{k}={v:.3f}" for k, v in clock.phases.items())
                + f"  max_abs_error={error:.2e}  cpu: "
                + " ".join(f"{k}={v:.2f}" for k, v in clock.cpu.items())
            )
            if r > self.args.warmup:
                timed.append((seconds, clock, error))
        reports = self.finish()
        if self.profiler is not None:
            out = io.StringIO()
            pstats.Stats(self.profiler, stream=out).sort_stats("cumulative").print_stats(25)
            say(f"curator profile over the timed rounds (cProfile, cumulative):\n{out.getvalue()}")
        return self.figures(timed, reports)

    def check(self, round_number: int, before: np.ndarray) -> float:
        """Largest deviation of the new weights from the exact float64 weighted mean (not timed)."""
        total = np.zeros(self.params, dtype=np.float64)
        weight = 0
        for i, _ in enumerate(self.organisations, start=1):
            total += synthetic_update(self.args.seed, i, round_number, self.params).astype(np.float64) * (
                sample_count(i)
            )
            weight += sample_count(i)
        expected = before + total / weight
        return float(np.max(np.abs(self.weights.astype(np.float64) - expected)))

    def figures(
        self, timed: list[tuple[float, CuratorClock, float]], reports: dict[str, list[dict[str, float]]]
    ) -> dict[str, Any]:
        def median(values: list[float]) -> float:
            return round(statistics.median(values), 4)

        phase_names = list(timed[0][1].phases)
        warm = self.args.warmup
        participant_steps: dict[str, float] = {}
        steps = sorted({k for rounds in reports.values() for r in rounds[warm:] for k in r})
        for key in steps:
            if key.endswith(("_s", "_cpu")):
                # median over timed rounds of the slowest participant in that round
                participant_steps[key] = median(
                    [
                        max(rounds[i].get(key, 0.0) for rounds in reports.values())
                        for i in range(warm, warm + len(timed))
                    ]
                )
        cpu_total = {
            key: median(
                [
                    sum(rounds[i].get(key, 0.0) for rounds in reports.values())
                    for i in range(warm, warm + len(timed))
                ]
            )
            for key in steps
            if key.endswith("_cpu")
        }
        bytes_up = max(
            int(statistics.median([r["bytes_up"] for r in rounds[warm:]])) for rounds in reports.values()
        )
        bytes_down = max(
            int(statistics.median([r["bytes_down"] for r in rounds[warm:]])) for rounds in reports.values()
        )
        return {
            "secure": self.secure,
            "participants": self.n,
            "params": self.params,
            "rounds": len(timed),
            "warmup_rounds": warm,
            "round_s_median": median([t[0] for t in timed]),
            "round_s": [round(t[0], 4) for t in timed],
            "phases_s_median": {p: median([t[1].phases[p] for t in timed]) for p in phase_names},
            "curator_s_median": {
                "waiting": median([t[1].waiting_s for t in timed]),
                "handling": median([t[1].handling_s for t in timed]),
                "publishing": median([t[1].publishing_s for t in timed]),
            },
            "participant_slowest_s_median": participant_steps,
            "participants_cpu_sum_s_median": cpu_total,
            "cpu_s_per_round_median": {k: median([t[1].cpu[k] for t in timed]) for k in timed[0][1].cpu},
            "bytes_up_per_participant": bytes_up,
            "bytes_down_per_participant": bytes_down,
            "vector_bytes_float32": 4 * self.params,
            "max_abs_error": max(t[2] for t in timed),
            "cpus": len(os.sched_getaffinity(0)),
        }


def run_mode(args: argparse.Namespace, secure: bool) -> dict[str, Any]:
    say(f"== {'secure aggregation' if secure else 'plain (no secure aggregation)'} ==")
    with Harness(args, secure) as harness:
        return harness.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--secure", choices=["on", "off", "both"], default="on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mask-ahead",
        choices=["on", "off"],
        default="on",
        help="participants mask right after sending their shares, as the service does (on), or on ForwardedShares",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the curator; top functions on stderr"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.participants < 3 or args.params < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("need --participants >= 3, --params >= 1, --rounds >= 1, --warmup >= 0")
    from tessera.transport import local_broker_problem

    problem = local_broker_problem(BROKER_URL)
    if problem is not None:
        print(
            f"bench/rounds.py needs a real RabbitMQ broker: {problem}. Start one with "
            "`bash scripts/ensure-broker.sh` (or set TESSERA_BENCH_AMQP_URL).",
            file=sys.stderr,
        )
        return 2
    from tessera.settings import LoggingSettings, configure_logging

    configure_logging(LoggingSettings(level="warning"))
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.secure]
    results = [run_mode(args, secure) for secure in modes]
    if len(results) == 1:
        figures: dict[str, Any] = results[0]
    else:
        plain, secure = results
        figures = {
            "plain": plain,
            "secure": secure,
            "secure_over_plain": round(secure["round_s_median"] / plain["round_s_median"], 3),
        }
    if args.json:
        print(json.dumps(figures))
    else:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
