"""Tests of charts/tessera-participant: lint, strict Kubernetes schemas, hardening, wiring, bad values.

One release per company: the ci files are the default plus three companies of one federation. Whether
the rendered TESSERA_* variables are what the participant's settings accept is in test_chart_settings.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from chart_helpers import (
    CHARTS_DIR,
    K8S_VERSIONS,
    assert_every_value_documented,
    by_kind,
    ci_files,
    container_env,
    main_container,
    mounts,
    one,
    pod_spec,
    render_notes,
    validate_strict,
    values_of,
    volume_for_path,
)

if TYPE_CHECKING:
    from conftest import Helm

CHART = "tessera-participant"
CHART_DIR = CHARTS_DIR / CHART
CI_FILES = ci_files(CHART)
CI_IDS = [p.stem for p in CI_FILES]
DEFAULT = CHART_DIR / "ci" / "default-values.yaml"
COMPANIES = [CHART_DIR / "ci" / f"{c}-values.yaml" for c in ("hospital-a", "hospital-b", "clinic-7")]


def render(helm: Helm, ci_file: Path, *extra: str) -> list[dict[str, Any]]:
    return helm.render(CHART, "-f", str(ci_file), *extra)


def test_ci_files_exist() -> None:
    assert {DEFAULT, *COMPANIES} <= set(CI_FILES)


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_lint_strict(helm: Helm, ci_file: Path) -> None:
    helm.run("lint", "--strict", str(CHART_DIR), "-f", str(ci_file))


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_manifests_pass_strict_kubernetes_schema(helm: Helm, ci_file: Path, k8s_version: str) -> None:
    docs = render(helm, ci_file)
    assert {"Deployment", "NetworkPolicy", "ServiceAccount"} <= {d["kind"] for d in docs}
    validate_strict(docs, k8s_version)


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_one_participant_hardened(helm: Helm, ci_file: Path) -> None:
    docs = render(helm, ci_file)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = pod_spec(docs)
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["fsGroup"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in [*pod["initContainers"], *pod["containers"]]:
        sc, name = container["securityContext"], container["name"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, name
        assert sc["runAsNonRoot"] is True and sc["capabilities"] == {"drop": ["ALL"]}, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
    container = main_container(docs)
    assert container["command"] == ["tessera"] and container["args"] == ["participant"]
    writable = {path for path, m in mounts(container).items() if not m.get("readOnly")}
    assert writable == {"/var/lib/tessera", "/tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts(container)["/tmp"]["name"]]
    claim = volumes[mounts(container)["/var/lib/tessera"]["name"]]["persistentVolumeClaim"]["claimName"]
    existing = values_of(ci_file).get("persistence", {}).get("existingClaim")
    if existing:
        assert claim == existing and not by_kind(docs, "PersistentVolumeClaim")
    else:
        pvc = one(docs, "PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == claim
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", (
            "the accountant must survive"
        )
    assert not by_kind(docs, "Secret"), "the participant chart must never render credentials"
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}
    port = int(container_env(container)["TESSERA_HEALTH__PORT"])
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_identity_key_reaches_the_service_owner_only(helm: Helm, ci_file: Path) -> None:
    values = values_of(ci_file)
    docs = render(helm, ci_file)
    pod, container = pod_spec(docs), main_container(docs)
    env = container_env(container)
    key_volume, key_name = volume_for_path(pod, container, env["TESSERA_IDENTITY_KEY_FILE"])
    assert key_volume["emptyDir"]["medium"] == "Memory", "the private key must not touch the node's disk"
    assert key_name == "key"
    secret = values.get("identity", {}).get("existingSecret")
    inits = {c["name"]: c for c in pod["initContainers"]}
    copy = inits["identity-key"]
    if secret:  # a key made elsewhere, handed over as a Secret
        assert list(inits) == ["identity-key"]
        stored = "/etc/tessera/identity-secret/key"
        stored_volume, stored_key = volume_for_path(pod, copy, stored)
        assert stored_volume["secret"]["secretName"] == secret
        assert stored_volume["secret"]["defaultMode"] == 0o400
        assert stored_volume["secret"]["items"] == [
            {"key": values["identity"].get("existingSecretKey", "key"), "path": stored_key}
        ]
    else:  # born here: created on the release's own state volume at first start, kept there
        assert list(inits) == ["identity-init", "identity-key"], "the key must exist before it is copied"
        stored = "/var/lib/tessera/identity/key"
        stored_volume, _ = volume_for_path(pod, copy, stored)
        (state,) = [v for v in pod["volumes"] if v["name"] == "state"]
        assert stored_volume is state, "the key lives on the state claim, with the privacy accountant"
        create = inits["identity-init"]
        assert create["command"] == ["tessera"] and create["args"][:2] == ["identity", "init"]
        assert (
            create["args"][create["args"].index("--key") + 1] == stored and "--if-missing" in create["args"]
        )
        assert volume_for_path(pod, create, stored)[0] is stored_volume
        assert "identity-secret" not in {v["name"] for v in pod["volumes"]}
    # install -m 0400 <stored key> <file in the in-memory volume the service reads>
    *cmd, source, target = copy["command"]
    assert cmd == ["install", "-m", "0400"] and source == stored
    assert volume_for_path(pod, copy, target)[0] is key_volume and target == env["TESSERA_IDENTITY_KEY_FILE"]
    # The service reads only the 0400 copy, and never skips the permission check.
    assert "TESSERA_ALLOW_SHARED_KEY_FILE" not in env
    if secret:
        assert all(m["name"] != stored_volume["name"] for m in container["volumeMounts"])


def test_bootstrap_creates_the_key_on_the_claim_the_release_keeps(helm: Helm) -> None:
    """Step 1 of a company's rollout: no roster exists yet, so only the claim and the key Job render."""
    docs = render_bootstrap(helm)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Job", "NetworkPolicy", "PersistentVolumeClaim", "ServiceAccount"], kinds
    job = next(d for d in docs if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    (create,) = pod["initContainers"]
    (show,) = pod["containers"]
    assert create["args"][:2] == ["identity", "init"] and "--if-missing" in create["args"]
    assert show["args"][:2] == ["identity", "show"]
    assert pod["automountServiceAccountToken"] is False
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (state,) = [v for v in pod["volumes"] if v["name"] == "state"]
    # The normal release (step 2) mounts the same claim, so the key born in step 1 is the one it uses.
    normal = pod_spec(render(helm, DEFAULT))
    (normal_state,) = [v for v in normal["volumes"] if v["name"] == "state"]
    assert state["persistentVolumeClaim"] == normal_state["persistentVolumeClaim"]
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["ingress"] == [] and policy["spec"]["egress"] == []


def render_bootstrap(helm: Helm, *extra: str) -> list[dict[str, Any]]:
    out = helm.run(
        "template", "tessera", str(CHART_DIR), "--set", "bootstrap=true",
        "--set", "federation.id=demo", "--set", "organisation.id=org-a", *extra,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


def test_bootstrap_refuses_a_handed_over_key(helm: Helm) -> None:
    with pytest.raises(helm.Error, match=r"bootstrap is true but identity\.existingSecret is set"):
        render_bootstrap(helm, "--set", "identity.existingSecret=k")


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_organisation_files_and_data(helm: Helm, ci_file: Path) -> None:
    values = values_of(ci_file)
    docs = render(helm, ci_file)
    pod, container = pod_spec(docs), main_container(docs)
    env = container_env(container)
    org = values["organisation"]["id"]
    assert env["TESSERA_ORGANISATION"] == org
    assert env["TESSERA_BROKER__USERNAME"] == org, "the broker user is the organisation id (docs/topology.md)"
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["tessera.io/organisation"] == org

    # Data: read-only, from the claim or the node directory.
    data_volume, rel = volume_for_path(pod, container, env["TESSERA_DATA__PATH"])
    assert rel == values["data"]["file"]
    assert mounts(container)["/data"]["readOnly"] is True
    if values["data"].get("existingClaim"):
        assert data_volume["persistentVolumeClaim"] == {
            "claimName": values["data"]["existingClaim"],
            "readOnly": True,
        }
    else:
        assert data_volume["hostPath"] == {"path": values["data"]["hostPath"], "type": "Directory"}

    # Roster from values (checked to be the federation's and to list this organisation).
    roster_volume, _ = volume_for_path(pod, container, env["TESSERA_ROSTER_FILE"])
    roster = json.loads(one(docs, "ConfigMap", "-roster")["data"]["roster.json"])
    assert roster_volume["configMap"]["name"].endswith("-roster")
    assert roster["federation"] == values["federation"]["id"] == env["TESSERA_FEDERATION"]
    assert org in [m["organisation"] for m in roster["members"]]

    encoding = values["data"].get("encoding", {})
    if encoding.get("existingConfigMap"):
        volume, _ = volume_for_path(pod, container, env["TESSERA_DATA__ENCODING_FILE"])
        assert volume["configMap"]["name"] == encoding["existingConfigMap"]
    else:
        assert "TESSERA_DATA__ENCODING_FILE" not in env

    password_volume, _ = volume_for_path(pod, container, env["TESSERA_BROKER__PASSWORD_FILE"])
    assert password_volume["secret"]["secretName"] == values["broker"]["auth"]["existingSecret"]
    assert password_volume["secret"]["items"][0]["key"] == values["broker"]["auth"].get(
        "existingSecretKey", "password"
    )
    assert "TESSERA_BROKER__PASSWORD" not in env


def test_privacy_and_data_settings_render_as_the_service_reads_them(helm: Helm) -> None:
    env = container_env(main_container(render(helm, COMPANIES[0])))
    assert env["TESSERA_PRIVACY__DELTA"] == "1e-05"
    assert env["TESSERA_PRIVACY__TARGET_EPSILON"] == "3"
    assert env["TESSERA_PRIVACY__PLANNED_ROUNDS"] == "40"
    assert env["TESSERA_PRIVACY__ENABLED"] == "true"
    assert json.loads(env["TESSERA_DATA__DROP_COLUMNS"]) == ["patient_id", "admission_date"]
    assert json.loads(env["TESSERA_DATA__LABEL_CLASSES"]) == ["benign", "malignant"]
    assert env["TESSERA_BROKER__CHUNK_SIZE"] == "16777216"
    assert "TESSERA_TRAINING_SEED" not in env and "TESSERA_DATA__FORMAT" not in env
    env = container_env(main_container(render(helm, COMPANIES[1], "--set", "trainingSeed=12")))
    assert env["TESSERA_DATA__FORMAT"] == "npz" and env["TESSERA_PRIVACY__ACCOUNTANT"] == "prv"
    assert env["TESSERA_TRAINING_SEED"] == "12"
    assert not any(name.startswith("TESSERA_FAULTS__") for name in env), "fault injection is for tests only"


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_network_policy_allows_only_broker_and_dns(helm: Helm, ci_file: Path) -> None:
    values = values_of(ci_file)
    docs = render(helm, ci_file)
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["podSelector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    port = 5671 if values["broker"]["url"].startswith("amqps://") else 5672
    broker_rule, dns_rule = policy["egress"]
    assert broker_rule["ports"] == [{"port": port, "protocol": "TCP"}]
    netpol_values = values.get("networkPolicy", {})
    if "brokerPeers" in netpol_values:
        assert broker_rule["to"] == netpol_values["brokerPeers"]
    if "dnsPeers" in netpol_values:
        assert dns_rule["to"] == netpol_values["dnsPeers"]
    assert {(p["port"], p["protocol"]) for p in dns_rule["ports"]} == {(53, "UDP"), (53, "TCP")}
    clients = netpol_values.get("metricsClients")
    if clients:
        (rule,) = policy["ingress"]
        assert rule["from"] == clients and rule["ports"] == [{"port": 9100, "protocol": "TCP"}]
    else:
        assert policy["ingress"] == []


BASE = ["-f", str(DEFAULT)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "organisation.id="], r"organisation\.id is empty"),
        (["--set", "organisation.id=curator"], r"organisation\.id: Must not validate the schema"),
        (
            ["--set", "organisation.id=org-z"],
            r'organisation\.id "org-z" is not in the roster \(members: org-a, org-b, org-c\)',
        ),
        (["--set", "federation.id=other"], r'roster of federation "demo" but federation\.id is "other"'),
        (["--set", "roster.fingerprint="], r"roster\.fingerprint is empty: set the roster fingerprint"),
        (["--set", "roster.fingerprint=abc"], r"roster\.fingerprint: Does not match pattern"),
        (["--set", "broker.auth.existingSecret="], r"broker\.auth\.existingSecret is empty"),
        (["--set", "broker.url=amqp://org-a:secret@broker/"], r"broker\.url: Does not match pattern"),
        (["--set", "broker.tls.existingSecret=ca"], r"broker\.tls\.\* is set but broker\.url is amqp://"),
        (["--set", "data.existingClaim="], r"no data volume: set data\.existingClaim"),
        (["--set", "data.hostPath=/srv/data"], r"data\.existingClaim and data\.hostPath are both set"),
        (
            ["--set", "data.existingClaim=", "--set", "data.hostPath=srv"],
            r"data\.hostPath: Does not match pattern",
        ),
        (["--set", "data.file="], r"data\.file is empty"),
        (["--set", "data.format=parquet"], r"data\.format must be one of the following"),
        (
            ["--set", "data.encoding.content=x", "--set", "data.encoding.existingConfigMap=e"],
            r"data\.encoding\.content and data\.encoding\.existingConfigMap are both set",
        ),
        (["--set", "model.name=import:acme.models:net"], r"acme\.models:net is not in allowedImports"),
        (["--set", "numClasses=3"], r"model\.kwargs\.num_classes is 2 but numClasses is 3"),
        (["--set-json", "privacy.delta=1"], r"privacy\.delta: Must be less than 1"),
        (["--set", "privacy.accountant=gdp"], r"privacy\.accountant must be one of the following"),
        (["--set", "privacy.epsilon=3"], r"Additional property epsilon is not allowed"),
        (["--set", "networkPolicy.brokerPeers=null"], r"networkPolicy\.brokerPeers is empty"),
    ],
)
def test_bad_values_fail_with_a_helpful_message(helm: Helm, args: list[str], message: str) -> None:
    with pytest.raises(helm.Error, match=message):
        helm.run("template", "t", str(CHART_DIR), *BASE, *args)


def test_validate_values_without_schema(helm: Helm) -> None:
    with pytest.raises(helm.Error, match=r'organisation\.id "curator" is reserved'):
        helm.run(
            "template", "t", str(CHART_DIR), "--skip-schema-validation", *BASE,
            "--set", "organisation.id=curator",
        )  # fmt: skip


def test_missing_required_values_fail(helm: Helm) -> None:
    with pytest.raises(helm.Error) as caught:
        helm.run("template", "t", str(CHART_DIR))
    for text in (
        "organisation.id is empty",
        "roster.fingerprint is empty",
        "no data volume",
        "data.file is empty",
    ):
        assert text in str(caught.value)


def test_every_value_is_documented() -> None:
    assert_every_value_documented(CHART)


def test_notes_name_the_next_steps(helm: Helm) -> None:
    notes = render_notes(helm, CHART, "-f", str(DEFAULT))
    assert 'organisation "org-a" in federation "demo"' in notes
    assert "port-forward service/tessera-tessera-participant-metrics 9100:9100" in notes
    assert "WARNING: broker.url is plain amqp://" in notes
    notes = render_notes(helm, CHART, "-f", str(COMPANIES[2]), "--set", "privacy.enabled=false")
    assert "WARNING: privacy.enabled is false" in notes
    assert "/srv/clinic-7/cardio: pin the pod to that node" in notes
    notes = render_notes(helm, CHART, "-f", str(COMPANIES[0]))
    assert "WARNING" not in notes and "epsilon 3, delta 1e-05, planned for 40 rounds" in notes
