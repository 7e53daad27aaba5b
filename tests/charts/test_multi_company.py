"""One federation across companies, rendered together: the coordinator's broker and curator releases
(tessera-broker ci/multi-company-values.yaml, tessera-curator ci/cardio-values.yaml) and three
companies' participant releases (tessera-participant ci/{hospital-a,hospital-b,clinic-7}-values.yaml),
each in its own namespace as it would be installed. Checks that what each release renders fits the others.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
from chart_helpers import (
    CHARTS_DIR,
    K8S_VERSIONS,
    container_env,
    load_settings,
    main_container,
    one,
    validate_strict,
    values_of,
)

if TYPE_CHECKING:
    from conftest import Helm

BROKER = CHARTS_DIR / "tessera-broker" / "ci" / "multi-company-values.yaml"
CURATOR = CHARTS_DIR / "tessera-curator" / "ci" / "cardio-values.yaml"
COMPANIES = {
    c: CHARTS_DIR / "tessera-participant" / "ci" / f"{c}-values.yaml"
    for c in ("hospital-a", "hospital-b", "clinic-7")
}


def releases(helm: Helm) -> dict[str, list[dict[str, Any]]]:
    """Every release's manifests, keyed by release name (one namespace per company)."""
    out = {
        "broker": helm.render("tessera-broker", "-f", str(BROKER)),
        "curator": helm.render("tessera-curator", "-f", str(CURATOR)),
    }
    for company, values in COMPANIES.items():
        out[company] = helm.render("tessera-participant", "-f", str(values), "--namespace", company)
    return out


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_every_release_passes_strict_kubernetes_schema(helm: Helm, k8s_version: str) -> None:
    for docs in releases(helm).values():
        validate_strict(docs, k8s_version)


def test_companies_are_separate_releases(helm: Helm) -> None:
    rendered = releases(helm)
    for company in COMPANIES:
        docs = rendered[company]
        assert {d["metadata"]["namespace"] for d in docs} == {company}
        labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert labels["tessera.io/organisation"] == company


def test_releases_agree_on_the_federation(helm: Helm) -> None:
    rendered = releases(helm)
    broker_values = values_of(BROKER)
    federation = broker_values["federation"]["id"]
    broker_orgs = [o["id"] for o in broker_values["organisations"]]
    plan = one(rendered["broker"], "ConfigMap", "-provisioning")["data"]["plan.tsv"]
    plan_users = [line.split("\t")[1] for line in plan.splitlines() if line.startswith("user\t")]

    curator_env = container_env(main_container(rendered["curator"]))
    curator = load_settings("curator", curator_env)
    assert curator_env["TESSERA_FEDERATION"] == federation
    curator_user = broker_values.get("auth", {}).get("curator", {}).get("username", "curator")
    assert curator_env["TESSERA_BROKER__USERNAME"] == plan_users[0] == curator_user

    # The address the companies are given is the one the broker serves: its public name, AMQPS only.
    public = broker_values["service"]["publicHostname"]
    broker_service = next(
        s for s in rendered["broker"] if s["kind"] == "Service" and s["spec"].get("clusterIP") != "None"
    )
    served = {(p["name"], p["port"]) for p in broker_service["spec"]["ports"]}
    expected_url = f"amqps://{public}:5671/"
    assert served == {("amqps", 5671)}
    assert curator_env["TESSERA_BROKER__URL"] == expected_url

    model = (curator_env["TESSERA_MODEL__NAME"], json.loads(curator_env["TESSERA_MODEL__KWARGS"]))
    rosters = set()
    for company in COMPANIES:
        env = container_env(main_container(rendered[company]))
        participant = load_settings("participant", env)
        assert company in broker_orgs and company in plan_users, f"{company} has no broker user"
        assert env["TESSERA_FEDERATION"] == federation
        assert env["TESSERA_BROKER__USERNAME"] == company
        assert env["TESSERA_BROKER__URL"] == expected_url
        assert "TESSERA_BROKER__TLS__CA_FILE" in env, "companies verify the broker's certificate"
        # Everybody trains the same model for the same task.
        assert (env["TESSERA_MODEL__NAME"], json.loads(env["TESSERA_MODEL__KWARGS"])) == model
        assert env["TESSERA_NUM_CLASSES"] == curator_env["TESSERA_NUM_CLASSES"]
        assert participant.model.canonical_json() == curator.model.canonical_json()  # type: ignore[attr-defined]
        roster = json.loads(one(rendered[company], "ConfigMap", "-roster")["data"]["roster.json"])
        rosters.add(json.dumps(roster, sort_keys=True))
        assert roster["curator_user"] == curator_env["TESSERA_BROKER__USERNAME"]
        assert {m["organisation"] for m in roster["members"]} <= set(broker_orgs)
        # Each company keeps its own budget and its own accountant volume.
        assert float(env["TESSERA_PRIVACY__TARGET_EPSILON"]) > 0
        egress = one(rendered[company], "NetworkPolicy")["spec"]["egress"]
        assert egress[0]["ports"] == [{"port": 5671, "protocol": "TCP"}]
    assert len(rosters) == 1, "every company must hold the same roster"
    budgets = {
        c: container_env(main_container(rendered[c]))["TESSERA_PRIVACY__TARGET_EPSILON"] for c in COMPANIES
    }
    assert len(set(budgets.values())) > 1, "the ci companies exercise different privacy budgets"
