"""The rendered charts as real containers: the broker, the curator and three companies, each in its own network.

The flow of e2e/local (each company's bootstrap release, whose Job makes the identity key on the company's
own claim and prints only the public key; the coordinator's `tessera roster build` from the public keys;
helm template of tessera-broker, tessera-curator and three tessera-participant releases pinning the
roster fingerprint; the broker provisioned with exactly the rendered plan and Secrets), but every pod,
the Jobs' too, runs as a docker container of the built images, with the rendered command, args, environment, securityContext
(user 10001, fsGroup as a supplementary group, read-only root, no capabilities, /tmp a tmpfs) and volumes
(ConfigMaps, Secrets, claims materialised by e2e/local/localpod.py and bind-mounted at their mountPaths).

- The broker is a container of Debian's rabbitmq-server; it is attached to every network under the name
  of its rendered Service, so the rendered broker URLs are used unchanged.
- Each company's participant is alone in its own internal network with the broker (what the chart's
  NetworkPolicy allows); the curator has its own. From inside acme's container, with acme's own mounted
  credentials, the test checks that the broker refuses globex's inbox and that globex's and the curator's
  containers cannot be reached.
- The curator holds 30 s before rounds 2 and 3 (testing-only `TESSERA_FAULTS__*`, added to its container by
  the test). acme's container is killed (SIGKILL) in the first hold and started again on its volume (its ε
  goes on from the accountant there), then the curator's in the second, which resumes from its checkpoint; the
  federation completes and the rendered probes and /metrics answer (called inside the containers).

Runs only with TESSERA_E2E_CONTAINERS=1 (`make e2e-containers`, which builds the images first), since it
takes minutes; skips, saying why, without docker, a reachable engine, helm, or the images.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(REPO_ROOT / "e2e" / "local"))

from localpod import Cluster, LocalPod  # noqa: E402

VALUES = REPO_ROOT / "e2e" / "local" / "values"
VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
BROKER_IMAGE = "tessera-e2e-broker:bookworm"
COMPANIES = ("acme", "globex", "initech")
DOCKER = os.environ.get("DOCKER", "docker")
TIMEOUT_S = 600
PAUSE_S = 30  # the curator's hold before rounds 2 and 3: time for the test to kill a container there

pytestmark = pytest.mark.integration


def docker(
    *args: str, check: bool = True, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} failed: {result.stderr.strip()}")
    return result


def require_engine() -> None:
    if os.environ.get("TESSERA_E2E_CONTAINERS") != "1":
        pytest.skip(
            "container e2e runs with TESSERA_E2E_CONTAINERS=1 (`make e2e-containers`); it takes minutes"
        )
    if shutil.which(DOCKER) is None:
        pytest.skip(f"no {DOCKER} CLI: install docker.io and start dockerd")
    info = docker("info", check=False, timeout=30)
    if info.returncode != 0:
        pytest.skip(f"no container engine answers `{DOCKER} info`: {info.stderr.strip()[:200]}")
    for image in (f"tessera-curator:{VERSION}", f"tessera-participant:{VERSION}"):
        if docker("image", "inspect", image, check=False).returncode != 0:
            pytest.skip(f"{image} is not built: run `make images`")


def broker_image() -> None:
    """Debian's rabbitmq-server on a debootstrap base (scripts/make-base-image.sh), made once."""
    if docker("image", "inspect", BROKER_IMAGE, check=False).returncode == 0:
        return
    made = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "make-base-image.sh"), BROKER_IMAGE, "rabbitmq-server"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot make the broker image: {made.stderr.strip()[-300:]}")


@dataclass
class Pod:
    """A rendered Deployment's pod as containers: volumes from localpod, then `docker run`."""

    local: LocalPod
    name: str  # container name
    network: str
    logs: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # the test's own, on top of the rendered env

    @property
    def main(self) -> dict[str, Any]:
        (container,) = self.local.spec["containers"]
        return dict(container)

    def _run_args(self, container: dict[str, Any]) -> list[str]:
        pod_security = self.local.spec.get("securityContext", {})
        security = container.get("securityContext", {})
        user = f"{security.get('runAsUser', pod_security.get('runAsUser'))}:{pod_security.get('runAsGroup', 10001)}"
        args = ["--network", self.network, "--user", user]
        if "fsGroup" in pod_security:
            args += ["--group-add", str(pod_security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            args += ["--read-only"]
        if "ALL" in security.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", "ALL"]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for mount in container.get("volumeMounts", []):
            volume = next(v for v in self.local.spec["volumes"] if v["name"] == mount["name"])
            if "emptyDir" in volume and mount["mountPath"] == "/tmp":
                args += ["--tmpfs", "/tmp:mode=1777"]
                continue
            # Other emptyDirs are host directories: the init container and the service share them.
            source = self.local.volumes[mount["name"]] / mount.get("subPath", "")
            mode = "ro" if mount.get("readOnly") else "rw"
            args += ["-v", f"{source}:{mount['mountPath']}:{mode}"]
        env = self.local.rendered_env(container)
        if container == self.main:
            env |= self.extra_env
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        argv = [*container.get("command", []), *container.get("args", [])]
        image = container["image"]
        return [*args, "--entrypoint", argv[0], image, *argv[1:]]

    def run_init_containers(self) -> None:
        for container in self.local.spec.get("initContainers", []):
            docker("run", "--rm", *self._run_args(container), timeout=120)

    def run_to_completion(self) -> str:
        """A Job's pod: init containers, then its container to completion; that container's output."""
        self.run_init_containers()
        return docker("run", "--rm", *self._run_args(self.main), timeout=120).stdout

    def start(self) -> None:
        docker("run", "-d", "--name", self.name, *self._run_args(self.main))

    def exec(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *argv, check=False, timeout=timeout)

    def probe(self, probe: str) -> int:
        get = self.main[probe]["httpGet"]
        return self.http_get(get["port"], get["path"])[0]

    def http_get(self, port: int | str, path: str) -> tuple[int, str]:
        if isinstance(port, str):
            (port,) = [p["containerPort"] for p in self.main["ports"] if p["name"] == port]
        code = (
            "import sys, urllib.request, urllib.error\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=3)\n"
            "    print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code)\n"
            "except OSError:\n"
            "    print(0)\n"
        )
        out = self.exec("python", "-c", code)
        status, _, body = out.stdout.partition("\n")
        return (int(status) if status.strip().isdigit() else 0), body

    def logs_text(self) -> str:
        out = docker("logs", self.name, check=False)
        return out.stdout + out.stderr


def own_files(path: Path) -> None:
    """What fsGroup does to the pod's volumes: group 10001, so the service user can use them."""
    for item in [path, *path.rglob("*")]:
        os.chown(item, 10001 if item.is_dir() else -1, 10001)


@dataclass
class Rollout:
    tag: str
    federation: str
    vhost: str
    orgs: dict[str, str]
    passwords: dict[str, str]
    pods: dict[str, Pod] = field(default_factory=dict)
    networks: list[str] = field(default_factory=list)
    broker: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, dict[str, int]] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    isolation: dict[str, str] = field(default_factory=dict)
    curator_log: str = ""
    epsilon_before_kill: float = 0.0
    acme_killed_after: int = 0
    curator_killed_after: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def tails(self) -> str:
        broker = docker("logs", self.broker, check=False) if self.broker else None
        head = f"--- broker\n{(broker.stdout + broker.stderr)[-1500:]}\n" if broker else ""
        return head + "\n".join(
            f"--- {name}\n" + "\n".join(pod.logs_text().splitlines()[-8:]) for name, pod in self.pods.items()
        )


def wait_for(condition: Any, what: str, rollout: Rollout, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s:\n{rollout.tails()}")
        time.sleep(1)


def curator_report(rollout: Rollout) -> dict[str, Any]:
    path = rollout.pods["curator"].local.volumes["state"] / "curator" / "report.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def accountant_epsilon(pod: Pod) -> float:
    _, body = pod.http_get("metrics", "/metrics")
    for line in body.splitlines():
        if line.startswith("tessera_privacy_epsilon_spent"):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Rollout]:
    require_engine()
    import test_local_rollout as local

    helm = local.find_helm()
    if helm is None:
        pytest.skip("helm is not installed: run `bash scripts/install-helm.sh`")
    broker_image()
    from tessera.apps.demo import write_hospital_data
    from tessera.transport import generate_password
    from tessera.transport import topology as topo
    from tessera.transport.provision import RabbitmqctlBackend, UserGrant

    started = time.monotonic()
    tag = secrets.token_hex(3)
    federation, curator_user = f"ctr-{tag}", f"cur-{tag}"
    orgs = {company: f"{company}-{tag}" for company in COMPANIES}
    state_networks: list[str] = []

    def remove_networks() -> None:
        for network in state_networks:
            docker("network", "rm", network, check=False)

    request.addfinalizer(remove_networks)  # runs after the containers' removal (finalizers are LIFO)
    root = tmp_path_factory.mktemp("containers")
    root.chmod(0o755)
    cluster = Cluster(root / "cluster")
    # --- each company: its bootstrap release's Job makes its identity key on its own claim, in a container
    # of its own network; only the public key leaves ----------------------------------------------------
    for name in ("tessera", *COMPANIES):
        network = f"tessera-e2e-{tag}-{name}"
        docker("network", "create", "--internal", network)
        state_networks.append(network)
    public_keys = {}
    for i, (company, org) in enumerate(orgs.items(), start=1):
        docs = local.helm_template(
            helm, "tessera", "tessera-participant", company, "--set", "bootstrap=true",
            "--set", f"federation.id={federation}", "--set", f"organisation.id={org}",
        )  # fmt: skip
        cluster.apply(docs)
        own_files(cluster.root)
        job = Pod(cluster.pod(local.one(docs, "Job"), ("unused", 0)), f"tessera-e2e-{tag}-{company}-identity",
                  state_networks[i])  # fmt: skip
        shown = re.search(r"public key:\s+([0-9a-f]{64})", job.run_to_completion())
        assert shown, f"{company}: the bootstrap Job printed no public key"
        public_keys[org] = shown.group(1)

    # --- the coordinator: the roster from the public keys only (`tessera roster build`) ------------------
    roster_file, fingerprint = local.build_roster(root / "coordinator", federation, public_keys, curator_user)
    org_sets = [x for i, org in enumerate(orgs.values()) for x in ("--set", f"organisations[{i}].id={org}")]
    cluster.add_secret("tessera", "initech-broker-password", {"amqp-password": generate_password()})
    broker_docs = local.helm_template(
        helm, "broker", "tessera-broker", "tessera", "-f", str(VALUES / "broker.yaml"),
        "--set", f"federation.id={federation}", "--set", f"auth.curator.username={curator_user}", *org_sets,
    )  # fmt: skip
    cluster.apply(broker_docs)
    plan = local.Plan.parse(local.one(broker_docs, "ConfigMap", "-provisioning")["data"]["plan.tsv"])
    passwords = local.provisioner_passwords(broker_docs, cluster)
    state = Rollout(tag, federation, plan.vhost, orgs, passwords, networks=state_networks)

    def cleanup() -> None:
        for pod in state.pods.values():
            docker("rm", "-f", pod.name, check=False)
        if state.broker:
            docker("rm", "-f", state.broker, check=False)

    request.addfinalizer(cleanup)

    service = next(d for d in broker_docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None")
    broker_host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    state.broker = f"tessera-e2e-{tag}-broker"
    docker(
        "run", "-d", "--name", state.broker, "--hostname", "broker", "--network", state.networks[0],
        "--network-alias", broker_host, "--user", "rabbitmq", "-e", "RABBITMQ_NODENAME=rabbit@broker",
        BROKER_IMAGE, "rabbitmq-server",
    )  # fmt: skip
    for network in state.networks[1:]:
        docker("network", "connect", "--alias", broker_host, network, state.broker)
    wait_for(
        lambda: docker("exec", "--user", "rabbitmq", state.broker, "rabbitmqctl", "-q", "await_startup",
                       check=False, timeout=60).returncode == 0,
        "the broker container's start", state, timeout=120,
    )  # fmt: skip

    # --- provisioning with the rendered plan, through rabbitmqctl inside the broker container ------------
    wrapper = root / "rabbitmqctl"
    wrapper.write_text(f'#!/bin/sh\nexec {DOCKER} exec -i --user rabbitmq {state.broker} rabbitmqctl "$@"\n')
    wrapper.chmod(0o755)
    grants = [
        UserGrant(
            user, passwords[user], topo.Permissions(*plan.permissions[user]),
            tuple(topo.TopicPermission(*t) for t in plan.topic_permissions.get(user, [])),
        )
        for user in plan.users
    ]  # fmt: skip
    RabbitmqctlBackend(str(wrapper)).apply(plan.vhost, grants, prune=True)
    state.timings["provisioned"] = round(time.monotonic() - started, 1)

    # --- the curator's and the companies' releases -------------------------------------------------------
    curator_docs = local.helm_template(
        helm, "curator", "tessera-curator", "tessera", "-f", str(VALUES / "curator.yaml"),
        "--set", f"federation.id={federation}", "--set", f"broker.auth.username={curator_user}",
        "--set-file", f"roster.content={roster_file}", "--set", "rounds.targetAccuracy=null",
    )  # fmt: skip
    cluster.apply(curator_docs)
    files, encoding, _ = write_hospital_data(root / "source-data")
    company_docs = {}
    for (company, org), source in zip(orgs.items(), files.values(), strict=True):
        cluster.add_secret(company, "tessera-broker-password", {"password": passwords[org]})
        data_dir = cluster.add_claim(company, "clinical-records")
        shutil.copyfile(source, data_dir / "records.csv")
        docs = local.helm_template(
            helm, "tessera", "tessera-participant", company, "-f", str(VALUES / "company.yaml"),
            "--set", f"federation.id={federation}", "--set", f"organisation.id={org}",
            "--set-file", f"roster.content={roster_file}", "--set", f"roster.fingerprint={fingerprint}",
            "--set-file", f"data.encoding.content={encoding}", "--set", "data.existingClaim=clinical-records",
        )  # fmt: skip
        cluster.apply(docs)
        company_docs[company] = docs

    curator_local = cluster.pod(local.one(curator_docs, "Deployment"), ("unused", 0))
    # The curator holds PAUSE_S before rounds 2 and 3 (testing-only fault injection, set here, never rendered
    # by the chart): the kills below land between two rounds however fast the rounds are (the first clean-clone
    # run finished all four rounds before the curator was killed).
    state.pods["curator"] = Pod(
        curator_local,
        f"tessera-e2e-{tag}-curator",
        state.networks[0],
        extra_env={
            "TESSERA_FAULTS__PAUSE_BEFORE_ROUND": "2,3",
            "TESSERA_FAULTS__PAUSE_SECONDS": str(PAUSE_S),
        },
    )
    for i, (company, docs) in enumerate(company_docs.items(), start=1):
        pod_local = cluster.pod(local.one(docs, "Deployment"), ("unused", 0))
        state.pods[company] = Pod(pod_local, f"tessera-e2e-{tag}-{company}", state.networks[i])
    own_files(cluster.root)
    for pod in state.pods.values():
        pod.run_init_containers()
        pod.start()
    for name, pod in state.pods.items():
        wait_for(lambda pod=pod: pod.probe("readinessProbe") == 200, f"{name} ready", state, timeout=180)
    state.timings["ready"] = round(time.monotonic() - started, 1)

    # --- isolation, from inside acme's container with acme's own credentials -----------------------------
    globex_ip = docker(
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        state.pods["globex"].name,
    ).stdout.split()[0]
    curator_ip = docker(
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        state.pods["curator"].name,
    ).stdout.split()[0]
    probe = (
        "import os, socket, pika\n"
        "from urllib.parse import urlsplit\n"
        "url = urlsplit(os.environ['TESSERA_BROKER__URL'])\n"
        "password = open(os.environ['TESSERA_BROKER__PASSWORD_FILE']).read().strip()\n"
        "params = pika.ConnectionParameters(url.hostname, url.port, os.environ['VHOST'],\n"
        "    pika.PlainCredentials(os.environ['TESSERA_BROKER__USERNAME'], password), connection_attempts=1)\n"
        "connection = pika.BlockingConnection(params)\n"
        "try:\n"
        "    connection.channel().basic_get(os.environ['OTHER_INBOX'])\n"
        "    print('inbox: read')\n"
        "except pika.exceptions.ChannelClosedByBroker as e:\n"
        "    print('inbox:', e.reply_code)\n"
        "connection.channel().basic_get(os.environ['OWN_INBOX']); print('own: ok')\n"
        "for name, host, port in (('globex', os.environ['GLOBEX'], 9100), ('curator', os.environ['CURATOR'], 9100)):\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=3).close(); print(name + ': reached')\n"
        "    except OSError as e:\n"
        "        print(name + ': unreachable')\n"
    )
    acme = state.pods["acme"]
    out = docker(
        "exec", "-e", f"VHOST={plan.vhost}", "-e", f"OTHER_INBOX=participant.{orgs['globex']}.inbox",
        "-e", f"OWN_INBOX=participant.{orgs['acme']}.inbox", "-e", f"GLOBEX={globex_ip}", "-e", f"CURATOR={curator_ip}",
        acme.name, "python", "-c", probe, check=False, timeout=60,
    )  # fmt: skip
    state.isolation = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line) | {
        "stderr": out.stderr[-500:]
    }

    # --- kill acme after round 1, the curator after round 2 (each in a pause); both come back on their volumes
    wait_for(lambda: curator_report(state).get("rounds_completed", 0) >= 1, "round 1", state)
    state.epsilon_before_kill = accountant_epsilon(acme)
    docker("kill", acme.name)  # SIGKILL, no grace period
    state.acme_killed_after = curator_report(state).get("rounds_completed", 0)
    docker("start", acme.name)
    wait_for(lambda: acme.probe("readinessProbe") == 200, "acme back", state, timeout=180)
    curator = state.pods["curator"]
    wait_for(lambda: curator_report(state).get("rounds_completed", 0) >= 2, "round 2", state)
    docker("kill", curator.name)
    state.curator_killed_after = curator_report(state).get("rounds_completed", 0)
    docker("start", curator.name)
    wait_for(lambda: curator_report(state).get("status") == "finished", "the federation's end", state)
    state.timings["finished"] = round(time.monotonic() - started, 1)
    for name, pod in state.pods.items():
        state.probes[name] = {p: pod.probe(p) for p in ("startupProbe", "livenessProbe", "readinessProbe")}
        state.metrics[name] = pod.http_get("metrics", "/metrics")[1]
    state.report = curator_report(state)
    state.curator_log = curator.logs_text()
    print(f"container rollout: {json.dumps(state.timings)}")
    yield state


def test_federation_completes_across_kills(rollout: Rollout) -> None:
    report = rollout.report
    assert report["status"] == "finished", rollout.tails()
    # No target accuracy: all four rounds run, so both kills fell in the middle of the training.
    assert report["stop_reason"] == "round limit 4 reached" and report["rounds_completed"] == 4
    # Each kill fell in the curator's hold before the next round (before round 2, then before round 3, which
    # the restarted curator holds again): three holds in its log, across both of its runs.
    assert (rollout.acme_killed_after, rollout.curator_killed_after) == (1, 2)
    assert rollout.curator_log.count("fault_injection_pause") == 3, rollout.curator_log[-3000:]
    assert report["restarts"] == 1  # the curator resumed from its checkpoint, not from scratch
    later = [r for r in report["history"] if r["round"] > rollout.acme_killed_after + 1]
    assert any(rollout.orgs["acme"] in r["participants"] for r in later), report["history"]
    assert report["history"][-1]["accuracy"] > 0.5


def test_acme_epsilon_continues_from_its_volume(rollout: Rollout) -> None:
    after = accountant_epsilon(rollout.pods["acme"])
    assert rollout.epsilon_before_kill > 0
    assert after >= rollout.epsilon_before_kill


def test_isolation_from_inside_a_company_container(rollout: Rollout) -> None:
    assert rollout.isolation.get("inbox") == "403", rollout.isolation
    assert rollout.isolation.get("own") == "ok", rollout.isolation
    assert rollout.isolation.get("globex") == "unreachable", rollout.isolation
    assert rollout.isolation.get("curator") == "unreachable", rollout.isolation


def test_probes_and_metrics_answer(rollout: Rollout) -> None:
    for name, probes in rollout.probes.items():
        assert probes == {"startupProbe": 200, "livenessProbe": 200, "readinessProbe": 200}, name
        assert "tessera_" in rollout.metrics[name], name


def test_the_model_exports_inside_the_curator_container(rollout: Rollout) -> None:
    out = rollout.pods["curator"].exec("tessera", "model", "export", "--out", "/tmp/model")
    assert out.returncode == 0, out.stderr
    assert "model.safetensors" in out.stdout
