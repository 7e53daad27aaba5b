"""Tests of charts/tessera-broker: lint, strict Kubernetes schema validation, and the broker contract.

The permission checks parse docs/topology.md (the contract with tessera.transport) and the provisioning
plan the chart renders, and compare them exactly, so a change on one side without the other fails here.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from chart_helpers import (
    CHARTS_DIR,
    K8S_VERSIONS,
    REPO_ROOT,
    assert_every_value_documented,
    by_kind,
    ci_files,
    one,
    validate_strict,
    values_of,
)

if TYPE_CHECKING:
    from .conftest import Helm

CHART = "tessera-broker"
CHART_DIR = CHARTS_DIR / CHART
CI_FILES = ci_files(CHART)
CI_IDS = [p.stem for p in CI_FILES]
TOPOLOGY_DOC = REPO_ROOT / "docs" / "topology.md"


# ---------------------------------------------------------------------------------------------- helpers
def ci_render(helm: Helm, ci_file: Path, *extra: str) -> list[dict[str, Any]]:
    return helm.render(CHART, "-f", str(ci_file), *extra)


def parse_plan(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Parse the rendered provisioning plan (tab-separated records, see files/provision.sh)."""
    text = one(docs, "ConfigMap", "-provisioning")["data"]["plan.tsv"]
    plan: dict[str, Any] = {"vhost": None, "users": [], "permissions": {}, "topic_permissions": {}}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        kind, *fields = line.split("\t")
        if kind == "vhost":
            assert plan["vhost"] is None, "two vhost records"
            (plan["vhost"],) = fields
        elif kind == "user":
            (user,) = fields
            plan["users"].append(user)
        elif kind == "permissions":
            user, configure, write, read = fields
            assert user not in plan["permissions"], f"two permission records for {user}"
            plan["permissions"][user] = (configure, write, read)
        elif kind == "topic_permissions":
            user, exchange, write, read = fields
            plan["topic_permissions"][(user, exchange)] = (write, read)
        else:
            raise AssertionError(f"unknown plan record {kind!r} in line {line!r}")
    return plan


def _md_cells(row: str) -> list[str]:
    # Split a Markdown table row on unescaped pipes; cells are `code`, with \| standing for |.
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]
    return [c.strip("`").replace("\\|", "|") for c in cells]


def _md_table(section: str) -> list[list[str]]:
    text = TOPOLOGY_DOC.read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    return [_md_cells(r) for r in rows[2:]]  # skip header and separator


def expected_grants(
    org_ids: list[str],
) -> tuple[dict[str, tuple[str, ...]], dict[tuple[str, str], tuple[str, ...]]]:
    """Permissions and topic permissions per user, read from docs/topology.md with X = each org id."""
    perms: dict[str, tuple[str, ...]] = {}
    for user, configure, write, read in _md_table("Permissions"):
        if user == "curator":
            perms["curator"] = (configure, write, read)
        else:
            assert user == "organisation X", f"unexpected row {user!r} in docs/topology.md Permissions"
            for org in org_ids:
                perms[org] = tuple(p.replace("X", org) for p in (configure, write, read))
    topics: dict[tuple[str, str], tuple[str, ...]] = {}
    for user, exchange, write, read in _md_table("Topic permissions"):
        if user == "curator":
            topics[("curator", exchange)] = (write, read)
        else:
            assert user == "organisation X", f"unexpected row {user!r} in docs/topology.md Topic permissions"
            for org in org_ids:
                topics[(org, exchange)] = (write.replace("X", org), read.replace("X", org))
    return perms, topics


def rabbit_regex_matches(pattern: str, name: str) -> bool:
    """RabbitMQ matches a permission regex with re:run (unanchored); '' means '^$'."""
    return re.search(pattern or "^$", name) is not None


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_lint_strict(helm: Helm, ci_file: Path) -> None:
    helm.run("lint", "--strict", str(CHART_DIR), "-f", str(ci_file))


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_manifests_pass_strict_kubernetes_schema(helm: Helm, ci_file: Path, k8s_version: str) -> None:
    docs = ci_render(helm, ci_file)
    assert {"StatefulSet", "Service", "ConfigMap", "Secret"} <= {d["kind"] for d in docs}
    validate_strict(docs, k8s_version)


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_provisioning_grants_exactly_the_topology(helm: Helm, ci_file: Path) -> None:
    values = values_of(ci_file)
    org_ids = [o["id"] for o in values["organisations"]]
    plan = parse_plan(ci_render(helm, ci_file))

    assert plan["vhost"] == f"tessera-{values['federation']['id']}"
    assert plan["users"] == ["curator", *org_ids]
    perms, topics = expected_grants(org_ids)
    assert plan["permissions"] == perms
    assert plan["topic_permissions"] == topics


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_organisations_are_confined(helm: Helm, ci_file: Path) -> None:
    plan = parse_plan(ci_render(helm, ci_file))
    orgs = [u for u in plan["users"] if u != "curator"]
    for org in orgs:
        configure, write, read = plan["permissions"][org]
        # amq.default is how RabbitMQ names the default exchange in permission checks; write there
        # would let the organisation publish into any queue (PITFALLS.md, "Cross-tenant publishing").
        for default_exchange in ("amq.default", ""):
            assert not rabbit_regex_matches(write, default_exchange), (
                f"{org} may write to the default exchange"
            )
        assert not rabbit_regex_matches(configure, "participant.x.inbox")
        assert rabbit_regex_matches(write, "tessera.to-curator")
        assert not rabbit_regex_matches(write, "tessera.to-participants")
        assert rabbit_regex_matches(read, f"participant.{org}.inbox")
        topic_write, _ = plan["topic_permissions"][(org, "tessera.to-curator")]
        assert rabbit_regex_matches(topic_write, f"from.{org}")
        assert rabbit_regex_matches(topic_write, f"from.{org}.shares")
        assert not rabbit_regex_matches(topic_write, f"from.{org}-evil")
        for other in orgs:
            if other != org:
                assert not rabbit_regex_matches(read, f"participant.{other}.inbox")
                assert not rabbit_regex_matches(topic_write, f"from.{other}")


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_passwords_only_in_secrets(helm: Helm, ci_file: Path) -> None:
    docs = ci_render(helm, ci_file)
    secrets = by_kind(docs, "Secret")
    generated = [base64.b64decode(s["data"]["password"]).decode() for s in secrets if "password" in s["data"]]
    assert generated, "expected at least one generated password"
    assert all(len(p) >= 16 for p in generated)
    cookie = [
        base64.b64decode(s["data"]["erlang-cookie"]).decode() for s in secrets if "erlang-cookie" in s["data"]
    ]
    for cm in by_kind(docs, "ConfigMap"):
        blob = "\n".join(cm.get("data", {}).values())
        for secret_value in generated + cookie:
            assert secret_value not in blob, f"a secret value leaked into ConfigMap {cm['metadata']['name']}"
        assert not re.search(r"(?im)^\s*(default_pass|password)\b", blob)

    # Each user's password reaches the provisioner from its own Secret, and only the provisioner mounts them.
    values = values_of(ci_file)
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    (users_vol,) = [v for v in pod["volumes"] if v["name"] == "users"]
    mounted = {s["secret"]["items"][0]["path"]: s["secret"] for s in users_vol["projected"]["sources"]}
    assert set(mounted) == {"curator", *(o["id"] for o in values["organisations"])}
    for org in values["organisations"]:
        if org.get("existingSecret"):
            assert mounted[org["id"]]["name"] == org["existingSecret"]
            assert mounted[org["id"]]["items"][0]["key"] == org.get("existingSecretKey", "password")
        else:
            assert mounted[org["id"]]["name"] == f"tessera-{CHART}-user-{org['id']}"
    containers = pod["containers"] + pod["initContainers"]
    users_mounts = [c["name"] for c in containers if any(m["name"] == "users" for m in c["volumeMounts"])]
    assert users_mounts == ["provisioner"]


@pytest.mark.parametrize("ci_file", CI_FILES, ids=CI_IDS)
def test_pod_hardening_and_persistence(helm: Helm, ci_file: Path) -> None:
    sts = one(ci_render(helm, ci_file), "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 999
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
    rabbit = next(c for c in pod["containers"] if c["name"] == "rabbitmq")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert rabbit[probe]["exec"]["command"][0] == "rabbitmq-diagnostics"
    mounts = {m["mountPath"]: m["name"] for m in rabbit["volumeMounts"]}
    assert mounts["/var/lib/rabbitmq/mnesia"] == "data"
    assert "/etc/rabbitmq" in mounts
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"


def test_multi_company_serves_amqps_only(helm: Helm) -> None:
    ci_file = CHART_DIR / "ci" / "multi-company-values.yaml"
    values = values_of(ci_file)
    docs = ci_render(helm, ci_file)
    conf = one(docs, "ConfigMap", "-config")["data"]["rabbitmq.conf"]
    conf_lines = {line.strip() for line in conf.splitlines()}
    assert "listeners.tcp = none" in conf_lines
    assert "listeners.ssl.default = 5671" in conf_lines
    assert "ssl_options.certfile = /etc/rabbitmq-tls/tls.crt" in conf_lines

    svc = next(s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["metadata"]["annotations"] == values["service"]["annotations"]
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("amqps", 5671)]

    netpol = one(docs, "NetworkPolicy")
    assert netpol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = netpol["spec"]["ingress"]
    assert rule["ports"] == [{"port": 5671, "protocol": "TCP"}]
    assert rule["from"] == values["networkPolicy"]["allowedClients"]
    assert netpol["spec"]["egress"] == []


def test_default_serves_plain_amqp_without_tls(helm: Helm) -> None:
    docs = ci_render(helm, CHART_DIR / "ci" / "default-values.yaml")
    svc = next(s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
    assert [(p["name"], p["port"]) for p in svc["spec"]["ports"]] == [("amqp", 5672)]
    assert "listeners.ssl" not in one(docs, "ConfigMap", "-config")["data"]["rabbitmq.conf"]


BASE = ["--set", "federation.id=fed", "--set", "organisations[0].id=org-a"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "organisations[1].id=curator"], r"organisations\.1\.id: Must not validate the schema"),
        (["--set", "organisations[1].id=Acme"], r"organisations\.1\.id: Does not match pattern"),
        (["--set", "organisations[1].idd=x"], r"Additional property idd is not allowed"),
        (["--set", "tlss.enabled=true"], r"Additional property tlss is not allowed"),
        (["--set", "federation.id=Fed_1"], r"federation\.id: Does not match pattern"),
        (["--set", "organisations[1].id=org-a"], r'organisations\[1\]\.id "org-a" is listed twice'),
        (["--set", "tls.enabled=true"], r"tls\.existingSecret is empty: create a Secret"),
    ],
    ids=[
        "curator",
        "uppercase",
        "unknown-org-key",
        "unknown-top-key",
        "bad-federation",
        "duplicate",
        "tls-no-secret",
    ],
)
def test_bad_values_fail_with_a_helpful_message(helm: Helm, args: list[str], message: str) -> None:
    with pytest.raises(helm.Error, match=message):
        helm.run("template", "t", str(CHART_DIR), *BASE, *args)


@pytest.mark.parametrize(
    ("org_id", "message"),
    [
        ("curator", r'"curator" is reserved'),
        ("guest", r'"guest" is reserved'),
        ("all", r'"all" is reserved'),
        ("selected", r'"selected" is reserved'),
        ("Acme", r'"Acme" is invalid'),
    ],
)
def test_validate_values_without_schema(helm: Helm, org_id: str, message: str) -> None:
    # validateValues must hold on its own: `--skip-schema-validation` bypasses values.schema.json.
    with pytest.raises(helm.Error, match=message):
        helm.run(
            "template",
            "t",
            str(CHART_DIR),
            "--skip-schema-validation",
            *BASE,
            "--set",
            f"organisations[1].id={org_id}",
        )


def test_missing_required_values_fail(helm: Helm) -> None:
    with pytest.raises(helm.Error, match=r"organisations: Array must have at least 1 items"):
        helm.run("template", "t", str(CHART_DIR))


def test_every_value_is_documented() -> None:
    assert_every_value_documented(CHART)


# ---------------------------------------------------------------------------------------------- clustering
CLUSTER_CI = CHART_DIR / "ci" / "cluster-values.yaml"


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_one_replica_is_a_single_node_without_discovery_or_rbac(helm: Helm) -> None:
    docs = ci_render(helm, CHART_DIR / "ci" / "default-values.yaml")
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["podManagementPolicy"] == "OrderedReady"
    pod = sts["spec"]["template"]["spec"]
    for container in pod["containers"]:  # the node and the provisioner's rabbitmqctl agree on the name
        assert env_of(container)["RABBITMQ_NODENAME"] == "rabbit@localhost", container["name"]
        assert "RABBITMQ_USE_LONGNAME" not in env_of(container)
    config = one(docs, "ConfigMap", "-config")["data"]
    assert "cluster_formation" not in config["rabbitmq.conf"] and config["enabled_plugins"].strip() == "[]."
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    assert "affinity" not in pod
    netpol = one(docs, "NetworkPolicy")
    assert [p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]] == [5672]


def test_three_replicas_form_a_cluster_by_kubernetes_peer_discovery(helm: Helm) -> None:
    docs = ci_render(helm, CLUSTER_CI)
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = sts["spec"]["serviceName"]
    pod = sts["spec"]["template"]["spec"]
    namespace = sts["metadata"]["namespace"]
    node_name = f"rabbit@$(MY_POD_NAME).{headless}.{namespace}.svc.cluster.local"
    for container in pod["containers"]:
        env = env_of(container)
        assert env["RABBITMQ_NODENAME"] == node_name and env["RABBITMQ_USE_LONGNAME"] == "true", container[
            "name"
        ]
        assert env["MY_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    conf = {line.strip() for line in one(docs, "ConfigMap", "-config")["data"]["rabbitmq.conf"].splitlines()}
    assert "cluster_formation.peer_discovery_backend = rabbit_peer_discovery_k8s" in conf
    assert "cluster_partition_handling = pause_minority" in conf
    assert not any(line.startswith("cluster_formation.k8s.") for line in conf)  # 4.1: no API needed
    assert (
        one(docs, "ConfigMap", "-config")["data"]["enabled_plugins"].strip()
        == "[rabbitmq_peer_discovery_k8s]."
    )
    # RBAC is off unless asked for: no Role, no token.
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    assert pod["automountServiceAccountToken"] is False
    # The nodes spread over machines and reach each other's Erlang ports, nobody else does.
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    service = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == headless)
    assert {p["port"] for p in service["spec"]["ports"]} == {5672, 4369, 25672}
    assert service["spec"]["publishNotReadyAddresses"] is True
    netpol = one(docs, "NetworkPolicy")
    clients, peers = netpol["spec"]["ingress"]
    assert [p["port"] for p in clients["ports"]] == [5672]
    assert peers["from"] == [{"podSelector": {"matchLabels": sts["spec"]["selector"]["matchLabels"]}}]
    assert sorted(p["port"] for p in peers["ports"]) == [4369, 25672]
    egress_ports = sorted(p["port"] for rule in netpol["spec"]["egress"] for p in rule["ports"])
    assert egress_ports == [53, 53, 4369, 25672]


def test_cluster_rbac_allows_only_getting_the_headless_endpoints(helm: Helm) -> None:
    docs = ci_render(helm, CLUSTER_CI, "--set", "clustering.rbac.create=true")
    sts = one(docs, "StatefulSet")
    headless = sts["spec"]["serviceName"]
    (role,) = by_kind(docs, "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["endpoints"], "resourceNames": [headless], "verbs": ["get"]}
    ]
    (binding,) = by_kind(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = sts["spec"]["template"]["spec"]["serviceAccountName"]
    namespace = sts["metadata"]["namespace"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
    assert sts["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    conf = one(docs, "ConfigMap", "-config")["data"]["rabbitmq.conf"]
    assert f"cluster_formation.k8s.service_name = {headless}" in conf
    assert "cluster_formation.k8s.address_type = hostname" in conf
    egress_ports = {p["port"] for rule in one(docs, "NetworkPolicy")["spec"]["egress"] for p in rule["ports"]}
    assert {443, 6443} <= egress_ports
    validate_strict(docs, K8S_VERSIONS[-1])
    # With one replica the switch changes nothing: there is nothing to discover.
    single = helm.render(CHART, *BASE, "--set", "clustering.rbac.create=true")
    assert not by_kind(single, "Role")
    assert one(single, "StatefulSet")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("replicas", ["2", "4", "9", "0"])
def test_even_or_oversized_replica_counts_are_refused(helm: Helm, replicas: str) -> None:
    with pytest.raises(helm.Error, match="replicas"):
        helm.run("template", "t", str(CHART_DIR), *BASE, "--set", f"replicas={replicas}")
    with pytest.raises(helm.Error, match=f"replicas {replicas} is not supported"):
        helm.run(
            "template",
            "t",
            str(CHART_DIR),
            "--skip-schema-validation",
            *BASE,
            "--set",
            f"replicas={replicas}",
        )
