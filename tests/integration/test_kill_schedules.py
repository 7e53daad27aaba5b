"""Random kill schedules (property-based): SIGKILL participants or the curator at random moments, restart
some of them, and check every invariant of :mod:`invariants` afterwards.

A schedule is drawn from one integer seed (printed at the start of each example; ``TESSERA_KILL_SEED=N``
runs exactly that schedule again, ``TESSERA_KILL_SCHEDULES=N`` draws N of them instead of the default 2; each
takes one to two minutes on this machine). It holds one or two kills, each

- of a participant: at a random moment after a round's announcement (training or any phase, whatever the
  clock hits), or inside a phase, at one of the fault-injection points where a process would otherwise
  pass too quickly to hit (``faults.stall_before``: before its ready report, or before the message of any
  secure-aggregation phase; it hangs there and is killed while hanging); then restarted (at once or after
  up to 3 s) or left dead -- at most one participant stays dead, so the federation can finish;
- or of the curator: at a random moment after a round's announcement, between two rounds (it pauses
  there, ``faults.pause_before_round``), or inside a phase: a participant chosen as the pacer holds that
  phase open for 2.5 s (a stall shorter than the phase timeout) and the curator is killed at a random
  instant of that window; it is always restarted, after up to 2 s.

After every curator kill, its checkpoint must load. After the schedule, the federation must finish with
every process exiting normally, and :func:`invariants.check_federation` must hold (exact sums over the
survivors' recorded inputs, aborted rounds retried under new aggregation ids with fresh keys, no id or key
used twice, ε never decreasing and matching the accountant files, the checkpoint loading).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .invariants import check_federation, curator_checkpoint

pytestmark = pytest.mark.integration

ORGANISATIONS = 4
ROUNDS = 3
PHASE_TIMEOUT = 3.0
PACER_STALL = 2.5
STALL_POINTS = ("ready", "advertise", "shares", "masked_input", "consistency", "unmask")
EXAMPLES = int(os.environ.get("TESSERA_KILL_SCHEDULES", "2"))
SEED = os.environ.get("TESSERA_KILL_SEED")


@dataclass(frozen=True)
class Kill:
    victim: str  # "curator" or an organisation index as text ("0".."3")
    round: int
    moment: str  # "random", "between_rounds" (curator only), or a stall point
    delay: float  # seconds after the trigger ("random": after the announcement; curator: in the window)
    restart_after: float | None  # None: left dead (participants only)
    pacer: int | None = None  # curator kills inside a phase: the participant holding the phase open

    def describe(self) -> str:
        who = "curator" if self.victim == "curator" else f"participant {self.victim}"
        restart = "left dead" if self.restart_after is None else f"restarted after {self.restart_after:.1f} s"
        pacer = f" (phase held by participant {self.pacer})" if self.pacer is not None else ""
        return f"{who} in round {self.round} at {self.moment}+{self.delay:.2f}s{pacer}, {restart}"


def schedule(seed: int) -> list[Kill]:
    """One or two kills, no process the victim or pacer of two of them, at most one participant left dead."""
    rng = random.Random(seed)
    kills: list[Kill] = []
    busy: set[int] = set()  # participants already configured with a fault
    left_dead = False
    for _ in range(rng.choice((1, 2))):
        round_number = rng.choice((1, 2))
        free = [i for i in range(ORGANISATIONS) if i not in busy]
        curator_used = any(k.victim == "curator" for k in kills)
        if not curator_used and rng.random() < 0.4 and free:
            moment = rng.choice(("random", "between_rounds", *STALL_POINTS))
            pacer = rng.choice(free) if moment in STALL_POINTS else None
            if pacer is not None:
                busy.add(pacer)
            delay = rng.uniform(0, 3.0) if moment == "random" else rng.uniform(0, PACER_STALL - 0.5)
            kills.append(Kill("curator", round_number, moment, delay, rng.uniform(0, 2.0), pacer))
            continue
        if not free:
            break
        victim = rng.choice(free)
        busy.add(victim)
        moment = rng.choice(("random", *STALL_POINTS))
        delay = rng.uniform(0, 3.0) if moment == "random" else 0.0
        dead = not left_dead and rng.random() < 0.3
        left_dead |= dead
        kills.append(Kill(str(victim), round_number, moment, delay, None if dead else rng.uniform(0, 3.0)))
    order = {m: i for i, m in enumerate(("random", *STALL_POINTS, "between_rounds"))}
    return sorted(kills, key=lambda k: (k.round, order[k.moment], k.delay))


def faults_of(kills: list[Kill], organisations: list[str]) -> tuple[dict, dict]:
    participants: dict[str, dict] = {}
    curator: dict = {}
    for kill in kills:
        if kill.victim == "curator":
            if kill.moment == "between_rounds":
                curator = {"pause_before_round": kill.round + 1, "pause_seconds": 5.0}
            elif kill.pacer is not None:
                participants[organisations[kill.pacer]] = {
                    "stall_before": kill.moment,
                    "stall_round": kill.round,
                    "stall_seconds": PACER_STALL,
                }
        elif kill.moment != "random":
            participants[organisations[int(kill.victim)]] = {
                "stall_before": kill.moment,
                "stall_round": kill.round,
            }
    return participants, curator


def run_schedule(make_federation, seed: int) -> None:
    kills = schedule(seed)
    print(f"kill schedule seed={seed}: " + "; ".join(k.describe() for k in kills), flush=True)
    fed = make_federation(
        organisations=ORGANISATIONS,
        curator={
            "rounds": {
                "max_rounds": ROUNDS,
                "min_participants": 3,
                "training_timeout": 20.0,
                "rejoin_wait": 20.0,
                "attempts_per_round": 3,
            },
            "secagg": {"phase_timeout": PHASE_TIMEOUT},
        },
        roster={"threshold_fraction": 0.6},
        participant={"faults": {"record_inputs": True}},
    )
    participant_faults, curator_faults = faults_of(kills, fed.organisations)
    fed.curator_settings["faults"] = curator_faults
    try:
        processes = fed.start(
            faults={o: {"record_inputs": True, **f} for o, f in participant_faults.items()},
            curator_after="broker_connected",
        )
        kills_of = {o: 0 for o in fed.organisations}
        completed_before = 0
        for kill in kills:
            if not trigger(fed, kill):
                print(f"  (the federation finished before: {kill.describe()})")
                continue
            time.sleep(kill.delay)
            if kill.victim == "curator":
                fed.latest("curator").kill()
                state = curator_checkpoint(fed)  # it must load, whenever the kill landed
                done = 0 if state is None else state.rounds_completed
                assert done >= completed_before, "the checkpoint went back"
                completed_before = done
                time.sleep(kill.restart_after or 0.0)
                fed.curator_settings["faults"] = {}
                fed.start_curator()
                continue
            organisation = fed.organisations[int(kill.victim)]
            fed.latest(organisation).kill()
            kills_of[organisation] += 1
            if kill.restart_after is not None:
                time.sleep(kill.restart_after)
                fed.start_participant(organisation)  # same state directory, no fault injection
        report = fed.finish(timeout=300.0)
        assert report["rounds_completed"] == ROUNDS, report["stop_reason"]
        check_federation(fed, report, kills=kills_of)
        assert curator_checkpoint(fed).rounds_completed == ROUNDS
        del processes
    except BaseException:
        fed.close(print_logs=True)
        print(f"FAILED kill schedule seed={seed} (rerun: TESSERA_KILL_SEED={seed})")
        raise
    fed.close(print_logs=False)


def trigger(fed, kill: Kill) -> bool:
    """Wait for the moment of ``kill``; False if the federation finished first."""
    if kill.victim == "curator":
        if kill.moment == "between_rounds":
            event, name, fields = "fault_injection_pause", "curator", {"round": kill.round + 1}
        elif kill.pacer is not None:
            event, name = "fault_injection_stall", fed.organisations[kill.pacer]
            fields = {"round": kill.round}
        else:
            event, name, fields = "round_announced", "curator", {"round": kill.round}
    elif kill.moment == "random":
        event, name, fields = "round_announced", "curator", {"round": kill.round}
    else:
        event, name, fields = (
            "fault_injection_stall",
            fed.organisations[int(kill.victim)],
            {"round": kill.round},
        )

    def seen():
        if any(
            e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
            for e in fed.events(name)
        ):
            return "seen"
        curator = fed.latest("curator")
        return "finished" if curator.returncode == 0 else None

    return fed.wait_for(f"{name}: {event} {fields}", seen, 180.0) == "seen"


seeds = st.just(int(SEED)) if SEED is not None else st.integers(0, 2**32 - 1)


@settings(
    max_examples=1 if SEED is not None else EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: an example takes minutes
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=seeds)
def test_random_kill_schedules_keep_every_invariant(federation, seed):
    run_schedule(federation, seed)


def test_schedules_are_valid():
    """The schedule generator itself: distinct victims and pacers, at most one participant left dead, the
    curator always restarted (fast; many seeds)."""
    for seed in range(2000):
        kills = schedule(seed)
        assert 1 <= len(kills) <= 2
        configured = [k.victim for k in kills if k.victim != "curator"] + [
            str(k.pacer) for k in kills if k.pacer is not None
        ]
        assert len(configured) == len(set(configured)), (seed, kills)
        assert sum(1 for k in kills if k.restart_after is None) <= 1
        assert all(k.restart_after is not None for k in kills if k.victim == "curator")
        assert sum(1 for k in kills if k.victim == "curator") <= 1
