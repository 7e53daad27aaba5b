"""Three clustered RabbitMQ nodes of the test's own, started by ``scripts/rabbitmq-cluster.sh``.

The script is what an operator runs by hand; this wraps it with a fresh directory, node names and free
ports per test, so that tests never meet each other's nodes (nor the shared broker on 5672). The
attributes :class:`tests.integration.conftest.Federation` reads from a broker are those of
:class:`PrivateBroker`: ``url`` (node 1, what the processes' URL names), ``node`` (the node ``rabbitmqctl
-n`` administers), plus ``addresses`` (every node's ``host:port``, given to the processes as
``broker.addresses`` so that they reconnect to another node when theirs dies).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tessera.transport.provision import child_environment

from .private_broker import PrivateBrokerUnavailable, _ephemeral_range

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq-cluster.sh"
NODES = 3


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base() -> int:
    """A base port with ``base..base+2`` and ``base+100..base+102`` free, below the ephemeral range."""
    low, _ = _ephemeral_range()
    for base in range(low - 11000, low - 200, 211):
        ports = [base + i for i in range(NODES)] + [base + 100 + i for i in range(NODES)]
        if all(_free(p) for p in ports) and 5672 not in ports and 4369 not in ports:
            return base
    raise PrivateBrokerUnavailable("no free ports for a cluster below the ephemeral range")


class RabbitCluster:
    def __init__(self, *, start_timeout: float = 180.0) -> None:
        if os.geteuid() != 0:
            raise PrivateBrokerUnavailable("starting nodes as the rabbitmq user needs root")
        tag = uuid.uuid4().hex[:6]
        self.root = Path(tempfile.mkdtemp(prefix=f"tessera-rmq-cluster-{tag}-", dir="/tmp"))
        self.name = f"tessera-cl-{tag}-"
        self.base = _free_base()
        self.nodes = [f"{self.name}{i + 1}@localhost" for i in range(NODES)]
        self.ports = [self.base + i for i in range(NODES)]
        self.addresses = tuple(f"127.0.0.1:{port}" for port in self.ports)
        self.url = f"amqp://127.0.0.1:{self.ports[0]}/"
        self.node = self.nodes[0]
        self.start_timeout = start_timeout
        self.start_seconds = 0.0
        self.closed = False

    def _env(self) -> dict[str, str]:
        return {
            **child_environment(),
            "TESSERA_CLUSTER_DIR": str(self.root),
            "TESSERA_CLUSTER_PORT": str(self.base),
            "TESSERA_CLUSTER_NAME": self.name,
            "TESSERA_CLUSTER_START_TIMEOUT": str(int(self.start_timeout)),
        }

    def script(self, command: str, *, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), command],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> float:
        """Start and join the three nodes; returns the seconds it took. :class:`PrivateBrokerUnavailable`
        (the test skips) if they cannot start here."""
        started = time.monotonic()
        try:
            done = self.script("start", timeout=self.start_timeout + 120)
        except subprocess.TimeoutExpired as exc:
            self.close()
            raise PrivateBrokerUnavailable(f"the cluster did not start: {exc}") from exc
        if done.returncode != 0:
            self.close()
            raise PrivateBrokerUnavailable(
                f"rabbitmq-cluster.sh start exited with {done.returncode}: {done.stderr.strip()[-800:]}"
            )
        self.start_seconds = time.monotonic() - started
        return self.start_seconds

    def ctl(self, index: int, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n <node index>`` (0-based) ``args``; its standard output."""
        done = subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.nodes[index], *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_environment(),
        )
        if done.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {args[0]} on {self.nodes[index]}: {done.stderr.strip()[-500:]}"
            )
        return done.stdout

    def pid(self, index: int) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.root / f"node{index + 1}" / "node.pid").read_text().strip())
        return None

    def kill(self, index: int, *, timeout: float = 30.0) -> None:
        """SIGKILL node ``index``'s Erlang VM (a crashed machine, not a clean stop) and wait until its port
        is closed; the cluster's ``node`` and ``url`` become another node's, for the tests' own connections
        and administration (the processes keep their settings and find the live nodes themselves)."""
        pid = self.pid(index)
        assert pid is not None, f"no pid file for {self.nodes[index]}"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while not _free(self.ports[index]):
            assert time.monotonic() < deadline, f"{self.nodes[index]} still listens after SIGKILL"
            time.sleep(0.1)
        survivor = (index + 1) % NODES
        self.node, self.url = self.nodes[survivor], f"amqp://127.0.0.1:{self.ports[survivor]}/"

    def log(self, lines: int = 30) -> str:
        text = []
        for path in sorted(self.root.glob("node*/log/*.log")):
            with contextlib.suppress(OSError):
                text += [f"--- {path}", *path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(text)

    def close(self) -> None:
        """Stop every node (SIGKILL what will not stop) and remove the directory."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.script("stop", timeout=120)
        for index in range(NODES):  # in case the script could not
            pid = self.pid(index)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.root.exists():
            subprocess.run(["rm", "-rf", str(self.root)], check=False)


__all__ = ["RabbitCluster"]
