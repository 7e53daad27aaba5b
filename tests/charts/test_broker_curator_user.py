"""tessera-broker's `auth.curator.username`: the curator's broker user is the roster's `curator_user`.

Broker users are global across vhosts, so federations (or test runs) sharing one broker need distinct
curator users; the grants stay those of docs/topology.md's `curator` row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from chart_helpers import CHARTS_DIR, one

if TYPE_CHECKING:
    from conftest import Helm

CHART_DIR = CHARTS_DIR / "tessera-broker"
BASE = ["--set", "federation.id=fed", "--set", "organisations[0].id=org-a"]


def plan_records(helm: Helm, *args: str) -> list[list[str]]:
    docs = helm.render("tessera-broker", *BASE, *args)
    text = one(docs, "ConfigMap", "-provisioning")["data"]["plan.tsv"]
    return [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]


def test_default_curator_user_is_curator(helm: Helm) -> None:
    users = [r[1] for r in plan_records(helm) if r[0] == "user"]
    assert users == ["curator", "org-a"]


def test_named_curator_user_gets_the_curator_grants(helm: Helm) -> None:
    default = plan_records(helm)
    named = plan_records(helm, "--set", "auth.curator.username=cardio-curator")
    renamed = [
        [f.replace("cardio-curator", "curator") if i == 1 else f for i, f in enumerate(r)] for r in named
    ]
    assert renamed == default
    docs = helm.render("tessera-broker", *BASE, "--set", "auth.curator.username=cardio-curator")
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    (users,) = [v for v in pod["volumes"] if v["name"] == "users"]
    paths = {s["secret"]["items"][0]["path"]: s["secret"]["name"] for s in users["projected"]["sources"]}
    # The provisioner reads the password file named after the user; the Secret keeps its role name.
    assert paths["cardio-curator"] == "tessera-tessera-broker-user-curator"
    secret = one(docs, "Secret", "-user-curator")
    assert secret["data"]["username"] == "Y2FyZGlvLWN1cmF0b3I="  # base64("cardio-curator")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "auth.curator.username=guest"], r"auth\.curator\.username: Must not validate the schema"),
        (["--set", "auth.curator.username=Cur"], r"auth\.curator\.username: Does not match pattern"),
        (
            ["--set", "auth.curator.username=org-a"],
            r'organisations\[0\]\.id "org-a" equals auth\.curator\.username',
        ),
    ],
)
def test_bad_curator_user_fails(helm: Helm, args: list[str], message: str) -> None:
    with pytest.raises(helm.Error, match=message):
        helm.run("template", "t", str(CHART_DIR), *BASE, *args)


def test_bad_curator_user_fails_without_schema(helm: Helm) -> None:
    with pytest.raises(helm.Error, match=r'auth\.curator\.username "all" is reserved'):
        helm.run(
            "template", "t", str(CHART_DIR), "--skip-schema-validation", *BASE,
            "--set", "auth.curator.username=all",
        )  # fmt: skip
