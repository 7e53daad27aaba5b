"""Run the pods of rendered Helm manifests as local processes, as a kubelet would, minus the isolation.

A :class:`Cluster` holds what ``helm template`` rendered (ConfigMaps, Secrets, PersistentVolumeClaims) plus
the objects an operator creates by hand (the company's Secrets, existing claims). :meth:`Cluster.pod`
turns a rendered Deployment into a :class:`LocalPod`:

- every volume becomes a local directory: ConfigMap and Secret volumes are written from the objects, with
  the volume's ``items`` and ``defaultMode`` (plus group read when the pod sets ``fsGroup``, as the kubelet
  does, kubernetes/kubernetes#57923); a claim is the claim's directory; ``emptyDir`` a fresh directory;
  ``hostPath`` the path itself (this machine is the node);
- a path in ``command``, ``args`` or an ``env`` value that lies under a ``mountPath`` is rewritten to the
  local directory; nothing else in the environment changes, except the broker URL's host and port, which
  name a Kubernetes Service and are pointed at the local broker;
- ``command: ["tessera", ...]`` runs as ``python -m tessera.apps.cli ...`` (the image's entrypoint is the
  ``tessera`` console script); init containers run first and must exit 0;
- the image's own environment (``images/Dockerfile``: HOME, MPLCONFIGDIR, XDG_CACHE_HOME, ...) is applied
  with the same path mapping, and no ``TESSERA_*`` variable leaks in from the test process.

A missing ConfigMap, Secret, key or claim raises :class:`PodError`, as the pod would be stuck in
``ContainerCreating`` in a cluster.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# ENV of the runtime stage of images/Dockerfile; paths are mapped like any other.
IMAGE_ENV = {
    "HOME": "/var/lib/tessera",
    "MPLCONFIGDIR": "/tmp/matplotlib",
    "XDG_CACHE_HOME": "/tmp/.cache",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}
IMAGE_WORKDIR = "/var/lib/tessera"


class PodError(Exception):
    """The pod could not start (a missing object, a failed init container)."""


@dataclass
class Cluster:
    """Objects by (namespace, name); volumes are materialised under ``root``."""

    root: Path
    configmaps: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)
    claims: dict[tuple[str, str], Path] = field(default_factory=dict)

    def apply(self, docs: list[dict[str, Any]]) -> None:
        """Store the ConfigMaps, Secrets and claims of rendered manifests (as `kubectl apply` would)."""
        for doc in docs:
            key = (doc["metadata"]["namespace"], doc["metadata"]["name"])
            if doc["kind"] == "ConfigMap":
                self.configmaps[key] = {k: v.encode() for k, v in doc.get("data", {}).items()}
            elif doc["kind"] == "Secret":
                data = {k: base64.b64decode(v) for k, v in doc.get("data", {}).items()}
                data |= {k: v.encode() for k, v in doc.get("stringData", {}).items()}
                self.secrets[key] = data
            elif doc["kind"] == "PersistentVolumeClaim":
                self.add_claim(*key)

    def add_secret(self, namespace: str, name: str, data: Mapping[str, str | bytes]) -> None:
        self.secrets[(namespace, name)] = {
            k: v.encode() if isinstance(v, str) else v for k, v in data.items()
        }

    def add_claim(self, namespace: str, name: str, path: Path | None = None) -> Path:
        path = path or self.root / "claims" / namespace / name
        path.mkdir(parents=True, exist_ok=True)
        self.claims[(namespace, name)] = path
        return path

    def secret_value(self, namespace: str, name: str, key: str) -> bytes:
        try:
            return self.secrets[(namespace, name)][key]
        except KeyError:
            raise PodError(f"secret {namespace}/{name} (key {key}) does not exist") from None

    def pod(self, deployment: dict[str, Any], broker: tuple[str, int]) -> LocalPod:
        return LocalPod(self, deployment, broker)


class LocalPod:
    """One replica of a rendered Deployment (or a Job's pod), its volumes materialised and its containers
    runnable."""

    def __init__(self, cluster: Cluster, deployment: dict[str, Any], broker: tuple[str, int]) -> None:
        self.cluster = cluster
        self.namespace: str = deployment["metadata"]["namespace"]
        self.name: str = deployment["metadata"]["name"]
        self.spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
        self.broker = broker
        self.dir = cluster.root / "pods" / self.namespace / self.name
        self.volumes = {v["name"]: self._materialise(v) for v in self.spec.get("volumes", [])}
        self.processes: list[subprocess.Popen[bytes]] = []

    # --- volumes ----------------------------------------------------------------------------------------

    def _materialise(self, volume: dict[str, Any]) -> Path:
        name = volume["name"]
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if (self.namespace, claim) not in self.cluster.claims:
                raise PodError(f"volume {name}: claim {self.namespace}/{claim} does not exist")
            return self.cluster.claims[(self.namespace, claim)]
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "Directory" and not path.is_dir():
                raise PodError(f"volume {name}: hostPath {path} is not a directory on this node")
            return path
        target = self.dir / "volumes" / name
        target.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            return target
        if "configMap" in volume:
            source = volume["configMap"]
            data = self.cluster.configmaps.get((self.namespace, source["name"]))
            default_mode = source.get("defaultMode", 0o644)
            kind = "configmap"
        elif "secret" in volume:
            source = volume["secret"]
            data = self.cluster.secrets.get((self.namespace, source["secretName"]))
            default_mode = source.get("defaultMode", 0o644)
            kind = "secret"
        else:
            raise PodError(f"volume {name}: unsupported volume type {sorted(volume)}")
        if data is None:
            object_name = source.get("name", source.get("secretName"))
            raise PodError(f"volume {name}: {kind} {self.namespace}/{object_name} does not exist")
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        if self.spec.get("securityContext", {}).get("fsGroup") is not None:
            default_mode |= 0o440  # what the kubelet does to AtomicWriter volumes with fsGroup
        for item in items:
            if item["key"] not in data:
                raise PodError(f"volume {name}: {kind} has no key {item['key']!r}")
            path = target / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                path.chmod(0o600)
            path.write_bytes(data[item["key"]])
            path.chmod(item.get("mode", default_mode))
        return target

    def mounts(self, container: dict[str, Any]) -> list[tuple[str, Path]]:
        """(mountPath, local path), longest mount path first."""
        out = []
        for mount in container.get("volumeMounts", []):
            local = self.volumes[mount["name"]] / mount.get("subPath", "")
            out.append((mount["mountPath"].rstrip("/"), local))
        return sorted(out, key=lambda m: len(m[0]), reverse=True)

    def map_path(self, container: dict[str, Any], value: str) -> str:
        for mount_path, local in self.mounts(container):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(local) + value[len(mount_path) :]
        return value

    # --- containers -------------------------------------------------------------------------------------

    def container(self, name: str) -> dict[str, Any]:
        for container in [*self.spec.get("initContainers", []), *self.spec["containers"]]:
            if container["name"] == name:
                return container
        raise KeyError(name)

    def rendered_env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "valueFrom" in item:
                ref = item["valueFrom"].get("secretKeyRef")
                if ref is None:
                    raise PodError(f"env {item['name']}: only literal values and secretKeyRef are supported")
                env[item["name"]] = self.cluster.secret_value(
                    self.namespace, ref["name"], ref["key"]
                ).decode()
            else:
                env[item["name"]] = item.get("value", "")
        return env

    def local_env(self, container: dict[str, Any]) -> dict[str, str]:
        """The environment the process gets: the image's, then the container's, paths mapped."""
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV")}
        for key, value in {**IMAGE_ENV, **self.rendered_env(container)}.items():
            env[key] = self.map_path(container, value) if value.startswith("/") else value
        if "TESSERA_BROKER__URL" in env:
            env["TESSERA_BROKER__URL"] = self.local_broker_url(env["TESSERA_BROKER__URL"])
        for directory in (env["MPLCONFIGDIR"], env["XDG_CACHE_HOME"]):
            Path(directory).mkdir(parents=True, exist_ok=True)
        return env

    def local_broker_url(self, url: str) -> str:
        """The rendered URL with its host and port replaced by the local broker's, nothing else."""
        parts = urlsplit(url)
        host, port = self.broker
        return parts._replace(netloc=f"{host}:{port}").geturl()

    def command(self, container: dict[str, Any]) -> list[str]:
        argv = [*container.get("command", []), *container.get("args", [])]
        if not argv:
            raise PodError(f"container {container['name']}: no command (the image's default is not emulated)")
        if argv[0] == "tessera":
            argv = [sys.executable, "-m", "tessera.apps.cli", *argv[1:]]
        return [argv[0], *(self.map_path(container, a) if a.startswith("/") else a for a in argv[1:])]

    def run_init_containers(self, timeout: float = 30) -> None:
        for container in self.spec.get("initContainers", []):
            proc = subprocess.run(
                self.command(container),
                env=self.local_env(container),
                cwd=self.map_path(container, IMAGE_WORKDIR)
                if self._has_mount(container, IMAGE_WORKDIR)
                else None,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            if proc.returncode != 0:
                raise PodError(
                    f"init container {container['name']} exited {proc.returncode}: {proc.stderr.decode()}"
                )

    def run(self, name: str, timeout: float = 60) -> str:
        """Run a container to completion (a Job's), as the kubelet would; its standard output."""
        container = self.container(name)
        proc = subprocess.run(
            self.command(container), env=self.local_env(container), capture_output=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise PodError(f"container {name} exited {proc.returncode}: {proc.stderr.decode()}")
        return proc.stdout.decode()

    def _has_mount(self, container: dict[str, Any], path: str) -> bool:
        return self.map_path(container, path) != path

    def start(self, name: str, log: Path) -> subprocess.Popen[bytes]:
        container = self.container(name)
        cwd = self.map_path(container, IMAGE_WORKDIR)
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                self.command(container),
                env=self.local_env(container),
                cwd=cwd if Path(cwd).is_dir() else None,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.processes.append(process)
        return process

    def probe(self, name: str, probe: str, timeout: float = 2.0) -> tuple[int, bytes]:
        """Call the container's rendered httpGet probe (`readinessProbe`, ...) on this host."""
        container = self.container(name)
        get = container[probe]["httpGet"]
        return self.http_get(name, get["port"], get["path"], timeout)

    def http_get(self, name: str, port: int | str, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        container = self.container(name)
        if isinstance(port, str):
            (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
