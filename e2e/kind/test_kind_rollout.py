"""The rollout on a real Kubernetes (kind): images, charts, probes, Secrets, volumes, NetworkPolicies, and
a participant pod deleted in the middle of a round.

1. Create (or reuse) a kind cluster; build the curator and participant images (scripts/build-images.sh)
   and load them, and the broker's image, into the node.
2. Three companies, each in its own namespace (``acme``, ``globex``, ``initech``), install their bootstrap
   release (``bootstrap=true``): a Job creates the identity key on the company's claim and logs the public
   key. The coordinator builds the roster from the public keys (``tessera roster build``, which prints the
   fingerprint), installs tessera-broker and tessera-curator in namespace ``tessera``.
3. Each company gets its broker password (a Secret in its namespace), its records go to a directory on
   the node, and it upgrades its release with the roster and the pinned fingerprint (``--wait``).
4. Follow the curator's report (``kubectl exec ... cat report.json`` through the kubernetes client). Once
   the first round has completed, delete acme's participant pod without a grace period (a crash); the
   Deployment replaces it, the replacement resumes from its accountant volume, and the federation must
   still finish by reaching its target accuracy, with acme taking part again after the crash.

Runs only where Docker and kind are present and ``TESSERA_E2E_KIND=1`` is set (``e2e/kind/run.sh`` does
that); it needs the ``kubernetes`` client (imported lazily) and can pull ``rabbitmq`` from Docker Hub.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VALUES = HERE / "values"
CLUSTER = os.environ.get("TESSERA_KIND_CLUSTER", "tessera-e2e")
COMPANIES = ("acme", "globex", "initech")
VICTIM = "acme"
BROKER_IMAGE = "rabbitmq:4.1"
INSTALL_TIMEOUT = "6m"
FEDERATION_TIMEOUT_S = 20 * 60

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def find_helm() -> str | None:
    local = REPO_ROOT / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


def missing_prerequisite() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return "the Docker daemon is not reachable"
    if shutil.which("kind") is None:
        return "kind is not installed (https://kind.sigs.k8s.io)"
    if find_helm() is None:
        return "helm is not installed (bash scripts/install-helm.sh)"
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        return "the kubernetes Python client is not installed (.venv/bin/python -m pip install kubernetes)"
    if os.environ.get("TESSERA_E2E_KIND") != "1":
        return "it builds images and a cluster (minutes): run e2e/kind/run.sh, or set TESSERA_E2E_KIND=1"
    return None


def run(*argv: str, timeout: float = 900, **kwargs: Any) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if proc.returncode != 0:
        command = " ".join(argv[:4])
        pytest.fail(f"{command} ... exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


class Kind:
    """The cluster, helm against it, and the kubernetes client's APIs."""

    def __init__(self, kubeconfig: Path, helm: str) -> None:
        from kubernetes import client, config

        self.kubeconfig = kubeconfig
        self.helm_path = helm
        api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)

    def helm(self, *args: str) -> str:
        return run(self.helm_path, "--kubeconfig", str(self.kubeconfig), *args)

    def namespace(self, name: str, labels: dict[str, str]) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
        try:
            self.core.create_namespace(body)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def secret(self, namespace: str, name: str, data: dict[str, bytes]) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=name),
            data={k: base64.b64encode(v).decode() for k, v in data.items()},
        )
        try:
            self.core.create_namespaced_secret(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.replace_namespaced_secret(name, namespace, body)

    def read_secret(self, namespace: str, name: str, key: str) -> bytes:
        return base64.b64decode(self.core.read_namespaced_secret(name, namespace).data[key])

    def job_log(self, namespace: str, job: str, container: str) -> str:
        (pod,) = self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
        return str(self.core.read_namespaced_pod_log(pod.metadata.name, namespace, container=container))

    def pods(self, namespace: str, instance: str) -> list[Any]:
        selector = f"app.kubernetes.io/instance={instance}"
        return list(self.core.list_namespaced_pod(namespace, label_selector=selector).items)

    def exec(self, namespace: str, pod: str, container: str, command: list[str]) -> str:
        from kubernetes.stream import stream

        return str(
            stream(
                self.core.connect_get_namespaced_pod_exec, pod, namespace, container=container,
                command=command, stderr=False, stdin=False, stdout=True, tty=False,
            )
        )  # fmt: skip

    def curator_report(self) -> dict[str, Any] | None:
        """The curator's report.json, or None while no running curator container can be asked."""
        for pod in self.pods("tessera", "curator"):
            if pod.status.phase != "Running":
                continue
            try:
                text = self.exec(
                    "tessera", pod.metadata.name, "curator", ["cat", "/var/lib/tessera/curator/report.json"]
                )
                report: dict[str, Any] = json.loads(text)
                return report
            except Exception:  # not written yet, or the container is restarting
                return None
        return None

    def curator_exit_logged(self) -> dict[str, Any] | None:
        """The `curator_exit` log event of the current or previous curator container, if any."""
        from kubernetes.client.rest import ApiException

        for pod in self.pods("tessera", "curator"):
            for previous in (False, True):
                try:
                    log = self.core.read_namespaced_pod_log(
                        pod.metadata.name, "tessera", container="curator", previous=previous
                    )
                except ApiException:
                    continue
                for line in log.splitlines():
                    if '"curator_exit"' in line:
                        event: dict[str, Any] = json.loads(line)
                        return event
        return None


@pytest.fixture(scope="module")
def kind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kind]:
    reason = missing_prerequisite()
    if reason:
        pytest.skip(f"kind end-to-end run skipped: {reason}")
    helm = find_helm()
    assert helm is not None
    existing = CLUSTER in run("kind", "get", "clusters").split()
    if not existing:
        run(
            "kind",
            "create",
            "cluster",
            "--name",
            CLUSTER,
            "--config",
            str(HERE / "kind-config.yaml"),
            "--wait",
            "180s",
        )
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    kubeconfig.write_text(run("kind", "get", "kubeconfig", "--name", CLUSTER))
    try:
        version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
        images = [f"tessera-curator:{version}", f"tessera-participant:{version}"]
        if os.environ.get("TESSERA_KIND_SKIP_BUILD") != "1":
            run("bash", str(REPO_ROOT / "scripts" / "build-images.sh"), timeout=3600, cwd=REPO_ROOT)
        run("kind", "load", "docker-image", "--name", CLUSTER, *images, timeout=1800)
        if subprocess.run(["docker", "pull", BROKER_IMAGE], capture_output=True, check=False).returncode == 0:
            run("kind", "load", "docker-image", "--name", CLUSTER, BROKER_IMAGE, timeout=1800)
        yield Kind(kubeconfig, helm)
    finally:
        if not existing and os.environ.get("TESSERA_KIND_KEEP") != "1":
            subprocess.run(["kind", "delete", "cluster", "--name", CLUSTER], capture_output=True, check=False)


def test_federation_survives_a_participant_pod_deleted_mid_round(kind: Kind, tmp_path: Path) -> None:
    from tessera.apps.demo import write_hospital_data

    # --- each company: its identity key is born on its own claim; only the public key leaves -----------
    public_keys = {}
    for company in COMPANIES:
        kind.namespace(company, {"tessera.io/role": "company"})
        kind.helm(
            "upgrade", "--install", "tessera", str(REPO_ROOT / "charts" / "tessera-participant"),
            "-n", company, "-f", str(VALUES / "company.yaml"), "--set", f"organisation.id={company}",
            "--set", "bootstrap=true", "--wait", "--wait-for-jobs", "--timeout", INSTALL_TIMEOUT,
        )  # fmt: skip
        shown = kind.job_log(company, "tessera-tessera-participant-identity", "identity-show")
        found = re.search(r"public key:\s+([0-9a-f]{64})", shown)
        assert found, f"{company}: the bootstrap Job logged no public key:\n{shown}"
        public_keys[company] = found.group(1)

    # --- the coordinator ------------------------------------------------------------------------------------
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    roster = coordinator / "roster.json"
    built = run(
        sys.executable, "-m", "tessera.apps.cli", "roster", "build", "--federation", "kind-e2e",
        *[a for company, key in public_keys.items() for a in ("--member", f"{company}={key}")],
        "--clip", "1.0", "--out", str(roster),
    )  # fmt: skip
    fingerprint = re.search(r"roster fingerprint: ([0-9a-f]{64})", built)
    assert fingerprint, built
    kind.namespace("tessera", {"tessera.io/role": "coordinator"})
    kind.helm(
        "upgrade", "--install", "broker", str(REPO_ROOT / "charts" / "tessera-broker"), "-n", "tessera",
        "-f", str(VALUES / "broker.yaml"), "--wait", "--timeout", INSTALL_TIMEOUT,
    )  # fmt: skip
    kind.helm(
        "upgrade", "--install", "curator", str(REPO_ROOT / "charts" / "tessera-curator"), "-n", "tessera",
        "-f", str(VALUES / "curator.yaml"), "--set-file", f"roster.content={roster}",
        "--wait", "--timeout", INSTALL_TIMEOUT,
    )  # fmt: skip

    # --- the companies: hand-over Secrets, records on the node, one release per namespace ---------------
    files, encoding, _ = write_hospital_data(tmp_path / "records")
    node = f"{CLUSTER}-control-plane"
    for company, source in zip(COMPANIES, files.values(), strict=True):
        password = kind.read_secret("tessera", f"broker-tessera-broker-user-{company}", "password")
        kind.secret(company, "tessera-broker-password", {"password": password})
        directory = f"/srv/tessera/{company}"
        run("docker", "exec", node, "mkdir", "-p", directory)
        run("docker", "cp", str(source), f"{node}:{directory}/records.csv")
        run("docker", "exec", node, "chmod", "-R", "a+rX", "/srv/tessera")
        kind.helm(
            "upgrade", "--install", "tessera", str(REPO_ROOT / "charts" / "tessera-participant"),
            "-n", company, "-f", str(VALUES / "company.yaml"), "--set", f"organisation.id={company}",
            "--set-file", f"roster.content={roster}", "--set", f"roster.fingerprint={fingerprint.group(1)}",
            "--set-file", f"data.encoding.content={encoding}", "--set", f"data.hostPath={directory}",
            "--wait", "--timeout", INSTALL_TIMEOUT,
        )  # fmt: skip

    # --- follow the report; crash the victim's pod once round 1 is done ----------------------------------
    deadline = time.monotonic() + FEDERATION_TIMEOUT_S
    killed_after_round: int | None = None
    old_pod = None
    report: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        report = kind.curator_report() or report
        if report is not None and report["status"] == "finished":
            break
        if killed_after_round is None and report is not None and report["rounds_completed"] >= 1:
            (pod,) = kind.pods(VICTIM, "tessera")
            old_pod = pod.metadata.name
            kind.core.delete_namespaced_pod(old_pod, VICTIM, grace_period_seconds=0)
            killed_after_round = report["rounds_completed"]
        if (
            report is None
            and (event := kind.curator_exit_logged()) is not None
            and event["status"] == "finished"
        ):
            break
        time.sleep(3)
    else:
        pytest.fail(f"the federation did not finish within {FEDERATION_TIMEOUT_S} s; last report: {report}")

    # The report survives on the curator's volume; read it once more (a restarted curator serves it).
    for _ in range(40):
        final = kind.curator_report()
        if final is not None and final["status"] == "finished":
            report = final
            break
        time.sleep(3)
    assert report is not None and report["status"] == "finished", report
    assert killed_after_round is not None, "the federation finished before a participant could be deleted"
    assert "target accuracy 0.9 reached" in report["stop_reason"], report["stop_reason"]
    # The Deployment replaced the deleted pod, and the replacement took part in a later round.
    (replacement,) = [p for p in kind.pods(VICTIM, "tessera") if p.metadata.deletion_timestamp is None]
    assert replacement.metadata.name != old_pod
    later = [r for r in report["history"] if r["round"] > killed_after_round]
    assert later and VICTIM in later[-1]["participants"], later
    assert all(sorted(r["participants"]) == sorted(COMPANIES) for r in later[-1:])
