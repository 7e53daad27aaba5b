"""End-to-end rollout of the rendered charts against the local RabbitMQ: one broker, one curator, three
companies, each company with its own namespace, credentials, identity key, data volume and budget.

1. Each company installs its bootstrap release (``bootstrap=true``): the rendered Job creates the
   organisation's identity key on the company's own claim and prints only the public key. The
   coordinator builds the roster from the three public keys (``tessera roster build``), which prints the
   roster fingerprint each company pins; it renders tessera-broker and provisions the local broker with
   exactly the rendered plan (``plan.tsv``: vhost, users, permissions, topic permissions) and the
   passwords from the Secrets the broker's provisioner would mount. No private key ever leaves a company.
2. The curator release and the three companies' releases (the upgrade: roster, fingerprint, the same
   claim) are rendered with ``helm template``; each Deployment's containers run as local processes with
   exactly the rendered command and environment (``localpod``: mounted paths map to local files written
   from the rendered ConfigMaps and Secrets, the broker URL's host and port to the local broker). The
   identity key is copied by the rendered init container from the claim into an in-memory volume.
3. The federation runs to completion; the rendered readiness/liveness probes and /metrics answer.
4. With company A's credentials the broker refuses to let it read B's inbox, publish with B's routing
   key, publish to the default exchange, or claim B's user_id.

A chart value the services do not understand, or a required setting the chart does not render, makes a
service exit with status 2 at start, so the rollout fails (``test_services_refuse_drift`` shows it).
Broker users are global, so every name carries a random suffix, and the vhost and users are removed in
a finalizer, as are the processes. Skips without helm, rabbitmqctl or a broker.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import pytest
import yaml
from localpod import Cluster, LocalPod, file_mode

REPO_ROOT = Path(__file__).resolve().parents[2]
CHARTS = REPO_ROOT / "charts"
VALUES = Path(__file__).resolve().parent / "values"
BROKER_URL = os.environ.get("TESSERA_TEST_AMQP_URL", "amqp://127.0.0.1:5672/")
COMPANIES = ("acme", "globex", "initech")
START_TIMEOUT_S = 120
FEDERATION_TIMEOUT_S = 120

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------------ helm
def find_helm() -> str | None:
    local = REPO_ROOT / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


def helm_template(helm: str, release: str, chart: str, namespace: str, *args: str) -> list[dict[str, Any]]:
    env = {
        **os.environ,
        "KUBECONFIG": os.devnull,
        "HELM_CACHE_HOME": str(REPO_ROOT / ".tools" / "helm-cache"),
        "HELM_CONFIG_HOME": str(REPO_ROOT / ".tools" / "helm-config"),
        "HELM_DATA_HOME": str(REPO_ROOT / ".tools" / "helm-data"),
    }
    proc = subprocess.run(
        [helm, "template", release, str(CHARTS / chart), "--namespace", namespace, *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"helm template {chart} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------------------------ broker provisioning
@dataclass
class Plan:
    """The rendered provisioning plan of tessera-broker (files/provision.sh documents the records)."""

    vhost: str = ""
    users: list[str] = field(default_factory=list)
    permissions: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    topic_permissions: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Plan:
        plan = cls()
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            kind, *f = line.split("\t")
            if kind == "vhost":
                plan.vhost = f[0]
            elif kind == "user":
                plan.users.append(f[0])
            elif kind == "permissions":
                plan.permissions[f[0]] = (f[1], f[2], f[3])
            elif kind == "topic_permissions":
                plan.topic_permissions.setdefault(f[0], []).append((f[1], f[2], f[3]))
            else:
                raise AssertionError(f"unknown plan record {line!r}")
        return plan


def provisioner_passwords(broker_docs: list[dict[str, Any]], cluster: Cluster) -> dict[str, str]:
    """Each user's password, read from the Secret the broker's provisioner mounts for that user."""
    statefulset = one(broker_docs, "StatefulSet")
    namespace = statefulset["metadata"]["namespace"]
    (users,) = [v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == "users"]
    passwords = {}
    for source in users["projected"]["sources"]:
        (item,) = source["secret"]["items"]
        passwords[item["path"]] = cluster.secret_value(
            namespace, source["secret"]["name"], item["key"]
        ).decode()
    return passwords


def provision(plan: Plan, passwords: dict[str, str]) -> None:
    from tessera.transport import topology as topo
    from tessera.transport.provision import RabbitmqctlBackend, UserGrant

    grants = [
        UserGrant(
            user,
            passwords[user],
            topo.Permissions(*plan.permissions[user]),
            tuple(topo.TopicPermission(*t) for t in plan.topic_permissions.get(user, [])),
        )
        for user in plan.users
    ]
    RabbitmqctlBackend().apply(plan.vhost, grants, prune=True)


def build_roster(
    coordinator: Path, federation: str, public_keys: dict[str, str], curator_user: str
) -> tuple[Path, str]:
    """The coordinator's step: ``tessera roster build`` from the organisations' public keys only; the roster
    file and the fingerprint it printed (what every company pins)."""
    coordinator.mkdir()
    roster_file = coordinator / "roster.json"
    built = subprocess.run(
        [sys.executable, "-m", "tessera.apps.cli", "roster", "build", "--federation", federation,
         *[a for org, key in public_keys.items() for a in ("--member", f"{org}={key}")],
         "--curator-user", curator_user, "--clip", "1.0", "--out", str(roster_file)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    fingerprint = re.search(r"roster fingerprint: ([0-9a-f]{64})", built.stdout)
    assert fingerprint, built.stdout
    return roster_file, fingerprint.group(1)


# ---------------------------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    federation: str
    vhost: str
    orgs: dict[str, str]  # company -> organisation id
    curator_user: str
    passwords: dict[str, str]  # broker user -> password
    broker: tuple[str, int]
    pods: dict[str, LocalPod] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    probes: dict[str, dict[str, int]] = field(default_factory=dict)
    lingering: dict[str, int] = field(default_factory=dict)  # liveness status after finishing
    metrics: dict[str, bytes] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    logs: Path = Path()
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    public_keys: dict[str, str] = field(default_factory=dict)  # organisation -> what its Job printed

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-8:])
            for p in sorted(self.logs.glob("*.log"))
        )


def wait_ready(pod: LocalPod, container: str, process: subprocess.Popen[bytes], rollout: Rollout) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"{pod.name} exited with {process.returncode} before it was ready:\n{rollout.log_tails()}"
            )
        try:
            status, _ = pod.probe(container, "readinessProbe")
        except OSError:
            status = 0
        if status == 200:
            rollout.probes[pod.namespace] = {
                probe: pod.probe(container, probe)[0]
                for probe in ("startupProbe", "livenessProbe", "readinessProbe")
            }
            rollout.metrics[pod.namespace] = pod.http_get(container, "metrics", "/metrics")[1]
            return
        time.sleep(0.2)
    pytest.fail(f"{pod.name} not ready after {START_TIMEOUT_S} s:\n{rollout.log_tails()}")


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Rollout]:
    helm = find_helm()
    if helm is None:
        pytest.skip("helm is not installed: run `bash scripts/install-helm.sh` (installs .tools/bin/helm)")
    from tessera.transport import local_broker_problem

    reason = local_broker_problem(BROKER_URL)
    if reason:
        pytest.skip(f"needs a local RabbitMQ administered with rabbitmqctl ({reason}; `make broker`)")
    from tessera.apps.demo import write_hospital_data
    from tessera.transport import deprovision, generate_password

    started = time.monotonic()
    tag = secrets.token_hex(3)
    federation, curator_user = f"e2e-{tag}", f"cur-{tag}"
    orgs = {company: f"{company}-{tag}" for company in COMPANIES}
    root = tmp_path_factory.mktemp("rollout")
    cluster = Cluster(root / "cluster")
    parts = urlsplit(BROKER_URL)
    broker = (parts.hostname or "127.0.0.1", parts.port or 5672)

    # --- each company, step 1: its identity key is born on its own claim; only the public key leaves ------
    public_keys = {}
    for company, org in orgs.items():
        docs = helm_template(
            helm, "tessera", "tessera-participant", company, "--set", "bootstrap=true",
            "--set", f"federation.id={federation}", "--set", f"organisation.id={org}",
        )  # fmt: skip
        cluster.apply(docs)
        job = cluster.pod(one(docs, "Job"), broker)
        job.run_init_containers()
        shown = re.search(r"public key:\s+([0-9a-f]{64})", job.run("identity-show"))
        assert shown, f"{company}: the bootstrap Job printed no public key"
        public_keys[org] = shown.group(1)

    # --- the coordinator: the roster from public keys only, the broker release, provisioning -------------
    roster_file, fingerprint = build_roster(root / "coordinator", federation, public_keys, curator_user)
    org_sets = [x for i, org in enumerate(orgs.values()) for x in ("--set", f"organisations[{i}].id={org}")]
    cluster.add_secret("tessera", "initech-broker-password", {"amqp-password": generate_password()})
    broker_docs = helm_template(
        helm, "broker", "tessera-broker", "tessera", "-f", str(VALUES / "broker.yaml"),
        "--set", f"federation.id={federation}", "--set", f"auth.curator.username={curator_user}", *org_sets,
    )  # fmt: skip
    cluster.apply(broker_docs)
    plan = Plan.parse(one(broker_docs, "ConfigMap", "-provisioning")["data"]["plan.tsv"])
    passwords = provisioner_passwords(broker_docs, cluster)
    assert plan.vhost == f"tessera-{federation}"
    assert plan.users == [curator_user, *orgs.values()] and set(passwords) == set(plan.users)
    state = Rollout(
        federation, plan.vhost, orgs, curator_user, passwords, broker, logs=root / "logs",
        public_keys=public_keys,
    )  # fmt: skip
    state.logs.mkdir()

    def cleanup() -> None:
        for pod in state.pods.values():
            pod.kill()
        deprovision(federation, organisations=list(orgs.values()), curator_user=curator_user)

    request.addfinalizer(cleanup)
    provision(plan, passwords)
    state.timings["provisioned"] = round(time.monotonic() - started, 1)
    broker_service = next(
        d for d in broker_docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"
    )

    # --- the coordinator's curator release ---------------------------------------------------------------
    curator_docs = helm_template(
        helm, "curator", "tessera-curator", "tessera", "-f", str(VALUES / "curator.yaml"),
        "--set", f"federation.id={federation}", "--set", f"broker.auth.username={curator_user}",
        "--set-file", f"roster.content={roster_file}", "--set", f"health.port={free_port()}",
    )  # fmt: skip
    cluster.apply(curator_docs)

    # --- each company: its hand-over Secrets, its data, its own release in its own namespace -------------
    files, encoding, _ = write_hospital_data(root / "source-data")
    company_docs = {}
    for (company, org), source in zip(orgs.items(), files.values(), strict=True):
        cluster.add_secret(company, "tessera-broker-password", {"password": passwords[org]})
        if company == "globex":  # records in a directory on the node
            data_dir = root / "nodes" / "globex-node" / "records"
            data_args = ["--set", f"data.hostPath={data_dir}"]
        else:  # records on a claim the company already has
            data_dir = cluster.add_claim(company, "clinical-records")
            data_args = ["--set", "data.existingClaim=clinical-records"]
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, data_dir / "records.csv")
        docs = helm_template(
            helm, "tessera", "tessera-participant", company, "-f", str(VALUES / "company.yaml"),
            "--set", f"federation.id={federation}", "--set", f"organisation.id={org}",
            "--set-file", f"roster.content={roster_file}", "--set", f"roster.fingerprint={fingerprint}",
            "--set-file", f"data.encoding.content={encoding}", "--set", f"health.port={free_port()}", *data_args,
        )  # fmt: skip
        cluster.apply(docs)
        company_docs[company] = docs

    # The URL every release renders names the broker's Service; only its host and port are rewritten.
    for docs in [curator_docs, *company_docs.values()]:
        (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
        url = urlsplit(next(e["value"] for e in container["env"] if e["name"] == "TESSERA_BROKER__URL"))
        assert (
            url.hostname
            == f"{broker_service['metadata']['name']}.{broker_service['metadata']['namespace']}.svc"
        )
        assert url.port in [p["port"] for p in broker_service["spec"]["ports"]]

    # --- run all pods at once, as `helm install` would: participants wait for the curator's topology -----
    curator_pod = cluster.pod(one(curator_docs, "Deployment"), broker)
    state.pods["curator"] = curator_pod
    curator_process = curator_pod.start("curator", state.logs / "curator.log")
    participants: dict[str, subprocess.Popen[bytes]] = {}
    for company, docs in company_docs.items():
        pod = cluster.pod(one(docs, "Deployment"), broker)
        state.pods[company] = pod
        pod.run_init_containers()
        participants[company] = pod.start("participant", state.logs / f"{company}.log")
    wait_ready(curator_pod, "curator", curator_process, state)
    for company, process in participants.items():
        wait_ready(state.pods[company], "participant", process, state)
    state.timings["ready"] = round(time.monotonic() - started, 1)

    # The charts render TESSERA_HEALTH__LINGER_AFTER_FINISH=true (a Deployment would restart an exited
    # container): a finished service keeps its probes green until it is stopped, then exits 0 on SIGTERM.
    running = {"curator": (curator_pod, "curator", curator_process)} | {
        company: (state.pods[company], "participant", process) for company, process in participants.items()
    }
    deadline = time.monotonic() + FEDERATION_TIMEOUT_S
    for name, (pod, container, process) in running.items():
        log = state.logs / f"{name}.log"
        while '"serving_until_stopped"' not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"the federation did not finish in {FEDERATION_TIMEOUT_S} s:\n{state.log_tails()}"
                )
            time.sleep(0.5)
        state.lingering[name] = pod.probe(container, "livenessProbe")[0]
    state.timings["finished"] = round(time.monotonic() - started, 1)
    for _, _, process in running.values():
        process.send_signal(signal.SIGTERM)
    for _, _, process in running.values():
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a service ignored SIGTERM:\n{state.log_tails()}")
    state.exit_codes = {"curator": curator_process.returncode} | {
        c: p.returncode for c, p in participants.items()
    }
    report = curator_pod.volumes["state"] / "curator" / "report.json"
    state.report = json.loads(report.read_text()) if report.exists() else {}
    state.seconds = time.monotonic() - started
    print(f"rollout: {state.seconds:.1f} s; {json.dumps(state.timings)}")
    yield state


# ------------------------------------------------------------------------------------------------ tests
def test_federation_completes_with_every_company(rollout: Rollout) -> None:
    assert rollout.exit_codes == dict.fromkeys(["curator", *COMPANIES], 0), rollout.log_tails()
    report = rollout.report
    assert report["status"] == "finished", report.get("stop_reason")
    assert report["federation"] == rollout.federation
    history = report["history"]
    assert 1 <= report["rounds_completed"] == len(history) <= 4
    for record in history:
        assert sorted(record["participants"]) == sorted(rollout.orgs.values())
        assert 0 < record["epsilon_mean"] <= 3.0
    reason = report["stop_reason"]
    assert "target accuracy 0.9 reached" in reason or "round limit 4 reached" in reason, reason
    assert history[-1]["accuracy"] > 0.5


def test_each_company_keeps_its_own_state(rollout: Rollout) -> None:
    for company in COMPANIES:
        pod = rollout.pods[company]
        state_dir = pod.volumes["state"] / "participant"
        assert any(state_dir.iterdir()), f"{company}: no accountant state on its claim"
        # The key the service read: born on the company's claim in step 1 (the same key: the roster
        # holds its public half), copied owner-only by the init container into the in-memory volume.
        assert file_mode(pod.volumes["identity"] / "key") == 0o400
        stored = pod.volumes["state"] / "identity"
        assert (stored / "key").read_text() == (pod.volumes["identity"] / "key").read_text()
        org = rollout.orgs[company]
        assert (stored / "public.hex").read_text().strip() == rollout.public_keys[org]
        roster = json.loads((pod.volumes["roster"] / "roster.json").read_text())
        (member,) = [m for m in roster["members"] if m["organisation"] == org]
        assert member["identity_key"] == rollout.public_keys[org]
        assert "identity-secret" not in pod.volumes
    assert rollout.pods["acme"].volumes["state"] != rollout.pods["initech"].volumes["state"]


def test_rendered_probes_and_metrics_answer(rollout: Rollout) -> None:
    assert rollout.lingering == dict.fromkeys(["curator", *COMPANIES], 200)
    assert set(rollout.probes) == {"tessera", *COMPANIES}
    for namespace, probes in rollout.probes.items():
        assert probes == {"startupProbe": 200, "livenessProbe": 200, "readinessProbe": 200}, namespace
        assert b"tessera_" in rollout.metrics[namespace], namespace
    assert b"tessera_privacy_epsilon_remaining" in rollout.metrics["acme"]


def _connect(rollout: Rollout, user: str, password: str | None = None) -> pika.BlockingConnection:
    host, port = rollout.broker
    credentials = pika.PlainCredentials(user, password if password is not None else rollout.passwords[user])
    return pika.BlockingConnection(
        pika.ConnectionParameters(host, port, rollout.vhost, credentials, connection_attempts=1)
    )


def _refused(action: Any, code: int, text: str) -> None:
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
        action()
    assert caught.value.reply_code == code, caught.value
    assert text in caught.value.reply_text, caught.value.reply_text


def test_company_credentials_are_confined_by_the_broker(rollout: Rollout) -> None:
    a, b = rollout.orgs["acme"], rollout.orgs["globex"]
    connection = _connect(rollout, a)
    try:

        def publish(exchange: str, routing_key: str, user_id: str) -> None:
            channel = connection.channel()
            channel.confirm_delivery()
            properties = pika.BasicProperties(delivery_mode=2, user_id=user_id)
            channel.basic_publish(exchange, routing_key, b"forged", properties=properties, mandatory=True)

        where = f"in vhost '{rollout.vhost}' refused for user '{a}'"
        # Reading company B's inbox.
        inbox_b = f"participant.{b}.inbox"
        _refused(
            lambda: connection.channel().basic_get(inbox_b),
            403,
            f"ACCESS_REFUSED - access to queue '{inbox_b}' {where}",
        )
        # Publishing with B's routing key: the topic permission refuses it.
        _refused(
            lambda: publish("tessera.to-curator", f"from.{b}", a),
            403,
            f"ACCESS_REFUSED - access to topic 'from.{b}' in exchange 'tessera.to-curator' {where}",
        )
        # Publishing to the default exchange (it would reach any queue by name).
        _refused(
            lambda: publish("", inbox_b, a),
            403,
            f"ACCESS_REFUSED - access to exchange 'amq.default' {where}",
        )
        # Setting another user_id.
        _refused(
            lambda: publish("tessera.to-curator", f"from.{a}", b),
            406,
            f"PRECONDITION_FAILED - user_id property set to '{b}' but authenticated user was '{a}'",
        )
        # Positive controls: A reads its own inbox and publishes as itself.
        connection.channel().basic_get(f"participant.{a}.inbox")
        publish("tessera.to-curator", f"from.{a}.probe", a)
    finally:
        connection.close()
    # And B's password is not A's.
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        _connect(rollout, a, rollout.passwords[b])


def test_services_refuse_drift(rollout: Rollout, tmp_path: Path) -> None:
    """A chart value the services do not understand, or a required setting not rendered, stops the pod."""
    helm = find_helm()
    assert helm is not None
    curator_pod = rollout.pods["curator"]
    cluster = curator_pod.cluster
    extra = json.dumps([{"name": "TESSERA_TYPO", "value": "1"}])
    docs = helm_template(
        helm, "drift", "tessera-curator", "tessera", "-f", str(VALUES / "curator.yaml"),
        "--set", f"federation.id={rollout.federation}",
        "--set", f"broker.auth.username={rollout.curator_user}",
        "--set-file", f"roster.content={_roster_path(curator_pod)}",
        "--set", f"health.port={free_port()}", "--set-json", f"extraEnv={extra}",
    )  # fmt: skip
    cluster.apply(docs)
    unknown = cluster.pod(one(docs, "Deployment"), rollout.broker)
    participant = rollout.pods["acme"]
    deployment = {
        "metadata": {"namespace": participant.namespace, "name": "missing-setting"},
        "spec": {"template": {"spec": json.loads(json.dumps(participant.spec))}},
    }
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container["env"] = [e for e in container["env"] if e["name"] != "TESSERA_DATA__PATH"]
    missing = cluster.pod(deployment, rollout.broker)
    rollout.pods["drift-unknown"], rollout.pods["drift-missing"] = unknown, missing
    missing.run_init_containers()
    processes = {
        "unknown": (unknown.start("curator", tmp_path / "unknown.log"), tmp_path / "unknown.log"),
        "missing": (missing.start("participant", tmp_path / "missing.log"), tmp_path / "missing.log"),
    }
    for process, _ in processes.values():
        process.wait(60)
    process, log = processes["unknown"]
    assert process.returncode == 2
    assert "TESSERA_TYPO: not a setting of this service" in log.read_text()
    process, log = processes["missing"]
    assert process.returncode == 2 and "TESSERA_DATA__PATH" in log.read_text()


def _roster_path(pod: LocalPod) -> Path:
    return pod.volumes["roster"] / "roster.json"
