"""The ``tessera`` command.

    tessera curator [--env-file FILE]          run the curator (settings from TESSERA_* variables)
    tessera participant [--env-file FILE]      run one organisation's participant
    tessera roster init --federation ID --organisations a,b,c --out DIR
                                               create identity keys and the roster of a new federation
    tessera roster show ROSTER                 print a roster's members
    tessera broker provision --roster ROSTER --passwords-out FILE
                                               create the vhost, users, permissions on a local RabbitMQ
    tessera settings curator|participant       list every setting with its variable and description

Errors in configuration print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from tessera.errors import ConfigurationError, TesseraError


def _curator(args: argparse.Namespace) -> int:
    from tessera.curator.main import run_curator
    from tessera.curator.settings import load_curator_settings

    return int(run_curator(load_curator_settings(args.env_file)))


def _participant(args: argparse.Namespace) -> int:
    from tessera.participant.main import run_participant
    from tessera.participant.settings import load_participant_settings

    return int(run_participant(load_participant_settings(args.env_file)))


def _roster_init(args: argparse.Namespace) -> int:
    from tessera.roster import create_federation

    organisations = [o.strip() for o in args.organisations.split(",") if o.strip()]
    roster = create_federation(args.federation, organisations, Path(args.out), curator_user=args.curator_user)
    print(f"federation {roster.federation}: roster written to {Path(args.out) / 'roster.json'}")
    for member in roster.members:
        key = Path(args.out) / "keys" / f"{member.organisation}.key"
        print(f"  {member.index:>3}  {member.organisation:<32} identity key (give only to them): {key}")
    return 0


def _roster_show(args: argparse.Namespace) -> int:
    from tessera.roster import RosterFile

    roster = RosterFile.load(Path(args.roster))
    print(f"federation {roster.federation} (curator user {roster.curator_user!r})")
    for member in roster.members:
        print(f"  {member.index:>3}  {member.organisation:<32} {member.identity_key}")
    return 0


def _broker_provision(args: argparse.Namespace) -> int:
    from tessera.roster import RosterFile
    from tessera.transport import generate_password, provision

    roster = RosterFile.load(Path(args.roster))
    out = Path(args.passwords_out)
    passwords: dict[str, str] = json.loads(out.read_text()) if out.exists() else {}
    for user in (roster.curator_user, *roster.organisations):
        passwords.setdefault(user, generate_password())
    provision(
        roster.federation,
        curator_password=passwords[roster.curator_user],
        organisation_passwords={org: passwords[org] for org in roster.organisations},
        curator_user=roster.curator_user,
    )
    from tessera.storage import atomic_write_bytes

    atomic_write_bytes(out, (json.dumps(passwords, indent=2) + "\n").encode())
    out.chmod(0o600)
    print(
        f"vhost tessera-{roster.federation}: {1 + len(roster.organisations)} users provisioned; passwords in {out}"
    )
    return 0


def _describe(model: type[BaseModel], prefix: str = "TESSERA_") -> list[tuple[str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        variable = f"{prefix}{name.upper()}"
        annotation = field.annotation
        nested = next(
            (
                a
                for a in getattr(annotation, "__args__", (annotation,))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            None,
        )
        if nested is not None and name != "model":
            rows.extend(_describe(nested, variable + "__"))
            continue
        default: Any = (
            field.get_default(call_default_factory=True) if not field.is_required() else "(required)"
        )
        rows.append((variable, str(default), field.description or ""))
    return rows


def _settings(args: argparse.Namespace) -> int:
    if args.service == "curator":
        from tessera.curator.settings import CuratorSettings as model
    else:
        from tessera.participant.settings import ParticipantSettings as model
    for variable, default, description in _describe(model):
        print(f"{variable:<44} {default:<28} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera", description="Federated learning with secure aggregation."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, text in (
        ("curator", _curator, "run the curator"),
        ("participant", _participant, "run an organisation's participant"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "--env-file", type=Path, default=None, help="read TESSERA_* settings from this file too"
        )
        sub.set_defaults(handler=handler)

    roster = commands.add_parser("roster", help="create or inspect a federation's roster").add_subparsers(
        dest="roster_command", required=True
    )
    init = roster.add_parser("init", help="create identity keys and a roster")
    init.add_argument("--federation", required=True)
    init.add_argument("--organisations", required=True, help="comma-separated organisation ids")
    init.add_argument("--out", required=True, help="directory for roster.json and keys/")
    init.add_argument("--curator-user", default="curator")
    init.set_defaults(handler=_roster_init)
    show = roster.add_parser("show", help="print a roster")
    show.add_argument("roster")
    show.set_defaults(handler=_roster_show)

    broker = commands.add_parser("broker", help="set up the broker").add_subparsers(
        dest="broker_command", required=True
    )
    prov = broker.add_parser(
        "provision", help="vhost, users and permissions on the local RabbitMQ (rabbitmqctl)"
    )
    prov.add_argument("--roster", required=True)
    prov.add_argument(
        "--passwords-out", required=True, help="JSON file of generated passwords (kept, mode 600)"
    )
    prov.set_defaults(handler=_broker_provision)

    settings = commands.add_parser("settings", help="list a service's settings")
    settings.add_argument("service", choices=["curator", "participant"])
    settings.set_defaults(handler=_settings)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except ConfigurationError as exc:
        print(f"tessera {args.command}: {exc}", file=sys.stderr)
        code = 2
    except TesseraError as exc:
        print(f"tessera {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


__all__ = ["build_parser", "main"]


if __name__ == "__main__":
    main()
