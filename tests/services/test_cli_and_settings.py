"""The command line, the roster and settings validation: bad input gets a clear message, nothing changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tessera.crypto import SigningKey, key_fingerprint
from tessera.curator.settings import load_curator_settings
from tessera.errors import ConfigurationError
from tessera.participant.settings import load_participant_settings
from tessera.roster import RosterFile, create_demo_federation, load_identity_key, write_identity_key


def _tessera(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    return subprocess.run(
        [sys.executable, "-m", "tessera.apps.cli", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
    )


DEMO = ("roster", "init-demo", "--all-keys-in-one-place")


def test_roster_init_demo_and_show(tmp_path: Path) -> None:
    refused = _tessera(
        "roster", "init-demo", "--federation", "acme", "--organisations", "a-co,b-co", "--out", str(tmp_path)
    )
    assert refused.returncode == 2 and "demos and tests only" in refused.stderr
    assert not (tmp_path / "roster.json").exists() and not (tmp_path / "keys").exists()
    out = _tessera(*DEMO, "--federation", "acme", "--organisations", "a-co,b-co,c-co", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    roster = RosterFile.load(tmp_path / "roster.json")
    assert roster.organisations == ("a-co", "b-co", "c-co")
    key = load_identity_key(tmp_path / "keys" / "b-co.key")
    assert roster.secagg_roster().key(roster.index_of("b-co")) == key.public_bytes
    assert (tmp_path / "keys" / "b-co.key").stat().st_mode & 0o077 == 0
    shown = _tessera("roster", "show", str(tmp_path / "roster.json"))
    assert "b-co" in shown.stdout and roster.fingerprint() in shown.stdout
    again = _tessera(*DEMO, "--federation", "acme", "--organisations", "x-co,y-co", "--out", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert RosterFile.load(tmp_path / "roster.json").organisations == ("a-co", "b-co", "c-co")  # unchanged


def test_keys_born_at_each_company_and_a_roster_of_public_keys(tmp_path: Path) -> None:
    """The deployment flow: each company makes its key, the coordinator sees only public keys."""
    companies = ["a-co", "b-co", "c-co"]
    public = {}
    for company in companies:
        made = _tessera(
            "identity",
            "init",
            "--key",
            str(tmp_path / company / "id.key"),
            "--public-out",
            str(tmp_path / f"{company}.pub"),
        )
        assert made.returncode == 0, made.stderr
        key = load_identity_key(tmp_path / company / "id.key")
        assert (tmp_path / company / "id.key").stat().st_mode & 0o077 == 0
        assert key.public_bytes.hex() in made.stdout and key_fingerprint(key.public_bytes) in made.stdout
        public[company] = key.public_bytes
        again = _tessera("identity", "init", "--key", str(tmp_path / company / "id.key"))
        assert again.returncode == 2 and "already exists" in again.stderr
        assert load_identity_key(tmp_path / company / "id.key").public_bytes == key.public_bytes  # untouched
        kept = _tessera("identity", "init", "--if-missing", "--key", str(tmp_path / company / "id.key"))
        assert kept.returncode == 0 and key.public_bytes.hex() in kept.stdout
    members = [
        f"a-co={tmp_path / 'a-co.pub'}",
        f"b-co={public['b-co'].hex()}",
        f"c-co={tmp_path / 'c-co.pub'}",
    ]
    built = _tessera(
        "roster",
        "build",
        "--federation",
        "acme",
        *(a for m in members for a in ("--member", m)),
        "--threshold-fraction",
        "0.7",
        "--out",
        str(tmp_path / "roster.json"),
    )
    assert built.returncode == 0, built.stderr
    roster = RosterFile.load(tmp_path / "roster.json")
    assert roster.fingerprint() in built.stdout
    assert [bytes.fromhex(m.identity_key) for m in roster.members] == [public[c] for c in companies]
    assert roster.parameters.threshold_fraction == 0.7
    assert (
        not list(tmp_path.glob("*.key")) and not (tmp_path / "keys").exists()
    )  # no private key at the coordinator
    # Pinned: the same roster loads, any change to it is refused.
    assert RosterFile.load(tmp_path / "roster.json", fingerprint=roster.fingerprint()) == roster
    spaced = " ".join(roster.fingerprint()[i : i + 4] for i in range(0, 64, 4)).upper()
    assert RosterFile.load(tmp_path / "roster.json", fingerprint=spaced) == roster
    doc = json.loads((tmp_path / "roster.json").read_text())
    doc["parameters"]["threshold_fraction"] = 0.6
    (tmp_path / "other.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigurationError, match="not the roster the companies agreed on"):
        RosterFile.load(tmp_path / "other.json", fingerprint=roster.fingerprint())
    # Bad input changes nothing.
    bad = _tessera(
        "roster",
        "build",
        "--federation",
        "acme",
        "--member",
        "a-co=nothex",
        "--member",
        "b-co=00",
        "--out",
        str(tmp_path / "roster.json"),
        "--force",
    )
    assert bad.returncode == 2 and "neither 64 hex digits" in bad.stderr
    assert RosterFile.load(tmp_path / "roster.json") == roster
    exists = _tessera(
        "roster",
        "build",
        "--federation",
        "acme",
        *(a for m in members for a in ("--member", m)),
        "--out",
        str(tmp_path / "roster.json"),
    )
    assert exists.returncode == 2 and "--force" in exists.stderr


@pytest.mark.parametrize(
    ("organisations", "message"),
    [
        ("a-co,curator", "reserved"),
        ("a-co,a-co", "unique"),
        ("only-one", "at least two"),
        ("A-Co,b", "pattern"),
    ],
)
def test_bad_rosters_are_refused(tmp_path: Path, organisations: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        create_demo_federation("acme", organisations.split(","), tmp_path)
    assert not (tmp_path / "roster.json").exists()


def test_identity_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    write_identity_key(path, SigningKey.generate())
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_identity_key(path)
    path.write_text("not hex")
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match="64 hex digits"):
        load_identity_key(path)


def test_settings_errors_name_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("TESSERA_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TESSERA_FEDERATION", "acme")
    monkeypatch.setenv("TESSERA_ROSTER_FILE", str(tmp_path / "roster.json"))
    monkeypatch.setenv("TESSERA_MODEL__NAME", "mlp")
    monkeypatch.setenv("TESSERA_NUM_CLASSES", "1")
    monkeypatch.setenv("TESSERA_ROUNDS__MAX_ROUNDS", "zero")
    with pytest.raises(ConfigurationError) as error:
        load_curator_settings()
    text = str(error.value)
    assert "TESSERA_NUM_CLASSES" in text and "TESSERA_ROUNDS__MAX_ROUNDS" in text
    monkeypatch.setenv("TESSERA_NUM_CLASSES", "2")
    monkeypatch.setenv("TESSERA_ROUNDS__MAX_ROUNDS", "5")
    monkeypatch.setenv("TESSERA_ROUNDS__MAX_ROUNDZ", "5")
    with pytest.raises(ConfigurationError, match="TESSERA_ROUNDS__MAX_ROUNDZ: Extra inputs"):
        load_curator_settings()
    monkeypatch.delenv("TESSERA_ROUNDS__MAX_ROUNDZ")
    assert load_curator_settings().rounds.max_rounds == 5
    for key in ("TESSERA_ROUNDS__MAX_ROUNDS", "TESSERA_NUM_CLASSES", "TESSERA_MODEL__NAME"):
        monkeypatch.delenv(key)  # curator settings: the participant refuses variables that are not its own
    monkeypatch.setenv("TESSERA_MODEL__NAME", "mlp")
    monkeypatch.setenv("TESSERA_NUM_CLASSES", "2")
    env_file = tmp_path / "p.env"
    env_file.write_text(
        "TESSERA_ORGANISATION=b-co\nTESSERA_IDENTITY_KEY_FILE=/k\nTESSERA_DATA__PATH=/d.csv\n"
        f"TESSERA_ROSTER_FINGERPRINT={'ab' * 32}\n"
    )
    settings = load_participant_settings(env_file)
    assert settings.organisation == "b-co" and settings.privacy.enabled


def test_cli_reports_configuration_errors_with_status_2(tmp_path: Path) -> None:
    out = _tessera("curator", env={"TESSERA_FEDERATION": "Not Valid"})
    assert out.returncode == 2
    assert "TESSERA_FEDERATION" in out.stderr and "Traceback" not in out.stderr
    listing = _tessera("settings", "participant")
    assert listing.returncode == 0
    assert "TESSERA_PRIVACY__TARGET_EPSILON" in listing.stdout and "TESSERA_BROKER__URL" in listing.stdout


def test_roster_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    path.write_text(json.dumps({"federation": "acme", "members": [], "surprise": 1}))
    with pytest.raises(ConfigurationError, match=f"roster file {path}"):
        RosterFile.load(path)


def test_the_learning_rate_decays_per_round_and_the_decay_is_validated() -> None:
    from pydantic import ValidationError
    from tessera.participant.settings import PrivacySettings

    privacy = PrivacySettings(lr=2.0, lr_decay=0.5)
    assert [privacy.round_lr(r) for r in (1, 2, 3)] == [2.0, 1.0, 0.5]
    assert PrivacySettings(lr=0.3).round_lr(50) == 0.3  # the default keeps it constant
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValidationError, match="lr_decay"):
            PrivacySettings(lr_decay=bad)


def _minimal_curator_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the curator's required variables, none inherited from the environment running the tests."""
    for key in [k for k in os.environ if k.startswith("TESSERA_")]:
        monkeypatch.delenv(key)
    for key, value in {
        "TESSERA_FEDERATION": "acme",
        "TESSERA_ROSTER_FILE": str(tmp_path / "roster.json"),
        "TESSERA_MODEL__NAME": "mlp",
        "TESSERA_NUM_CLASSES": "2",
    }.items():
        monkeypatch.setenv(key, value)


def test_queue_type_and_addresses_are_broker_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tessera.transport.topology import QueueType

    _minimal_curator_env(tmp_path, monkeypatch)
    transport = load_curator_settings().broker.transport()
    assert transport.queue_type is QueueType.AUTO and transport.connection.addresses == ()
    monkeypatch.setenv("TESSERA_BROKER__QUEUE_TYPE", "quorum")
    monkeypatch.setenv("TESSERA_BROKER__ADDRESSES", "node-2:5672, node-3:5672")
    transport = load_curator_settings().broker.transport()
    assert transport.queue_type is QueueType.QUORUM
    assert transport.connection.addresses == ("node-2:5672", "node-3:5672")
    monkeypatch.setenv("TESSERA_BROKER__QUEUE_TYPE", "mirrored")
    with pytest.raises(ConfigurationError, match="TESSERA_BROKER__QUEUE_TYPE"):
        load_curator_settings()
    monkeypatch.setenv("TESSERA_BROKER__QUEUE_TYPE", "classic")
    monkeypatch.setenv("TESSERA_BROKER__ADDRESSES", "node-2")
    with pytest.raises(ConfigurationError, match="TESSERA_BROKER__ADDRESSES"):
        load_curator_settings()


@pytest.mark.parametrize(
    ("value", "rounds"),
    [("2", {2}), ("2, 3", {2, 3}), ("", set()), ("0", None), ("two", None), ("2,-1", None)],
)
def test_the_curator_pause_takes_one_round_or_a_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, rounds: set[int] | None
) -> None:
    _minimal_curator_env(tmp_path, monkeypatch)
    monkeypatch.setenv("TESSERA_FAULTS__PAUSE_BEFORE_ROUND", value)
    if rounds is None:
        with pytest.raises(ConfigurationError, match="TESSERA_FAULTS__PAUSE_BEFORE_ROUND"):
            load_curator_settings()
    else:
        assert load_curator_settings().faults.pause_rounds == rounds
