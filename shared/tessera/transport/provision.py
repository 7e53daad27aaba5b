"""Create (and remove) one federation's vhost, users, permissions and topic permissions.

Exactly what ``docs/topology.md`` specifies, via ``rabbitmqctl`` (run as a subprocess on the broker's
host) or via the management HTTP API when it is enabled. Idempotent: running it again converges to the same
state (existing users get the given password; stray topic permissions on other exchanges are cleared; user
tags are emptied, so no provisioned user is an administrator).

Passwords never appear on a command line (``ps`` would show them): with ``rabbitmqctl`` the definitions
imported through standard input carry salted SHA-256 hashes (RabbitMQ's default hashing); the HTTP API
gets the password in the request body.

Order matters for safety: topic permissions are set *before* the ordinary permissions, so there is no
moment in which an organisation can write to ``tessera.to-curator`` without its routing-key restriction
(RabbitMQ allows every routing key to a user without topic permissions on an exchange).

Broker users are global, not per vhost: an organisation in two federations on one broker is one user with
one password. :func:`deprovision` therefore deletes a user only if no other vhost grants it anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import structlog

from tessera.errors import ConfigurationError
from tessera.transport import topology as topo
from tessera.transport.errors import ProvisioningError

log = structlog.get_logger("tessera.transport")


def generate_password() -> str:
    """A fresh random broker password (256 bits, URL-safe) that does not start with ``-``.

    Operators paste passwords into command lines (``rabbitmqctl change_password``, ``kubectl create secret``),
    where a leading dash is read as an option: the password is redrawn instead (1 time in 64).
    """
    while (password := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return password


@dataclass(frozen=True)
class UserGrant:
    """One user's password and everything it is granted in the federation's vhost."""

    user: str
    password: str = field(repr=False)
    permissions: topo.Permissions
    topic_permissions: tuple[topo.TopicPermission, ...]


def federation_grants(
    curator_password: str,
    organisation_passwords: Mapping[str, str],
    *,
    curator_user: str = topo.CURATOR_USER,
) -> tuple[UserGrant, ...]:
    """The users of one federation as ``docs/topology.md`` specifies them."""
    orgs = topo.validate_organisations(organisation_passwords)
    if (
        not topo.ID_PATTERN.fullmatch(curator_user)
        or curator_user in orgs
        or curator_user in ("all", "guest")
    ):
        raise ConfigurationError(f"invalid curator user name {curator_user!r}")
    for user, password in [(curator_user, curator_password), *organisation_passwords.items()]:
        if not password:
            raise ConfigurationError(f"empty password for {user!r}")
    grants = [
        UserGrant(
            curator_user, curator_password, topo.curator_permissions(), topo.curator_topic_permissions()
        )
    ]
    grants += [
        UserGrant(
            o,
            organisation_passwords[o],
            topo.organisation_permissions(o),
            topo.organisation_topic_permissions(o),
        )
        for o in orgs
    ]
    return tuple(grants)


class Backend(Protocol):
    """A broker administration interface. ``apply`` creates or updates the vhost and grants (topic
    permissions strictly before permissions, see the module docstring; ``prune`` clears the users' topic
    permissions on other exchanges of the vhost). ``remove`` deletes the vhost, then those of ``users``
    that no other vhost grants anything."""

    def apply(self, vhost: str, grants: Sequence[UserGrant], *, prune: bool) -> None: ...
    def remove(self, vhost: str, users: Sequence[str]) -> list[str]: ...


def child_environment() -> dict[str, str]:
    """A copy of this process's environment to start a child process with (``subprocess(env=...)``).

    Never start a child with the inherited environment (``env=None``) here: CPython starts children with
    ``vfork``, and the child then execs with the C ``environ`` array *shared with the parent*, which another
    thread changing ``os.environ`` (``setenv``/``unsetenv``) may reallocate and free at that moment:
    ``exec`` fails with ``OSError: [Errno 14] Bad address`` (the transport tests' background deprovisioning
    hit it while the main thread ran ``monkeypatch.setenv``). With an explicit mapping, ``subprocess``
    builds an array of its own in the parent before forking. The copy reads one key at a time with
    ``get`` because ``dict(os.environ)`` raises ``KeyError`` when a key vanishes between listing and
    reading."""
    return {key: value for key in list(os.environ) if (value := os.environ.get(key)) is not None}


def _password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt ‖ SHA-256(salt ‖ password)), 4-byte salt."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


class RabbitmqctlBackend:
    """``rabbitmqctl`` on the broker's host (needs the Erlang cookie: root or the rabbitmq user).

    Each ``rabbitmqctl`` call starts an Erlang VM (about a second), so users, the vhost and topic permissions
    go in one ``import_definitions`` (read from standard input; the definitions hold only salted password
    hashes, never the passwords), the permissions in a second one, and independent calls run concurrently.
    """

    def __init__(
        self, rabbitmqctl: str = "rabbitmqctl", *, node: str | None = None, timeout: float = 60.0
    ) -> None:
        path = shutil.which(rabbitmqctl)
        if path is None:
            raise ConfigurationError(f"{rabbitmqctl!r} is not on PATH")
        self._base = [path, "-q", *(["-n", node] if node else [])]
        self._timeout = timeout

    def _start(self, *args: str, stdin: str | None = None) -> _Call:
        try:
            process = subprocess.Popen(
                [*self._base, *args],
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=child_environment(),  # see child_environment: never the shared C environ
            )
        except OSError as exc:
            raise ProvisioningError(f"rabbitmqctl {args[0]} failed: {exc}") from exc
        return _Call(args[0], process, stdin, self._timeout)

    def _run(self, *args: str, stdin: str | None = None) -> str:
        return self._start(*args, stdin=stdin).result()

    def _import(self, definitions: dict[str, Any]) -> None:
        self._run("import_definitions", "--format", "json", stdin=json.dumps(definitions))

    def apply(self, vhost: str, grants: Sequence[UserGrant], *, prune: bool) -> None:
        listing = self._start("list_topic_permissions", "-p", vhost, "--formatter", "json") if prune else None
        users = [
            {"name": g.user, "password_hash": _password_hash(g.password), "tags": ""}
            | {"hashing_algorithm": "rabbit_password_hashing_sha256"}
            for g in grants
        ]
        topic = [
            {"user": g.user, "vhost": vhost, "exchange": t.exchange, "write": t.write, "read": t.read}
            for g in grants
            for t in g.topic_permissions
        ]
        self._import({"users": users, "vhosts": [{"name": vhost}], "topic_permissions": topic})
        permissions = [
            {"user": g.user, "vhost": vhost, "configure": p.configure, "write": p.write, "read": p.read}
            for g in grants
            for p in [g.permissions]
        ]
        self._import({"permissions": permissions})
        if listing is None:
            return
        try:
            existing = json.loads(listing.result() or "[]")
        except ProvisioningError:
            existing = []  # the vhost did not exist before this call: nothing to prune
        wanted = {(g.user, t.exchange) for g in grants for t in g.topic_permissions}
        ours = {g.user for g in grants}
        stray = [
            self._start("clear_topic_permissions", "-p", vhost, p["user"], p["exchange"])
            for p in existing
            if p["user"] in ours and (p["user"], p["exchange"]) not in wanted
        ]
        for call in stray:
            call.result()

    def remove(self, vhost: str, users: Sequence[str]) -> list[str]:
        exported = self._start("export_definitions", "-", "--format", "json")
        vhosts = self._start("list_vhosts", "name", "--formatter", "json")
        if vhost in {v["name"] for v in json.loads(vhosts.result() or "[]")}:
            self._run("delete_vhost", vhost)
        definitions = json.loads(exported.result() or "{}")
        existing = {u["name"] for u in definitions.get("users", [])}
        elsewhere = {p["user"] for p in definitions.get("permissions", []) if p["vhost"] != vhost}
        elsewhere |= {p["user"] for p in definitions.get("topic_permissions", []) if p["vhost"] != vhost}
        doomed = [u for u in users if u in existing and u not in elsewhere]
        for call in [self._start("delete_user", u) for u in doomed]:
            call.result()
        return doomed


class _Call:
    """One running ``rabbitmqctl`` process."""

    def __init__(
        self, command: str, process: subprocess.Popen[str], stdin: str | None, timeout: float
    ) -> None:
        self._command, self._process, self._stdin, self._timeout = command, process, stdin, timeout

    def result(self) -> str:
        try:
            out, err = self._process.communicate(self._stdin, timeout=self._timeout)
        except subprocess.TimeoutExpired as exc:
            self._process.kill()
            self._process.communicate()
            raise ProvisioningError(f"rabbitmqctl {self._command} timed out") from exc
        if self._process.returncode != 0:
            lines = (err or out).strip().splitlines()
            detail = lines[-1] if lines else ""
            raise ProvisioningError(
                f"rabbitmqctl {self._command} exited with {self._process.returncode}: {detail}"
            )
        return out


class ManagementApiBackend:
    """The management plugin's HTTP API (``rabbitmq_management``), as an administrator user."""

    def __init__(self, base_url: str, username: str, password: str, *, timeout: float = 30.0) -> None:
        self._base = base_url.rstrip("/") + "/api"
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._auth = f"Basic {token}"
        self._timeout = timeout

    def _call(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._base + path, data=data, method=method)
        request.add_header("Authorization", self._auth)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            raise ProvisioningError(f"management API {method} {path}: HTTP {exc.code}") from exc
        except OSError as exc:
            raise ProvisioningError(f"management API {method} {path}: {exc}") from exc
        return json.loads(raw) if raw else None

    @staticmethod
    def _q(name: str) -> str:
        return quote(name, safe="")

    def available(self) -> bool:
        try:
            self._call("GET", "/whoami")
        except ProvisioningError:
            return False
        return True

    def apply(self, vhost: str, grants: Sequence[UserGrant], *, prune: bool) -> None:
        v = self._q(vhost)
        self._call("PUT", f"/vhosts/{v}", {})
        for g in grants:
            u = self._q(g.user)
            self._call("PUT", f"/users/{u}", {"password": g.password, "tags": ""})
            wanted = {t.exchange for t in g.topic_permissions}
            for t in g.topic_permissions:
                self._call(
                    "PUT",
                    f"/topic-permissions/{v}/{u}",
                    {"exchange": t.exchange, "write": t.write, "read": t.read},
                )
            if prune:
                existing = self._call("GET", f"/topic-permissions/{v}/{u}", missing_ok=True) or []
                if any(p["exchange"] not in wanted for p in existing):
                    # The API deletes all of a user's topic permissions in a vhost at once; ours are put
                    # back at once (a stray entry only exists after a manual change).
                    self._call("DELETE", f"/topic-permissions/{v}/{u}", missing_ok=True)
                    for t in g.topic_permissions:
                        body = {"exchange": t.exchange, "write": t.write, "read": t.read}
                        self._call("PUT", f"/topic-permissions/{v}/{u}", body)
            p = g.permissions
            body = {"configure": p.configure, "write": p.write, "read": p.read}
            self._call("PUT", f"/permissions/{v}/{u}", body)

    def remove(self, vhost: str, users: Sequence[str]) -> list[str]:
        self._call("DELETE", f"/vhosts/{self._q(vhost)}", missing_ok=True)
        doomed = []
        for user in users:
            u = self._q(user)
            if self._call("GET", f"/users/{u}", missing_ok=True) is None:
                continue
            permissions = self._call("GET", f"/users/{u}/permissions", missing_ok=True) or []
            topic = self._call("GET", f"/users/{u}/topic-permissions", missing_ok=True) or []
            if any(p["vhost"] != vhost for p in [*permissions, *topic]):
                continue
            self._call("DELETE", f"/users/{u}", missing_ok=True)
            doomed.append(user)
        return doomed


def local_broker_problem(url: str, *, check_admin: bool = False) -> str | None:
    """None if a broker answers at ``url`` and ``rabbitmqctl`` is on PATH to provision it, else why not, in
    words for the operator. ``check_admin`` also runs ``rabbitmqctl list_vhosts`` (about a second), which
    fails without the Erlang cookie."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError as exc:
        return f"no RabbitMQ broker answers at {host}:{port} ({exc.strerror or exc})"
    if shutil.which("rabbitmqctl") is None:
        return "a broker answers, but rabbitmqctl (needed to provision users) is not on PATH"
    if check_admin:
        probe = subprocess.run(
            ["rabbitmqctl", "-q", "list_vhosts"],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_environment(),
        )
        if probe.returncode != 0:
            return f"rabbitmqctl cannot administer the broker: {probe.stderr.strip()[:200]}"
    return None


def default_backend(
    *,
    management_url: str | None = None,
    management_user: str | None = None,
    management_password: str | None = None,
) -> Backend:
    """The management API if a URL and credentials are given and it answers; ``rabbitmqctl`` otherwise."""
    if management_url and management_user and management_password is not None:
        api = ManagementApiBackend(management_url, management_user, management_password)
        if api.available():
            return api
        log.info("management_api_unavailable", url=management_url)
    return RabbitmqctlBackend()


def provision(
    federation: str,
    *,
    curator_password: str,
    organisation_passwords: Mapping[str, str],
    curator_user: str = topo.CURATOR_USER,
    prune: bool = True,
    backend: Backend | None = None,
) -> str:
    """Create or update the federation's vhost and users; returns the vhost name. Raises
    :class:`ConfigurationError` for invalid ids, :class:`ProvisioningError` if the broker refuses."""
    vhost = topo.vhost(federation)
    grants = federation_grants(curator_password, organisation_passwords, curator_user=curator_user)
    (backend or RabbitmqctlBackend()).apply(vhost, grants, prune=prune)
    log.info("federation_provisioned", federation=federation, vhost=vhost, users=len(grants))
    return vhost


def deprovision(
    federation: str,
    *,
    organisations: Sequence[str],
    curator_user: str = topo.CURATOR_USER,
    backend: Backend | None = None,
) -> None:
    """Delete the federation's vhost (with its queues, exchanges and permissions), then each of its users
    that no other vhost grants anything. Idempotent."""
    vhost = topo.vhost(federation)
    orgs = topo.validate_organisations(organisations)
    deleted = (backend or RabbitmqctlBackend()).remove(vhost, [curator_user, *orgs])
    log.info("federation_deprovisioned", federation=federation, vhost=vhost, users_deleted=len(deleted))


__all__ = [
    "Backend",
    "ManagementApiBackend",
    "ProvisioningError",
    "RabbitmqctlBackend",
    "UserGrant",
    "child_environment",
    "default_backend",
    "deprovision",
    "federation_grants",
    "generate_password",
    "local_broker_problem",
    "provision",
]
