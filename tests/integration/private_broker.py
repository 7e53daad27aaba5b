"""A RabbitMQ node of the test's own, on free ports, to stop and start while a federation runs.

The broker on 127.0.0.1:5672 is shared with everything else on the machine and must never be stopped, so a
test that restarts "the broker" starts a second node (its own node name, AMQP and distribution ports, data
and log directories, an empty plugin list: no management listener) with the same ``rabbitmq-server`` and
``rabbitmqctl`` the shared one uses, and restarts that. The node runs as the ``rabbitmq`` user (the Debian
wrappers switch to it when called as root), so it shares the Erlang cookie that ``rabbitmqctl`` reads, and
its directories live in a fresh directory under the system temporary directory that this user may write.

:meth:`PrivateBroker.close` stops the node (``rabbitmqctl shutdown``, then SIGKILL of its Erlang VM if it
is still there) and removes its directories; the ``private_broker`` fixture calls it whatever happens.
No pytest in here: ``bench/load.py`` runs its broker the same way.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tessera.transport.provision import child_environment


class PrivateBrokerUnavailable(Exception):
    """This host cannot run a private node (no RabbitMQ installed, no rabbitmq user, not root)."""


def _ephemeral_range() -> tuple[int, int]:
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 32768, 60999


def free_port() -> int:
    """A TCP port nobody listens on right now, *below* the kernel's ephemeral range.

    Not one the kernel hands out for outgoing connections: while the node is stopped, the services keep
    reconnecting to its port, and a port inside the ephemeral range can then be taken by a client socket
    (another process's, or even a TCP self-connect to that very port), so the restarted node fails with
    ``eaddrinuse`` (seen once in this suite). A race with another process that binds the port before the
    node does is still possible but makes the start fail loudly, never silently share a port."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in (4369, 5672, 15672, 25672):  # epmd and the shared broker's ports
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise PrivateBrokerUnavailable("no free TCP port below the ephemeral range")


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


class PrivateBroker:
    """One RabbitMQ node: ``url`` for the services, ``node`` for ``rabbitmqctl -n``."""

    def __init__(self, *, start_timeout: float = 120.0) -> None:
        if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
            raise PrivateBrokerUnavailable("needs rabbitmq-server and rabbitmqctl on PATH")
        try:
            self._user = pwd.getpwnam("rabbitmq")
        except KeyError:
            raise PrivateBrokerUnavailable(
                "needs the rabbitmq system user (Debian's rabbitmq-server)"
            ) from None
        if os.geteuid() != 0:
            raise PrivateBrokerUnavailable("starting a node as the rabbitmq user needs root")
        tag = uuid.uuid4().hex[:8]
        self.node = f"tessera-it-{tag}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.url = f"amqp://127.0.0.1:{self.port}/"
        self.start_timeout = start_timeout
        self.root = Path(tempfile.mkdtemp(prefix=f"tessera-rmq-{tag}-"))
        for sub in ("mnesia", "log"):
            (self.root / sub).mkdir()
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            # The machine is shared and busy; a tiny disk or memory alarm would block publishers mid-test.
            "disk_free_limit.absolute = 10MB\n"
        )
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)
        self.root.chmod(0o755)
        self.starts = 0
        self.closed = False

    def _env(self) -> dict[str, str]:
        # child_environment: a copy that a concurrent os.environ change cannot break (see its docstring).
        base = {k: v for k, v in child_environment().items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **base,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(self.root / "node.pid"),
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """``rabbitmqctl -n <node> args...``; its standard output."""
        done = subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env(),
        )
        if check and done.returncode != 0:
            raise AssertionError(f"rabbitmqctl {args[0]} on {self.node} failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    def start(self) -> float:
        """Start the node and wait until it accepts AMQP connections; returns the seconds it took."""
        if _port_open(self.port):
            raise AssertionError(f"port {self.port} is taken before node {self.node} started")
        started = time.monotonic()
        subprocess.run(
            ["rabbitmq-server", "-detached"], env=self._env(), check=True, timeout=60, capture_output=True
        )
        self.starts += 1
        deadline = started + self.start_timeout
        while not (_port_open(self.port) and self._ready()):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"node {self.node} did not start in {self.start_timeout} s\n{self.log()}"
                )
            time.sleep(0.5)
        return time.monotonic() - started

    def _ready(self) -> bool:
        with contextlib.suppress(subprocess.TimeoutExpired):
            probe = subprocess.run(
                ["rabbitmqctl", "-q", "-n", self.node, "await_startup", "--timeout", "5"],
                capture_output=True,
                timeout=30,
                env=self._env(),
            )
            return probe.returncode == 0
        return False

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.root / "node.pid").read_text().strip())
        return None

    def stop(self, *, timeout: float = 90.0) -> float:
        """Stop the node (``rabbitmqctl shutdown`` waits until its VM exited); returns the seconds it took."""
        started = time.monotonic()
        self.ctl("shutdown", timeout=timeout)
        deadline = started + timeout
        while _port_open(self.port):
            if time.monotonic() > deadline:
                raise AssertionError(f"node {self.node} still listens {timeout} s after shutdown")
            time.sleep(0.2)
        return time.monotonic() - started

    def rss_bytes(self) -> int | None:
        """Resident memory of the node's Erlang VM, from /proc."""
        pid = self.pid()
        if pid is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return None

    def log(self, lines: int = 40) -> str:
        logs = sorted((self.root / "log").glob("*.log"))
        text = []
        for path in logs:
            with contextlib.suppress(OSError):
                text += [f"--- {path.name}", *path.read_text(errors="replace").splitlines()[-lines:]]
        return "\n".join(text)

    def close(self) -> None:
        """Stop the node if it runs, SIGKILL its VM if it will not stop, and remove its directories."""
        if self.closed:
            return
        self.closed = True
        pid = self.pid()
        if _port_open(self.port) or pid is not None:
            with contextlib.suppress(subprocess.TimeoutExpired, AssertionError):
                self.ctl("shutdown", timeout=60, check=False)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 0)
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_broker_node() -> Iterator[PrivateBroker]:
    broker = PrivateBroker()
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


__all__ = ["PrivateBroker", "PrivateBrokerUnavailable", "free_port", "private_broker_node"]
