"""Tests of charts/tessera-curator: lint, strict Kubernetes schemas, hardening, wiring, bad values.

Whether the rendered TESSERA_* variables are what the curator's settings accept is in
test_chart_settings.py; running the rendered container against a broker is e2e/local.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
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

CHART = "tessera-curator"
CHART_DIR = CHARTS_DIR / CHART
CI_FILES = ci_files(CHART)
CI_IDS = [p.stem for p in CI_FILES]
DEFAULT = CHART_DIR / "ci" / "default-values.yaml"
REALISTIC = CHART_DIR / "ci" / "cardio-values.yaml"


def render(helm: Helm, ci_file: Path, *extra: str) -> list[dict[str, Any]]:
    return helm.render(CHART, "-f", str(ci_file), *extra)


def test_ci_files_exist() -> None:
    assert DEFAULT in CI_FILES and REALISTIC in CI_FILES


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
def test_one_curator_hardened(helm: Helm, ci_file: Path) -> None:
    docs = render(helm, ci_file)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = pod_spec(docs)
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["fsGroup"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "initContainers" not in pod
    container = main_container(docs)
    assert container["command"] == ["tessera"] and container["args"] == ["curator"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # The only writable paths: the state volume and /tmp.
    writable = {path for path, m in mounts(container).items() if not m.get("readOnly")}
    assert writable == {"/var/lib/tessera", "/tmp"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts(container)["/tmp"]["name"]]
    claim = volumes[mounts(container)["/var/lib/tessera"]["name"]]["persistentVolumeClaim"]["claimName"]
    values = values_of(ci_file)
    existing = values.get("persistence", {}).get("existingClaim")
    if existing:
        assert claim == existing
    else:
        pvc = one(docs, "PersistentVolumeClaim")
        assert pvc["metadata"]["name"] == claim
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not by_kind(docs, "Secret"), "the curator chart must never render credentials"


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_probes_and_metrics_use_the_health_port(helm: Helm, ci_file: Path) -> None:
    docs = render(helm, ci_file)
    container = main_container(docs)
    env = container_env(container)
    port = int(env["TESSERA_HEALTH__PORT"])
    assert env["TESSERA_HEALTH__ENABLED"] == "true"
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service = one(docs, "Service", "-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
    ]
    values = values_of(ci_file)
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    if values.get("metrics", {}).get("podAnnotations"):
        assert annotations["prometheus.io/port"] == str(port)
    else:
        assert "prometheus.io/scrape" not in annotations
    monitors = by_kind(docs, "ServiceMonitor")
    assert len(monitors) == int(bool(values.get("metrics", {}).get("serviceMonitor", {}).get("enabled")))


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_files_come_from_the_right_objects(helm: Helm, ci_file: Path) -> None:
    values = values_of(ci_file)
    docs = render(helm, ci_file)
    pod, container = pod_spec(docs), main_container(docs)
    env = container_env(container)

    roster_volume, roster_key = volume_for_path(pod, container, env["TESSERA_ROSTER_FILE"])
    (item,) = roster_volume["configMap"]["items"]
    assert item["path"] == roster_key
    if values["roster"].get("content"):
        cm = one(docs, "ConfigMap", "-roster")
        assert roster_volume["configMap"]["name"] == cm["metadata"]["name"]
        assert json.loads(cm["data"][item["key"]]) == json.loads(values["roster"]["content"])
    else:
        assert roster_volume["configMap"]["name"] == values["roster"]["existingConfigMap"]
        assert item["key"] == values["roster"].get("existingConfigMapKey", "roster.json")

    password_volume, key = volume_for_path(pod, container, env["TESSERA_BROKER__PASSWORD_FILE"])
    secret = password_volume["secret"]
    assert secret["secretName"] == values["broker"]["auth"]["existingSecret"]
    assert secret["items"] == [
        {"key": values["broker"]["auth"].get("existingSecretKey", "password"), "path": key}
    ]
    assert secret["defaultMode"] == 0o400
    assert "TESSERA_BROKER__PASSWORD" not in env, "the password never goes into the environment"
    assert "@" not in env["TESSERA_BROKER__URL"]

    ca_secret = values["broker"].get("tls", {}).get("existingSecret")
    if ca_secret:
        ca_volume, ca_key = volume_for_path(pod, container, env["TESSERA_BROKER__TLS__CA_FILE"])
        assert ca_volume["secret"]["secretName"] == ca_secret
        assert ca_volume["secret"]["items"][0]["path"] == ca_key
    else:
        assert "TESSERA_BROKER__TLS__CA_FILE" not in env

    if values.get("validation", {}).get("enabled"):
        volume, rel = volume_for_path(pod, container, env["TESSERA_VALIDATION__PATH"])
        assert volume["persistentVolumeClaim"] == {
            "claimName": values["validation"]["existingClaim"],
            "readOnly": True,
        }
        assert rel == values["validation"]["file"]
        assert mounts(container)["/data/validation"]["readOnly"] is True


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_network_policy_is_default_deny_with_broker_and_dns_egress(helm: Helm, ci_file: Path) -> None:
    values = values_of(ci_file)
    docs = render(helm, ci_file)
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["podSelector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    port = 5671 if values["broker"]["url"].startswith("amqps://") else 5672
    broker_rule, dns_rule, *extra = policy["egress"]
    assert broker_rule["ports"] == [{"port": port, "protocol": "TCP"}]
    assert broker_rule["to"] == values.get("networkPolicy", {}).get("brokerPeers", broker_rule["to"])
    assert {(p["port"], p["protocol"]) for p in dns_rule["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert extra == []
    clients = values.get("networkPolicy", {}).get("metricsClients")
    if clients:
        (rule,) = policy["ingress"]
        assert rule["from"] == clients
        assert rule["ports"] == [{"port": 9100, "protocol": "TCP"}]
    else:
        assert policy["ingress"] == []


def test_broker_port_follows_the_url_or_the_override(helm: Helm) -> None:
    def ports(*args: str) -> list[int]:
        policy = one(render(helm, DEFAULT, *args), "NetworkPolicy")["spec"]
        return [p["port"] for p in policy["egress"][0]["ports"]]

    assert ports("--set", "broker.url=amqp://10.0.0.5/") == [5672]
    assert ports("--set", "broker.url=amqps://broker.example.org/") == [5671]
    assert ports("--set", "broker.url=amqps://broker.example.org:443/tessera-demo") == [443]
    assert ports("--set", "networkPolicy.brokerPorts={5671,5672}") == [5671, 5672]
    assert not by_kind(render(helm, DEFAULT, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_probe_values_pass_through(helm: Helm) -> None:
    docs = render(
        helm, DEFAULT, "--set", "livenessProbe.tcpSocket.port=metrics", "--set", "startupProbe=null"
    )
    container = main_container(docs)
    assert container["livenessProbe"]["tcpSocket"] == {"port": "metrics"}
    assert "httpGet" not in container["livenessProbe"]
    assert "startupProbe" not in container


def test_unset_optional_settings_are_not_rendered(helm: Helm) -> None:
    env = container_env(main_container(render(helm, DEFAULT)))
    for name in (
        "TESSERA_ROUNDS__TARGET_ACCURACY",
        "TESSERA_ROUNDS__MIN_PARTICIPANTS",
        "TESSERA_SERVER__DECISION_THRESHOLD",
        "TESSERA_VALIDATION__PATH",
        "TESSERA_BROKER__TLS__SERVER_NAME",
    ):
        assert name not in env
    env = container_env(main_container(render(helm, REALISTIC)))
    assert env["TESSERA_ROUNDS__TARGET_ACCURACY"] == "0.93"
    assert env["TESSERA_ROUNDS__MAX_OFFENCES"] == "2"
    assert env["TESSERA_SERVER__DECISION_THRESHOLD"] == "0.3"
    assert env["TESSERA_ROSTER_FINGERPRINT"].replace(" ", "").startswith("d18ebe1f")
    # What participants check comes from the roster, never from the curator's values.
    assert not [name for name in env if name.startswith("TESSERA_SECAGG__") and not name.endswith("TIMEOUT")]
    assert env["TESSERA_BROKER__CHUNK_SIZE"] == "16777216", "large integers must not render as 1.6777216e+07"
    assert json.loads(env["TESSERA_MODEL__KWARGS"]) == {"input_dim": 30, "hidden": [64, 32], "num_classes": 2}


BASE = ["-f", str(DEFAULT)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "federation.id="], r"federation\.id is empty"),
        (["--set", "federation.id=Fed_1"], r"federation\.id: Does not match pattern"),
        (["--set", "federation.id=other"], r'roster of federation "demo" but federation\.id is "other"'),
        (
            ["--set", "broker.auth.username=cur-2"],
            r'curator_user is "curator" but broker\.auth\.username is "cur-2"',
        ),
        (
            ["--set", "roster.existingConfigMap=r"],
            r"roster\.content and roster\.existingConfigMap are both set",
        ),
        (["--set", "roster.content=not json"], r"roster\.content is not a roster"),
        (["--set", "rounds.minParticipants=4"], r"lists only 3 organisations"),
        (["--set", "broker.url="], r"broker\.url is empty"),
        (["--set", "broker.url=amqp://u:p@host:5672/"], r"broker\.url: Does not match pattern"),
        (["--set", "broker.tls.existingSecret=ca"], r"broker\.tls\.\* is set but broker\.url is amqp://"),
        (["--set", "broker.auth.existingSecret="], r"broker\.auth\.existingSecret is empty"),
        (["--set", "numClasses=3"], r"model\.kwargs\.num_classes is 2 but numClasses is 3"),
        (["--set", "numClasses=null"], r"numClasses is not set"),
        (["--set", "model.name=resnet"], r"model\.name: Does not match pattern"),
        (["--set", "validation.enabled=true"], r"validation\.enabled is true but validation\.existingClaim"),
        (["--set", "networkPolicy.brokerPeers=null"], r"networkPolicy\.brokerPeers is empty"),
        (
            ["--set", "metrics.service.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"],
            r"needs metrics\.service\.enabled",
        ),
        (["--set", "rounds.maxRound=3"], r"Additional property maxRound is not allowed"),
        (["--set", "secagg.ringBits=64"], r"secagg: Additional property ringBits is not allowed"),
        (
            ["--set-json", "rounds.targetAccuracy=1.5"],
            r"rounds\.targetAccuracy: Must be less than or equal to 1",
        ),
        # helm --set reads fractions as strings: the schema says so (README: use --set-json or a file).
        (
            ["--set", "rounds.targetAccuracy=0.9"],
            r"rounds\.targetAccuracy: Invalid type\. Expected: \[number,null\], given: string",
        ),
        (["--set-json", "server.momentum=1"], r"server\.momentum: Must be less than 1"),
        (["--set", "roster.fingerprint=abc"], r"roster\.fingerprint: Does not match pattern"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_values_fail_with_a_helpful_message(helm: Helm, args: list[str], message: str) -> None:
    with pytest.raises(helm.Error, match=message):
        helm.run("template", "t", str(CHART_DIR), *BASE, *args)


def test_validate_values_without_schema(helm: Helm) -> None:
    # validateValues must hold on its own: `--skip-schema-validation` bypasses values.schema.json.
    with pytest.raises(helm.Error, match=r"broker\.url .* is invalid: use amqp://host:port/"):
        helm.run(
            "template", "t", str(CHART_DIR), "--skip-schema-validation", *BASE,
            "--set", "broker.url=amqp://u:p@h/",
        )  # fmt: skip


def test_missing_required_values_fail(helm: Helm) -> None:
    with pytest.raises(helm.Error) as caught:
        helm.run("template", "t", str(CHART_DIR))
    for text in ("federation.id is empty", "no roster", "broker.url is empty", "numClasses is not set"):
        assert text in str(caught.value)


def test_every_value_is_documented() -> None:
    assert_every_value_documented(CHART)


def test_notes_name_the_next_steps(helm: Helm) -> None:
    notes = render_notes(helm, CHART, "-f", str(DEFAULT))
    assert "kubectl -n tessera rollout status deployment/tessera-tessera-curator" in notes
    assert "port-forward service/tessera-tessera-curator-metrics 9100:9100" in notes
    assert "/var/lib/tessera/curator/report.json" in notes
    assert "WARNING: broker.url is plain amqp://" in notes
    notes = render_notes(helm, CHART, "-f", str(REALISTIC))
    assert "WARNING" not in notes
    assert "Training stops at accuracy 0.93, after 40 rounds" in notes
