"""The ``tessera`` command.

    tessera curator [--env-file FILE]          run the curator (settings from TESSERA_* variables)
    tessera participant [--env-file FILE]      run one organisation's participant
    tessera identity init --key FILE           (at a company) create its identity key; print the public key
    tessera identity show --key FILE           print an identity key's public key and fingerprint
    tessera roster build --federation ID --member ORG=KEY ... --out FILE
                                               (at the coordinator) the roster from public keys only
    tessera roster init-demo ...               DEMOS AND TESTS ONLY: all keys and the roster in one place
    tessera roster show ROSTER                 print a roster's members and fingerprint
    tessera broker provision --roster ROSTER --passwords-out FILE
                                               create the vhost, users, permissions on a local RabbitMQ
    tessera settings curator|participant       list every setting with its variable and description
    tessera model export --out DIR [--state-dir DIR] [--round N] [--from curator|participant]
                                               the trained model as model.pt, model.safetensors, model.json

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


def _identity_init(args: argparse.Namespace) -> int:
    from tessera.crypto import key_fingerprint
    from tessera.roster import create_identity

    key, created = create_identity(Path(args.key), if_missing=args.if_missing)
    public = key.public_bytes
    if args.public_out is not None:
        from tessera.storage import atomic_write_bytes

        atomic_write_bytes(Path(args.public_out), (public.hex() + "\n").encode())
    what = "created" if created else "already exists (kept)"
    print(f"identity key {args.key} {what}; the private key stays on this machine (mode 0600).")
    print(f"public key:  {public.hex()}")
    print(f"fingerprint: {key_fingerprint(public)}")
    print("Send the public key to the federation's coordinator; read the fingerprint to them out of band.")
    return 0


def _identity_show(args: argparse.Namespace) -> int:
    from tessera.crypto import key_fingerprint
    from tessera.roster import load_identity_key

    public = load_identity_key(Path(args.key)).public_bytes
    print(f"public key:  {public.hex()}")
    print(f"fingerprint: {key_fingerprint(public)}")
    return 0


def _public_key(text: str) -> bytes:
    """A member's public key: 64 hex digits, or a file holding them."""
    from tessera.errors import ConfigurationError

    candidate = text.strip()
    path = Path(candidate)
    if len(candidate) != 64 and path.exists():
        candidate = path.read_text().strip()
    try:
        raw = bytes.fromhex(candidate)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigurationError(f"{text!r} is neither 64 hex digits nor a file holding them")
    return raw


def _roster_build(args: argparse.Namespace) -> int:
    from tessera.crypto import key_fingerprint
    from tessera.errors import ConfigurationError
    from tessera.roster import FederationParameters, LayoutParameters, PrivacyParameters, build_roster

    keys: dict[str, bytes] = {}
    for item in args.member:
        organisation, sep, key = item.partition("=")
        if not sep or not organisation or not key:
            raise ConfigurationError(
                f"--member {item!r}: write ORGANISATION=PUBLIC_KEY (64 hex digits or a file)"
            )
        if organisation in keys:
            raise ConfigurationError(f"--member {organisation!r} is given twice")
        keys[organisation] = _public_key(key)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigurationError(
            f"{out} already exists; pass --force to replace it (every company must re-pin)"
        )
    try:
        parameters = FederationParameters(
            min_participants=args.min_participants,
            threshold_fraction=args.threshold_fraction,
            graph=args.graph,
            neighbours=args.neighbours,
            layout=LayoutParameters(
                ring_bits=args.ring_bits,
                clip=args.clip,
                value_bits=args.value_bits,
                max_weight=args.max_weight,
            ),
            privacy=PrivacyParameters(
                mode=args.privacy_mode,
                noise_multiplier=args.noise_multiplier,
                clip_norm=args.clip_norm,
                resolution=args.resolution,
                colluders=args.colluders,
            ),
        )
    except ValueError as exc:
        raise ConfigurationError(f"roster parameters: {exc}") from exc
    roster = build_roster(args.federation, keys, parameters=parameters, curator_user=args.curator_user)
    roster.save(out)
    print(f"federation {roster.federation}: roster of {len(roster.members)} members written to {out}")
    for member in roster.members:
        print(
            f"  {member.index:>3}  {member.organisation:<32} key fingerprint "
            f"{key_fingerprint(bytes.fromhex(member.identity_key))}"
        )
    _print_roster_fingerprint(roster)
    return 0


def _print_roster_fingerprint(roster: Any) -> None:
    from tessera.roster import display_fingerprint

    print(f"roster fingerprint: {roster.fingerprint()}")
    print(f"  (to read out:     {display_fingerprint(roster.fingerprint())})")
    print("Every company checks its own key fingerprint above and pins the roster fingerprint")
    print("(TESSERA_ROSTER_FINGERPRINT, chart value roster.fingerprint) after comparing it out of band.")


def _privacy_plan(args: argparse.Namespace) -> int:
    from tessera.skellam import SkellamMechanism, epsilon, plan_noise_multiplier

    z = plan_noise_multiplier(
        clip=args.clip_norm,
        scale=args.resolution / args.clip_norm,
        dimension=args.parameters,
        sample_rate=args.sample_rate,
        steps=args.steps,
        target_epsilon=args.target_epsilon,
        delta=args.delta,
    )
    m = SkellamMechanism(
        clip=args.clip_norm,
        scale=args.resolution / args.clip_norm,
        dimension=args.parameters,
        noise_multiplier=z,
    )
    spent = epsilon([m.entry(args.sample_rate, args.steps)], args.delta)
    print(
        f"noise multiplier {z:.6g}: {args.steps} steps at q = {args.sample_rate:g} spend epsilon {spent:.4f} at delta {args.delta:g}"
    )
    print(
        f"  roster: tessera roster build ... --privacy-mode distributed --noise-multiplier {z:.6g} --clip-norm {args.clip_norm:g}"
    )
    return 0


def _roster_init_demo(args: argparse.Namespace) -> int:
    from tessera.errors import ConfigurationError
    from tessera.roster import create_demo_federation

    organisations = [o.strip() for o in args.organisations.split(",") if o.strip()]
    if not args.all_keys_in_one_place:
        raise ConfigurationError(
            "roster init-demo writes the private keys of every organisation into one directory: whoever holds "
            "them can act as every organisation, which voids the protection against a malicious curator. It is "
            "for demos and tests only; pass --all-keys-in-one-place to confirm. In a real federation each "
            "company runs `tessera identity init` and the coordinator `tessera roster build`"
        )
    roster = create_demo_federation(
        args.federation, organisations, Path(args.out), curator_user=args.curator_user
    )
    print(f"DEMO federation {roster.federation}: roster written to {Path(args.out) / 'roster.json'}")
    for member in roster.members:
        key = Path(args.out) / "keys" / f"{member.organisation}.key"
        print(f"  {member.index:>3}  {member.organisation:<32} private identity key (demo only): {key}")
    _print_roster_fingerprint(roster)
    return 0


def _roster_show(args: argparse.Namespace) -> int:
    from tessera.crypto import key_fingerprint
    from tessera.roster import RosterFile

    roster = RosterFile.load(Path(args.roster))
    print(f"federation {roster.federation} (curator user {roster.curator_user!r})")
    for member in roster.members:
        key = bytes.fromhex(member.identity_key)
        print(
            f"  {member.index:>3}  {member.organisation:<32} {member.identity_key}  ({key_fingerprint(key)})"
        )
    print(f"parameters: {roster.parameters.model_dump_json()}")
    _print_roster_fingerprint(roster)
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


def _model_export(args: argparse.Namespace) -> int:
    import os

    from tessera.apps.export import export_model

    state_dir = args.state_dir or os.environ.get("TESSERA_STATE_DIR")
    if not state_dir:
        raise ConfigurationError("give the service's state directory: --state-dir DIR (or TESSERA_STATE_DIR)")
    exported = export_model(
        Path(state_dir),
        Path(args.out),
        source=args.source,
        round_number=args.round,
        onnx=args.onnx,
        input_shape=args.input_shape,
        force=args.force,
        allowed_imports=args.allow_import,
    )
    print(f"exported the {exported.source}'s model of round {exported.round} to {exported.directory}:")
    for path in exported.files:
        print(f"  {path}")
    print("load it: see docs/model.md (tessera.models.build_model + safetensors.torch.load_file)")
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

    identity = commands.add_parser(
        "identity", help="this organisation's identity key (made where the participant runs)"
    ).add_subparsers(dest="identity_command", required=True)
    ident_init = identity.add_parser("init", help="create the identity key (0600) and print its public half")
    ident_init.add_argument("--key", required=True, help="file for the private key (refused if it exists)")
    ident_init.add_argument(
        "--if-missing", action="store_true", help="keep an existing key instead of failing"
    )
    ident_init.add_argument("--public-out", default=None, help="also write the public key (hex) to this file")
    ident_init.set_defaults(handler=_identity_init)
    ident_show = identity.add_parser("show", help="print the public key and fingerprint of an identity key")
    ident_show.add_argument("--key", required=True)
    ident_show.set_defaults(handler=_identity_show)

    roster = commands.add_parser("roster", help="build or inspect a federation's roster").add_subparsers(
        dest="roster_command", required=True
    )
    build = roster.add_parser(
        "build", help="the roster from the organisations' public keys (at the coordinator)"
    )
    build.add_argument("--federation", required=True)
    build.add_argument(
        "--member",
        action="append",
        required=True,
        metavar="ORG=PUBLIC_KEY",
        help="an organisation and its public key (64 hex digits, or a file holding them); repeat, in roster order",
    )
    build.add_argument("--out", required=True, help="the roster file to write")
    build.add_argument("--force", action="store_true", help="replace an existing roster file")
    build.add_argument("--curator-user", default="curator")
    build.add_argument("--min-participants", type=int, default=3)
    build.add_argument("--threshold-fraction", type=float, default=None)
    build.add_argument("--graph", choices=["full", "sparse"], default="full")
    build.add_argument(
        "--neighbours", type=int, default=None, help="SecAgg+ neighbourhood size (sparse graph)"
    )
    build.add_argument("--ring-bits", type=int, choices=[32, 64], default=32)
    build.add_argument("--clip", type=float, default=0.5, help="update coordinates are clipped to ±clip")
    build.add_argument("--value-bits", type=int, default=None)
    build.add_argument("--max-weight", type=int, default=65_535)
    build.add_argument("--privacy-mode", choices=["local", "distributed"], default="local")
    build.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="distributed: aggregate noise (`tessera privacy plan`)",
    )
    build.add_argument(
        "--clip-norm", type=float, default=None, help="distributed: per-example clipping norm C"
    )
    build.add_argument("--resolution", type=float, default=4096.0, help="distributed: integer units per C")
    build.add_argument("--colluders", type=int, default=0, help="distributed: survivors that may collude (T)")
    build.set_defaults(handler=_roster_build)

    privacy = commands.add_parser("privacy", help="plan the distributed mode's noise").add_subparsers(
        dest="privacy_command", required=True
    )
    plan = privacy.add_parser(
        "plan", help="the smallest noise multiplier that keeps the planned steps within a target epsilon"
    )
    plan.add_argument("--target-epsilon", type=float, required=True)
    plan.add_argument("--delta", type=float, required=True)
    plan.add_argument(
        "--sample-rate", type=float, required=True, help="the largest q = batch / records of any member"
    )
    plan.add_argument("--steps", type=int, required=True, help="planned DP-SGD steps (rounds)")
    plan.add_argument("--parameters", type=int, required=True, help="trainable parameters of the model")
    plan.add_argument("--clip-norm", type=float, required=True)
    plan.add_argument("--resolution", type=float, default=4096.0)
    plan.set_defaults(handler=_privacy_plan)
    demo = roster.add_parser(
        "init-demo", help="DEMOS AND TESTS ONLY: every organisation's private key and the roster in one place"
    )
    demo.add_argument("--federation", required=True)
    demo.add_argument("--organisations", required=True, help="comma-separated organisation ids")
    demo.add_argument("--out", required=True, help="directory for roster.json and keys/")
    demo.add_argument("--curator-user", default="curator")
    demo.add_argument(
        "--all-keys-in-one-place", action="store_true", help="confirm that this is a demo or a test"
    )
    demo.set_defaults(handler=_roster_init_demo)
    show = roster.add_parser("show", help="print a roster and its fingerprint")
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

    model = commands.add_parser("model", help="the trained model").add_subparsers(
        dest="model_command", required=True
    )
    export = model.add_parser(
        "export", help="write the curator's (or a participant's last announced) model as standard files"
    )
    export.add_argument("--out", required=True, help="output directory (created if needed)")
    export.add_argument(
        "--state-dir", default=None, help="the service's state directory (default: $TESSERA_STATE_DIR)"
    )
    export.add_argument(
        "--round",
        type=int,
        default=None,
        help="the weights after this round (curator: kept for the last rounds.keep_weights rounds); default: the latest",
    )
    export.add_argument(
        "--from",
        dest="source",
        choices=["curator", "participant"],
        default=None,
        help="which service's state directory it is (default: detected)",
    )
    export.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the onnx extra)")
    export.add_argument(
        "--input-shape", type=int, nargs="+", default=None, help="ONNX: example input shape, e.g. 1 30"
    )
    export.add_argument(
        "--allow-import",
        action="append",
        default=[],
        metavar="MODULE:FACTORY",
        help="trust this import: model factory (as the participant's allowed_imports)",
    )
    export.add_argument("--force", action="store_true", help="replace model files already in --out")
    export.set_defaults(handler=_model_export)

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
