"""``litefleet keys``, ``litefleet profiles`` and ``litefleet bundle``: no tensorflow needed."""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
from pathlib import Path
from typing import Any

from agent.clikit import print_json
from agent.protocol import bundle as bundle_mod
from agent.protocol import keys, profiles
from agent.protocol.errors import KeyFileError


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_keys(subparsers)
    _register_profiles(subparsers)
    _register_bundle(subparsers)


# keys ---------------------------------------------------------------------------------

def _register_keys(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("keys", help="make signing keys")
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="generate an Ed25519 key pair for a role",
                         description="Write ROLE.key (mode 0600) and ROLE.pub into DIR. A release key signs "
                                     "bundles, an operator key signs commands, a root key signs the trusted-key list.")
    gen.add_argument("--role", required=True, choices=keys.ROLES)
    gen.add_argument("-o", "--output", required=True, type=Path, metavar="DIR")
    gen.add_argument("--name", help="file stem (default: the role); must start with the role, e.g. release-2027")
    gen.add_argument("--passphrase-env", metavar="VAR",
                     help="encrypt the private key with the passphrase in this environment variable")
    gen.add_argument("--passphrase", action="store_true", help="ask for a passphrase on the terminal")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=_keys_generate)


def read_passphrase(env_var: str | None, ask: bool, confirm: bool = False) -> bytes | None:
    """The passphrase from an environment variable or the terminal, or None."""
    if env_var:
        value = os.environ.get(env_var)
        if value is None:
            raise KeyFileError(f"environment variable {env_var} is not set")
        return value.encode()
    if ask:
        first = getpass.getpass("passphrase: ")
        if confirm and getpass.getpass("again: ") != first:
            raise KeyFileError("the two passphrases differ")
        return first.encode()
    return None


def _keys_generate(args: argparse.Namespace) -> int:
    passphrase = read_passphrase(args.passphrase_env, args.passphrase, confirm=True)
    private_path, public_path = keys.generate(args.role, args.output, passphrase=passphrase, name=args.name)
    key_id = keys.load_public(public_path).key_id
    result = {"role": args.role, "private_key": str(private_path), "public_key": str(public_path),
              "key_id": key_id, "encrypted": passphrase is not None}
    if args.json:
        print_json(result)
    else:
        print(f"{args.role} key {key_id}\n  private: {private_path} (mode 0600{', encrypted' if passphrase else ''})"
              f"\n  public:  {public_path}")
    return 0


# profiles -----------------------------------------------------------------------------

def _register_profiles(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profiles", help="list and show device profiles")
    p.add_argument("--dir", type=Path, help="profile directory (default: $LITEFLEET_PROFILES_DIR or the bundled ones)")
    sub = p.add_subparsers(dest="profiles_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="one line per profile")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_profiles_list)
    show = sub.add_parser("show", help="one profile in full")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_profiles_show)


def _profiles_list(args: argparse.Namespace) -> int:
    loaded = profiles.load_all(args.dir)
    if args.json:
        print_json([p.to_dict() for p in loaded])
        return 0
    from rich.console import Console
    from rich.table import Table
    table = Table(title="device profiles", box=None, header_style="bold")
    for column in ("name", "arch", "mode", "I/O", "delegates", "threads", "model budget", "max drop"):
        table.add_column(column)
    for p in loaded:
        table.add_row(p.name, p.hardware["architecture"], p.mode,
                      f"{p.quantization['input_type']}/{p.quantization['output_type']}",
                      " > ".join(d.kind for d in p.delegates), str(p.threads),
                      _mb(p.budgets["max_model_bytes"]), f"{p.budgets['max_accuracy_drop']:g} pt")
    Console(width=shutil.get_terminal_size((160, 24)).columns).print(table)
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:g} MB"


def _profiles_show(args: argparse.Namespace) -> int:
    profile = profiles.load_profile(args.name, args.dir)
    if args.json:
        print_json(profile.to_dict())
        return 0
    print(f"{profile.name}: {profile.description}\n  file: {profile.path}")
    _print_tree(profile.to_dict(), indent=2, skip={"name", "description"})
    return 0


def _print_tree(doc: Any, indent: int, skip: set[str] = frozenset()) -> None:
    pad = " " * indent
    for key, value in doc.items():
        if key in skip:
            continue
        if isinstance(value, dict) and value:
            print(f"{pad}{key}:")
            _print_tree(value, indent + 2)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{pad}{key}:")
            for i, item in enumerate(value):
                print(f"{pad}  [{i}]")
                _print_tree(item, indent + 4)
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            print(f"{pad}{key}: {shown}")


# bundle -------------------------------------------------------------------------------

def _register_bundle(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bundle", help="inspect and verify signed model bundles")
    sub = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    ins = sub.add_parser("inspect", help="show a bundle's manifest (nothing is verified)")
    ins.add_argument("file", type=Path)
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=_bundle_inspect)
    ver = sub.add_parser("verify", help="check a bundle's signature and model hashes",
                         description="Exit 0 when the bundle is signed by one of the trusted release keys and its "
                                     "model matches the signed hashes; otherwise say why and exit non-zero.")
    ver.add_argument("file", type=Path)
    ver.add_argument("--trust", required=True, nargs="+", type=Path, metavar="PUBKEY",
                     help="trusted release public key(s) or directories of them")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=_bundle_verify)


def _bundle_inspect(args: argparse.Namespace) -> int:
    info = bundle_mod.inspect(bundle_mod.read_bundle(args.file))
    if args.json:
        print_json(info)
        return 0
    m = info["manifest"]
    sig = info["signature"] or {}
    model = m.get("model", {})
    quant = m.get("quantization", {})
    print(f"{args.file}: {m.get('name')} v{m.get('version')} for profile {m.get('profile')} (NOT verified)")
    print(f"  model: {model.get('size')} bytes, sha256 {model.get('sha256')}, "
          f"{len(model.get('chunks', []))} chunks of {model.get('chunk_size')} bytes")
    print(f"  quantization: {quant.get('mode')} ({quant.get('input_type')} in, {quant.get('output_type')} out), "
          f"{quant.get('calibration_samples')} calibration samples")
    for direction in ("inputs", "outputs"):
        for t in m.get(direction, []):
            q = t.get("quantization")
            qs = f" scale {q['scale'][0]:.6g} zero point {q['zero_point'][0]}" if q and q.get("scale") else ""
            print(f"  {direction[:-1]}: {t.get('name')} {t.get('dtype')}{t.get('shape')}{qs}")
    accel = m.get("accelerator", {})
    print(f"  accelerator: {accel.get('target')} (compiled: {accel.get('compiled')}) {accel.get('note', '')}".rstrip())
    summary = m.get("validation", {}).get("summary")
    if summary:
        print(f"  validation: {summary}")
    if m.get("forced"):
        print(f"  FORCED past failed checks: {', '.join(m['forced'])}")
    print(f"  signed by key {sig.get('key_id')}; min agent version {m.get('min_agent_version')}")
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    trusted = keys.load_trust_paths(args.trust)
    verified = bundle_mod.verify(bundle_mod.read_bundle(args.file), trusted)
    m = verified.manifest
    if args.json:
        print_json({"ok": True, "name": m.name, "version": m.version, "profile": m.profile,
                    "sha256": m.sha256, "signer": verified.signer.key_id})
    else:
        print(f"{args.file}: OK: {m.name} v{m.version} for {m.profile}, signed by release key "
              f"{verified.signer.key_id}, model sha256 {m.sha256[:16]}...")
    return 0
