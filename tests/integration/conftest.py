"""Harness for the integration tests: a real RabbitMQ broker, real curator and participant processes.

Each test builds one or more :class:`Federation` objects with the ``federation`` fixture. A federation gets

- its own ids (federation, organisations, curator user: broker users are global across vhosts, so every
  test must use fresh names), a roster with identity keys, and broker passwords in files;
- scikit-learn's breast-cancer data split unevenly across its organisations, one CSV file each, plus the
  shared feature encoding (exactly what ``tessera.apps.demo`` does for its hospitals);
- a provisioned vhost (``tessera.transport.provision``), deprovisioned in the fixture's finalizer whatever
  happens, after every process group it started was SIGKILLed;
- a *tap*: a queue declared with the curator's credentials (which the topology already allows: configure,
  write and read on ``curator.*``) and bound to ``to.#`` on ``tessera.to-participants`` and ``from.#`` on
  ``tessera.to-curator``. The broker copies every message of the federation into it, so a test can read
  the global model the curator announced in each round (the only way to know the model a past round
  evaluated: the checkpoint keeps only the newest weights) and capture real messages to replay later.

Processes are started as ``python -m tessera.apps.cli curator|participant``, configured only through
``TESSERA_*`` variables built from nested settings dicts (``tessera.apps.demo.environment``), each in its own
process group, with stderr (JSON logs) in ``<tmp>/logs/<name>.<run>.log``. When a test fails, the tails of
all logs are printed.

Participants are started first and the curator last, after the test declared the topology (so the
participants' passive declares succeed at once): round 1 then does not race the participants' start-up
(importing torch and Opacus takes seconds per process on this 2-core machine), and the training timeout can
stay short.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import numpy as np
import pika
import pika.exceptions
import pytest
from pydantic import SecretStr

from .cluster import RabbitCluster
from .private_broker import PrivateBroker, PrivateBrokerUnavailable

BROKER_URL = os.environ.get("TESSERA_TEST_AMQP_URL", "amqp://127.0.0.1:5672/")
TAP_QUEUE = "curator.integration-tap"
LABELS = ("benign", "malignant")
NUM_CLASSES = 2
T = TypeVar("T")


# --- session: test reports ------------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the item, so fixtures know in their finalizer whether a test failed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


# --- data ------------------------------------------------------------------------------------------------------


@cache
def _breast_cancer() -> tuple[list[str], np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [n.replace(" ", "_") for n in data.feature_names]
    return names, np.asarray(data.data), np.asarray(data.target)


def write_organisation_data(directory: Path, organisations: list[str]) -> tuple[dict[str, Path], Path]:
    """Split the 569 breast-cancer records unevenly across ``organisations``; one CSV per organisation and
    the agreed feature encoding (mean/std of the public data set), as ``tessera.apps.demo`` does."""
    from tessera.data import FeatureEncoding, NumericFeature

    names, x, target = _breast_cancer()
    labels = np.where(target == 0, "malignant", "benign")
    order = np.random.default_rng(7).permutation(len(labels))
    weights = np.arange(len(organisations) + 2, 2, -1, dtype=float)  # e.g. 6:5:4:3 for four organisations
    bounds = np.concatenate([[0], np.round(np.cumsum(weights / weights.sum()) * len(order))]).astype(int)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for organisation, start, stop in zip(organisations, bounds[:-1], bounds[1:], strict=True):
        path = directory / f"{organisation}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["record_id", *names, "diagnosis"])
            for row in order[start:stop]:
                writer.writerow([f"r{row:04d}", *(f"{v:.6g}" for v in x[row]), labels[row]])
        files[organisation] = path
    encoding = FeatureEncoding(
        features=tuple(
            NumericFeature(name=n, mean=float(m), std=float(s))
            for n, m, s in zip(names, x.mean(axis=0), x.std(axis=0), strict=True)
        )
    )
    encoding_path = directory / "encoding.json"
    encoding_path.write_text(encoding.model_dump_json(indent=2))
    return files, encoding_path


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "kwargs":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --- processes and logs ----------------------------------------------------------------------------------------


@dataclass
class Process:
    """One run of a service process (a restart is a new ``Process`` with a new log file)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    killed: bool = False

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.log)

    def find(self, event: str, **fields: Any) -> dict[str, Any] | None:
        return next((e for e in self.events() if matches(e, event, fields)), None)

    def kill(self) -> None:
        """SIGKILL the whole process group (the service and anything it started)."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text[-lines:])


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log records of a file; other lines (a traceback, a warning) are skipped."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def matches(record: dict[str, Any], event: str, fields: dict[str, Any]) -> bool:
    return record.get("event") == event and all(record.get(k) == v for k, v in fields.items())


@dataclass(frozen=True)
class Captured:
    """One message copied into the tap queue by the broker."""

    exchange: str
    routing_key: str
    user_id: str | None
    message_type: str | None
    body: bytes = field(repr=False)


# --- one federation --------------------------------------------------------------------------------------------


class Federation:
    """A provisioned federation on the real broker, its processes, logs, tap and the direct computations
    the tests compare the curator's results with."""

    def __init__(
        self,
        root: Path,
        *,
        organisations: int,
        curator: dict[str, Any] | None = None,
        participant: dict[str, Any] | None = None,
        roster: dict[str, Any] | None = None,
        cleanups: list[threading.Thread],
        broker: PrivateBroker | RabbitCluster | None = None,
        durable_tap: bool = False,
        queue_type: str = "classic",
    ) -> None:
        """``broker``: a private RabbitMQ node of the test's own (to restart it), or a cluster of such nodes
        (every process is given all their addresses), instead of the shared broker at ``BROKER_URL``.
        ``durable_tap``: the tap queue survives a broker restart (with what it holds). ``queue_type``: of
        every queue, the tap's too (``quorum``: replicated over a cluster's nodes)."""
        from tessera.roster import FederationParameters, build_roster, create_identity

        self.root = root
        self.broker = broker
        self.broker_url = broker.url if broker is not None else BROKER_URL
        self.durable_tap = durable_tap or queue_type == "quorum"  # quorum queues are always durable
        self.queue_type = queue_type
        self.cleanups = cleanups
        tag = uuid.uuid4().hex[:8]
        self.federation = f"it-{tag}"
        self.curator_user = f"cur-{tag}"
        self.organisations = [f"{chr(ord('a') + i)}-{tag}" for i in range(organisations)]
        self.processes: list[Process] = []
        self.captured: list[Captured] = []
        self.provisioned = False
        self.closed = False
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        files, encoding = write_organisation_data(root / "data", self.organisations)
        federation_dir = root / "federation"
        # The deployment's key custody: each organisation makes its identity key where its participant runs
        # (its state dir); the coordinator builds the roster from the public keys only.
        public_keys = {
            o: create_identity(root / "participants" / o / "identity.key")[0].public_bytes
            for o in self.organisations
        }
        parameters = FederationParameters.model_validate(deep_merge({"layout": {"clip": 1.0}}, roster or {}))
        built = build_roster(
            self.federation, public_keys, parameters=parameters, curator_user=self.curator_user
        )
        federation_dir.mkdir(parents=True, exist_ok=True)
        built.save(federation_dir / "roster.json")
        self.roster_fingerprint = built.fingerprint()
        from tessera.transport import generate_password

        self.passwords = {u: generate_password() for u in (self.curator_user, *self.organisations)}
        secrets_dir = federation_dir / "broker"
        secrets_dir.mkdir(parents=True, exist_ok=True)
        for user, password in self.passwords.items():
            (secrets_dir / user).write_text(password)
            (secrets_dir / user).chmod(0o600)
        model = {"name": "mlp", "kwargs": {"input_dim": 30, "hidden": [8], "num_classes": NUM_CLASSES}}
        common: dict[str, Any] = {
            "federation": self.federation,
            "roster_file": str(federation_dir / "roster.json"),
            "model": model,
            "num_classes": NUM_CLASSES,
            "logging": {"format": "json", "level": "info"},
            "health": {"host": "127.0.0.1", "port": 0},
        }

        def broker_settings(user: str) -> dict[str, Any]:
            return {
                "url": self.broker_url,
                "username": user,
                "password_file": str(secrets_dir / user),
                "max_reconnect_delay": 2.0,
                "start_timeout": 60.0,
                "queue_type": queue_type,
                "addresses": ",".join(getattr(broker, "addresses", ())),
            }

        self.curator_settings = deep_merge(
            {
                **common,
                "state_dir": str(root / "curator"),
                "rounds": {
                    "max_rounds": 3,
                    "min_participants": 3,
                    "training_timeout": 25.0,
                    "attempts_per_round": 3,
                },
                "secagg": {"phase_timeout": 6.0},
                "roster_fingerprint": self.roster_fingerprint,
                "broker": broker_settings(self.curator_user),
            },
            curator or {},
        )
        self.participant_settings: dict[str, dict[str, Any]] = {}
        for index, organisation in enumerate(self.organisations):
            self.participant_settings[organisation] = deep_merge(
                {
                    **common,
                    "organisation": organisation,
                    "roster_fingerprint": self.roster_fingerprint,
                    "identity_key_file": str(root / "participants" / organisation / "identity.key"),
                    "state_dir": str(root / "participants" / organisation),
                    "data": {
                        "path": str(files[organisation]),
                        "label_column": "diagnosis",
                        "drop_columns": ["record_id"],
                        "encoding_file": str(encoding),
                        "label_classes": list(LABELS),
                        "validation_fraction": 0.25,
                        "split_seed": 11 + index,
                    },
                    "privacy": {
                        "target_epsilon": 20.0,
                        "delta": 1e-5,
                        "planned_rounds": 8,
                        "local_epochs": 1.0,
                        "batch_size": 32,
                        "lr": 0.5,
                        "max_grad_norm": 1.0,
                    },
                    "broker": broker_settings(organisation),
                },
                participant or {},
            )
        self._data: dict[str, Any] = {}

    # --- broker -----------------------------------------------------------------------------------------------

    @property
    def vhost(self) -> str:
        from tessera.transport import topology

        return topology.vhost(self.federation)

    def provision(self) -> None:
        """Create the vhost and users, declare the topology as the curator would, and the tap."""
        from tessera.transport import declare_topology, provision
        from tessera.transport import topology as topo

        self.provisioned = True  # from here on, close() deprovisions whatever happened
        provision(
            self.federation,
            curator_password=self.passwords[self.curator_user],
            organisation_passwords={o: self.passwords[o] for o in self.organisations},
            curator_user=self.curator_user,
            prune=False,  # fresh names: nothing to prune, and it saves a rabbitmqctl call
            backend=self.admin_backend(),
        )
        with self.connect(self.curator_user) as connection:
            channel = connection.channel()
            declare_topology(channel, self.federation, self.organisations, topo.QueueType(self.queue_type))
            channel.queue_declare(
                TAP_QUEUE,
                durable=self.durable_tap,
                arguments=topo.queue_arguments(topo.QueueType(self.queue_type)),
            )
            channel.queue_bind(TAP_QUEUE, topo.TO_PARTICIPANTS_EXCHANGE, routing_key="to.#")
            channel.queue_bind(TAP_QUEUE, topo.TO_CURATOR_EXCHANGE, routing_key="from.#")

    def admin_backend(self) -> Any:
        """``rabbitmqctl`` for the federation's broker (``-n`` the private node's name, if it has one)."""
        from tessera.transport.provision import RabbitmqctlBackend

        return RabbitmqctlBackend(node=self.broker.node if self.broker is not None else None)

    def connect(self, user: str) -> pika.BlockingConnection:
        """A short-lived plain pika connection to the federation's vhost as ``user``."""
        from tessera.transport import ConnectionSettings, connection_parameters

        # The broker's url, not the processes': a cluster's moves to a live node after a kill.
        parts = urlsplit(self.broker.url if self.broker is not None else self.broker_url)
        netloc = f"{quote(user, safe='')}:{quote(self.passwords[user], safe='')}@{parts.hostname}"
        url = f"amqp://{netloc}:{parts.port or 5672}/"
        params = connection_parameters(ConnectionSettings(url=SecretStr(url)), virtual_host=self.vhost)
        return pika.BlockingConnection(params)

    def publish(
        self,
        user: str,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        user_id: str | None = None,
        message_type: str = "secagg",
    ) -> None:
        """Publish one message as ``user`` (with publisher confirms); raises what pika raises if the broker
        refuses it (``ChannelClosedByBroker`` with 403 or 406, ``UnroutableError``)."""
        with self.connect(user) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(
                exchange,
                routing_key,
                body,
                properties=pika.BasicProperties(
                    user_id=user if user_id is None else user_id,
                    type=message_type,
                    delivery_mode=2,
                    message_id=uuid.uuid4().hex,
                ),
                mandatory=True,
            )

    def queue_depth(self, queue: str) -> int:
        with self.connect(self.curator_user) as connection:
            return int(connection.channel().queue_declare(queue, passive=True).method.message_count)

    def drain_tap(self) -> list[Captured]:
        """Move everything the tap holds into ``self.captured`` (in arrival order); returns all so far."""
        with self.connect(self.curator_user) as connection:
            channel = connection.channel()
            while True:
                method, properties, body = channel.basic_get(TAP_QUEUE, auto_ack=True)
                if method is None:
                    break
                self.captured.append(
                    Captured(method.exchange, method.routing_key, properties.user_id, properties.type, body)
                )
        return self.captured

    def captured_messages(self, *, routing_key: str) -> list[tuple[Any, bytes]]:
        """(header, payload) of the decodable federation messages the tap saw with ``routing_key``."""
        from tessera import protocol
        from tessera.errors import ProtocolError

        out = []
        for message in self.drain_tap():
            if message.routing_key != routing_key:
                continue
            try:
                out.append(protocol.decode(message.body, max_payload=1 << 26))
            except ProtocolError:
                continue
        return out

    def announced_weights(self) -> dict[int, np.ndarray]:
        """Round -> the global weights the curator broadcast for it. Every announcement of one round (retried
        attempts, re-announcements after a restart) must carry the same weights."""
        from tessera import protocol

        weights: dict[int, np.ndarray] = {}
        for header, payload in self.captured_messages(routing_key="to.all"):
            if not isinstance(header, protocol.RoundAnnouncement):
                continue
            w = protocol.weights_from_bytes(payload)
            if header.round in weights:
                assert np.array_equal(weights[header.round], w), (
                    f"round {header.round} was announced twice with different weights"
                )
            weights[header.round] = w
        return weights

    def close(self, *, print_logs: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=30)
        if print_logs:
            print(self.diagnostics())
        if self.provisioned and self.broker is None:  # a private node is removed whole by its fixture
            from tessera.transport import deprovision

            cleanup = threading.Thread(
                target=deprovision,
                args=(self.federation,),
                kwargs={"organisations": self.organisations, "curator_user": self.curator_user},
                daemon=True,
            )
            cleanup.start()
            self.cleanups.append(cleanup)

    # --- processes --------------------------------------------------------------------------------------------

    def _spawn(self, name: str, role: str, settings: dict[str, Any]) -> Process:
        from tessera.apps.demo import environment

        run = sum(1 for p in self.processes if p.name == name) + 1
        log = self.logs / f"{name}.{run}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env = {**base, **environment(settings), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with log.open("wb") as stderr:
            popen = subprocess.Popen(
                [sys.executable, "-m", "tessera.apps.cli", role],
                env=env,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group: killpg reaches everything it starts
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start_participant(self, organisation: str, **overrides: Any) -> Process:
        settings = deep_merge(self.participant_settings[organisation], overrides)
        return self._spawn(organisation, "participant", settings)

    def start_curator(self) -> Process:
        return self._spawn("curator", "curator", self.curator_settings)

    def start(
        self,
        *,
        faults: dict[str, dict[str, Any]] | None = None,
        curator_after: str = "data_loaded",
        timeout: float = 90.0,
    ) -> dict[str, Process]:
        """Provision, start every participant (``faults``: per-organisation fault-injection settings), and
        start the curator once each participant has logged ``curator_after``: ``data_loaded`` (imports
        done; the curator's start-up overlaps their privacy planning, so round 1's training timeout must
        cover a few seconds of it) or ``broker_connected`` (ready to train at once)."""
        self.provision()
        started = {
            o: self.start_participant(o, **({"faults": faults[o]} if faults and o in faults else {}))
            for o in self.organisations
        }
        for organisation, process in started.items():
            self.wait_for(
                f"{organisation}: {curator_after}", lambda p=process: p.find(curator_after), timeout
            )
        started["curator"] = self.start_curator()
        return started

    def latest(self, name: str) -> Process:
        return [p for p in self.processes if p.name == name][-1]

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log records of every run of ``name``, in run order."""
        return [e for p in self.processes if p.name == name for e in p.events()]

    def check_alive(self) -> None:
        """Fail at once if a process we did not kill exited with an error."""
        for process in self.processes:
            code = process.returncode
            if code not in (None, 0) and not process.killed:
                raise AssertionError(f"{process.name} exited with {code} unexpectedly\n{self.diagnostics()}")

    def wait_for(self, what: str, condition: Callable[[], T | None], timeout: float) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.1)

    def wait_event(
        self, process: Process, event: str, timeout: float = 60.0, **fields: Any
    ) -> dict[str, Any]:
        return self.wait_for(
            f"{process.name}: {event} {fields or ''}", lambda: process.find(event, **fields), timeout
        )

    def finish(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for the curator to end the federation and every participant we did not kill to exit; all must
        exit with 0. Returns the curator's report."""
        curator = self.latest("curator")
        self.wait_for("the curator to exit", lambda: curator.returncode is not None, timeout)
        running = [p for p in self.processes if p.name != "curator" and not p.killed]
        self.wait_for(
            "the participants to exit", lambda: all(p.returncode is not None for p in running), 30.0
        )
        failed = {f"{p.name}#{i}": p.returncode for i, p in enumerate(self.processes) if not p.killed}
        failed = {k: v for k, v in failed.items() if v != 0}
        assert not failed, f"processes exited with errors {failed}\n{self.diagnostics()}"
        report = self.report()
        assert report is not None, "the curator wrote no report"
        assert report["status"] == "finished", report
        return report

    def report(self) -> dict[str, Any] | None:
        try:
            return json.loads((Path(self.curator_settings["state_dir"]) / "report.json").read_text())
        except (OSError, ValueError):
            return None

    def rounds_completed(self) -> int:
        report = self.report()
        return 0 if report is None else int(report["rounds_completed"])

    def accountant(self, organisation: str) -> dict[str, Any]:
        path = Path(self.participant_settings[organisation]["state_dir"]) / "accountant.json"
        return json.loads(path.read_text())

    def accountant_epsilon(self, organisation: str) -> float:
        """ε of the stored accountant history, computed here with Opacus' RDP accountant."""
        from opacus.accountants import create_accountant

        document = self.accountant(organisation)
        accountant = create_accountant(mechanism=document["mechanism"])
        accountant.history = [tuple(h) for h in document["history"]]
        return float(
            accountant.get_epsilon(delta=self.participant_settings[organisation]["privacy"]["delta"])
        )

    def diagnostics(self) -> str:
        parts = [f"=== federation {self.federation} ({self.root})"]
        for process in self.processes:
            parts.append(
                f"--- {process.log.name} (exit {process.returncode}{', killed' if process.killed else ''})"
            )
            parts.append(process.tail())
        report = self.report()
        if report is not None:
            brief = {k: report.get(k) for k in ("status", "stop_reason", "rounds_completed", "restarts")}
            parts.append(f"--- report: {brief}")
        return "\n".join(parts)

    # --- direct computation of what the curator should have learnt -------------------------------------------

    def local_data(self, organisation: str) -> Any:
        """(train, validation) exactly as the participant loads them (same file, encoding and split seed)."""
        if organisation not in self._data:
            from tessera.participant.main import load_local_data
            from tessera.participant.settings import DataSettings

            data = DataSettings(**self.participant_settings[organisation]["data"])
            self._data[organisation] = load_local_data(data)
        return self._data[organisation]

    def train_size(self, organisation: str) -> int:
        return len(self.local_data(organisation)[0])

    def expected_evaluation(self, weights: np.ndarray, organisations: list[str]) -> Any:
        """Σ over ``organisations`` of the counts of the model with ``weights`` on their validation splits."""
        import torch
        from tessera.evaluation import EvalCounts
        from tessera.inference import evaluate
        from tessera.models import ModelSpec, build_model, load_flat_parameters

        torch.set_num_threads(1)
        model = build_model(ModelSpec(**self.curator_settings["model"]))
        load_flat_parameters(model, weights)
        total = EvalCounts.zero(NUM_CLASSES)
        for organisation in organisations:
            total = total + evaluate(model, self.local_data(organisation)[1], NUM_CLASSES)
        return total

    def initial_weights(self) -> np.ndarray:
        """The curator's initial model: built after ``torch.manual_seed(rounds.seed)`` (default 0)."""
        import torch
        from tessera.models import ModelSpec, build_model, flatten_parameters

        torch.manual_seed(self.curator_settings["rounds"].get("seed", 0))
        return flatten_parameters(build_model(ModelSpec(**self.curator_settings["model"])))

    def check_round(self, record: dict[str, Any], weights: np.ndarray, survivors: list[str]) -> None:
        """The round's secure-averaged metrics equal the direct evaluation of ``weights`` on the survivors'
        validation splits, and its total weight is the sum of their training-split sizes."""
        where = f"round {record['round']} (attempt {record['attempt']})"
        assert record["participants"] == sorted(survivors), where
        expected = self.expected_evaluation(weights, survivors)
        assert record["evaluated_examples"] == expected.total, where
        assert record["confusion"] == expected.confusion.tolist(), where
        assert record["accuracy"] == expected.correct / expected.total, where
        # The loss travels in fixed point (1/1000 per organisation); float sums may differ in the last bits.
        tolerance = (len(survivors) * 0.5e-3 + 1e-5 * abs(expected.loss_sum)) / expected.total
        assert abs(record["loss"] - expected.loss_sum / expected.total) <= tolerance, where
        assert record["total_weight"] == sum(self.train_size(o) for o in survivors), where
        assert record["non_private_participants"] == 0, where


@pytest.fixture
def federation(
    broker: list[threading.Thread], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Federation]]:
    """``federation(organisations=4, curator={...}, participant={...})`` -> a new :class:`Federation`.

    Finalizer: SIGKILL every process group, print the logs if the test failed, deprovision the broker."""
    created: list[Federation] = []

    def make(**kwargs: Any) -> Federation:
        fed = Federation(tmp_path / f"federation-{len(created)}", cleanups=broker, **kwargs)
        created.append(fed)
        return fed

    yield make
    report = getattr(request.node, "rep_call", None)
    failed = report is None or report.failed
    for fed in created:
        fed.close(print_logs=failed)


@pytest.fixture
def private_broker(request: pytest.FixtureRequest) -> Iterator[PrivateBroker]:
    """A running RabbitMQ node of this test's own (see ``private_broker.py``), to stop and start at will;
    pass it as ``federation(broker=...)``. Stopped and removed in the finalizer whatever happens (after the
    federations, which the ``federation`` fixture closes first when a test names it after this one)."""
    try:
        node = PrivateBroker()
    except PrivateBrokerUnavailable as exc:
        pytest.skip(f"cannot run a private RabbitMQ node: {exc}")
    try:
        node.start()
        yield node
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            print(f"=== private broker {node.node} ({node.url})\n{node.log()}")
        node.close()


@pytest.fixture
def rabbit_cluster(request: pytest.FixtureRequest) -> Iterator[RabbitCluster]:
    """Three clustered RabbitMQ nodes of this test's own (``scripts/rabbitmq-cluster.sh``), to kill at will;
    pass it as ``federation(broker=...)``. Skips when the cluster cannot start here; stopped and removed in
    the finalizer whatever happens."""
    try:
        cluster = RabbitCluster()
        cluster.start()
    except PrivateBrokerUnavailable as exc:
        pytest.skip(f"cannot run a three-node RabbitMQ cluster: {exc}")
    try:
        yield cluster
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            print(f"=== cluster {cluster.nodes}\n{cluster.log()}")
        cluster.close()
