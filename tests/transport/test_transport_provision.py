"""Provisioning against the real broker: exactly the state docs/topology.md describes, idempotently."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from urllib.parse import urlsplit

import pytest
from tessera.errors import ConfigurationError
from tessera.transport import deprovision, generate_password, provision
from tessera.transport import topology as topo
from tessera.transport.provision import ManagementApiBackend, federation_grants

pytestmark = pytest.mark.integration


def definitions() -> dict:
    """The broker's whole state in one rabbitmqctl call (each call costs about a second)."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "export_definitions", "-", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def authenticates(user: str, password: str) -> bool:
    # "--": a password may start with a dash, which rabbitmqctl would read as an option.
    done = subprocess.run(
        ["rabbitmqctl", "-q", "authenticate_user", "--", user, password], capture_output=True
    )
    return done.returncode == 0


def test_provisioned_state_matches_the_contract_and_reprovisioning_converges(fed):
    def state(defs: dict) -> tuple[dict, list, dict]:
        permissions = {
            p["user"]: (p["configure"], p["write"], p["read"])
            for p in defs["permissions"]
            if p["vhost"] == fed.vhost
        }
        topic = sorted(
            (p["user"], p["exchange"], p["write"], p["read"])
            for p in defs["topic_permissions"]
            if p["vhost"] == fed.vhost
        )
        tags = {u["name"]: u["tags"] for u in defs["users"]}
        return permissions, topic, tags

    expected = {fed.curator_user: topo.curator_permissions()}
    expected |= {o: topo.organisation_permissions(o) for o in fed.organisations}
    wanted_permissions = {u: (p.configure, p.write, p.read) for u, p in expected.items()}
    wanted_topic = [(fed.curator_user, t.exchange, t.write, t.read) for t in topo.curator_topic_permissions()]
    wanted_topic += [
        (o, t.exchange, t.write, t.read)
        for o in fed.organisations
        for t in topo.organisation_topic_permissions(o)
    ]
    permissions, topic, tags = state(definitions())
    assert permissions == wanted_permissions
    assert topic == sorted(wanted_topic)
    assert all(tags[u] in ("", []) for u in expected)  # nobody provisioned is an administrator

    # Drift (a stray topic permission, an administrator tag) and a password rotation: provisioning again
    # converges to the contract.
    fed.rabbitmqctl("set_topic_permissions", "-p", fed.vhost, fed.a, "tessera.dead-letter", ".*", ".*")
    fed.rabbitmqctl("set_user_tags", fed.a, "administrator")
    fed.passwords[fed.a] = generate_password()
    provision(
        fed.federation,
        curator_password=fed.passwords[fed.curator_user],
        organisation_passwords={o: fed.passwords[o] for o in fed.organisations},
        curator_user=fed.curator_user,
    )
    permissions, topic, tags = state(definitions())
    assert permissions == wanted_permissions and topic == sorted(wanted_topic) and tags[fed.a] in ("", [])
    assert authenticates(fed.a, fed.passwords[fed.a])


def test_deprovision_removes_vhost_and_users_but_keeps_shared_ones(fed):
    # A second federation sharing organisation A's broker user (users are broker-global).
    other, other_curator = f"{fed.federation}-2", f"{fed.curator_user}-2"
    provision(
        other,
        curator_password=generate_password(),
        organisation_passwords={fed.a: fed.passwords[fed.a]},
        curator_user=other_curator,
    )
    deprovision(fed.federation, organisations=fed.organisations, curator_user=fed.curator_user)
    defs = definitions()
    vhosts, users = {v["name"] for v in defs["vhosts"]}, {u["name"] for u in defs["users"]}
    assert fed.vhost not in vhosts and topo.vhost(other) in vhosts
    assert fed.a in users and fed.b not in users and fed.curator_user not in users
    deprovision(other, organisations=[fed.a], curator_user=other_curator)
    # (the fixture's teardown deprovisions the first federation again: that is the idempotency check)


def test_grants_validate_their_input():
    with pytest.raises(ConfigurationError):
        federation_grants("pw", {"curator": "pw"})
    with pytest.raises(ConfigurationError):
        federation_grants("pw", {"all": "pw"})
    with pytest.raises(ConfigurationError):
        federation_grants("pw", {"a": ""})
    with pytest.raises(ConfigurationError):
        federation_grants("pw", {"a": "pw"}, curator_user="a")
    assert "pw-secret" not in repr(federation_grants("pw-secret", {"a": "pw-secret"}))


@pytest.mark.skipif(
    not os.environ.get("TESSERA_TEST_MANAGEMENT_URL"),
    reason="set TESSERA_TEST_MANAGEMENT_URL=http://admin:password@host:15672 to test the management API backend",
)
def test_management_api_backend_provisions_the_same_state(broker):
    parts = urlsplit(os.environ["TESSERA_TEST_MANAGEMENT_URL"])
    api = ManagementApiBackend(
        f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}", parts.username or "", parts.password or ""
    )
    assert api.available()
    tag = uuid.uuid4().hex[:8]
    federation, orgs, curator = f"m-{tag}", [f"a-{tag}"], f"cur-{tag}"
    provision(
        federation,
        curator_password=generate_password(),
        organisation_passwords={orgs[0]: generate_password()},
        curator_user=curator,
        backend=api,
    )
    try:
        defs = definitions()
        topic = {
            (p["user"], p["exchange"], p["write"])
            for p in defs["topic_permissions"]
            if p["vhost"] == topo.vhost(federation)
        }
        [org_topic] = topo.organisation_topic_permissions(orgs[0])
        assert (orgs[0], org_topic.exchange, org_topic.write) in topic
    finally:
        deprovision(federation, organisations=orgs, curator_user=curator, backend=api)


def test_local_broker_problem_says_what_is_missing(broker, monkeypatch):
    from tessera.transport import local_broker_problem

    url = os.environ.get("TESSERA_TEST_AMQP_URL", "amqp://127.0.0.1:5672/")
    assert local_broker_problem(url, check_admin=True) is None
    assert "no RabbitMQ broker answers at 127.0.0.1:1 " in (local_broker_problem("amqp://127.0.0.1:1/") or "")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "rabbitmqctl" in (local_broker_problem(url) or "")
