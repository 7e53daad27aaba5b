"""Starting ``rabbitmqctl`` while another thread changes the environment (no broker needed).

CPython (3.11 on Linux) starts children with ``vfork``: the child runs in the parent's memory until it
calls ``exec``. Without an explicit ``env`` it execs with the C ``environ`` array, which a concurrent
``os.environ[...] = ...`` / ``del`` in another thread (``setenv``/``unsetenv``) may reallocate and free at
that very moment: ``exec`` then fails with ``OSError: [Errno 14] Bad address``. That is what the transport
suite's background deprovisioning hit while the main thread ran ``monkeypatch.setenv`` tests. The backend
now passes a copy of the environment, which ``subprocess`` turns into an array of the parent's own first.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from tessera.transport import topology as topo
from tessera.transport.provision import RabbitmqctlBackend, federation_grants

SPAWNS = 200  # before the fix about 1 spawn in 20 failed under this churn (all 10 runs failed)


def _stand_in(tmp_path: Path) -> Path:
    """A ``rabbitmqctl`` that reads its input and succeeds: the spawn is what is tested, not the broker."""
    script = tmp_path / "rabbitmqctl"
    script.write_text('#!/bin/sh\ncat >/dev/null\ntest "$TESSERA_SPAWN_MARK" = seen || exit 3\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_rabbitmqctl_spawns_survive_concurrent_environment_changes(tmp_path):
    backend = RabbitmqctlBackend(str(_stand_in(tmp_path)))
    grants = federation_grants("pw", {"a": "pw"})
    stop = threading.Event()
    names = [f"TESSERA_SPAWN_CHURN_{i}" for i in range(40)]

    def churn() -> None:  # what monkeypatch.setenv / delenv in the main thread amount to
        i = 0
        while not stop.is_set():
            os.environ[names[i % len(names)]] = "x" * (i % 64)
            if i % 3 == 0:
                os.environ.pop(names[(i * 7) % len(names)], None)
            i += 1

    os.environ["TESSERA_SPAWN_MARK"] = "seen"  # the child still gets the environment of the moment
    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(SPAWNS // 2):  # apply() starts two rabbitmqctl processes
            backend.apply(topo.vhost("spawn"), grants, prune=False)
    finally:
        stop.set()
        thread.join()
        for name in [*names, "TESSERA_SPAWN_MARK"]:
            os.environ.pop(name, None)
