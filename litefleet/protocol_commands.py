"""``litefleet keys``, ``litefleet profiles`` and ``litefleet bundle``: no tensorflow needed."""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from agent.clikit import print_json
from agent.protocol import bundle as bundle_mod
from agent.protocol import encryption, keys, profiles
from agent.protocol.errors import BundleError, KeyFileError, SignatureError


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_keys(subparsers)
    _register_profiles(subparsers)
    _register_bundle(subparsers)


# keys ---------------------------------------------------------------------------------

def _register_keys(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("keys", help="make signing and encryption keys")
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="generate an Ed25519 key pair for a role, or an X25519 key pair",
                         description="Write ROLE.key (mode 0600) and ROLE.pub into DIR. A release key signs "
                                     "bundles, an operator key signs commands, a root key signs the trusted-key list. "
                                     "--role x25519 writes NAME.x25519.key (0600) and NAME.x25519.pub instead: a key "
                                     "that encrypted bundles are sealed for (an owner key that can re-wrap them, or a "
                                     "fleet key shared by devices).")
    gen.add_argument("--role", required=True, choices=(*keys.ROLES, keys.X25519))
    gen.add_argument("-o", "--output", required=True, type=Path, metavar="DIR")
    gen.add_argument("--name", help="file stem (default: the role; for x25519: owner); must start with the role, "
                                    "e.g. release-2027 (x25519: any name, e.g. owner or fleet)")
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
    if args.role == keys.X25519:
        private_path, public_path = keys.generate_x25519(args.output, args.name or "owner", passphrase=passphrase)
        key_id = keys.x25519_key_id(keys.load_x25519_public(public_path))
    else:
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
    p = subparsers.add_parser("bundle", help="inspect, verify, encrypt and re-wrap signed model bundles")
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
    enc = sub.add_parser("encrypt", help="encrypt a bundle's model for X25519 recipients, and sign it again",
                         description="Seal the model of FILE chunk by chunk with a fresh content key, wrap that key "
                                     "for each recipient, and write the bundle signed with --sign-key to OUT. The "
                                     "input must verify against --trust (default: --sign-key's own public key).")
    enc.add_argument("file", type=Path)
    add_encrypt_for(enc, required=True)
    _add_resign_options(enc)
    enc.set_defaults(func=_bundle_encrypt)
    rew = sub.add_parser("rewrap", help="change an encrypted bundle's recipients without re-encrypting the model",
                         description="Unwrap the content key with --owner-key (the private key of any recipient, by "
                                     "design the publisher's owner key), wrap it for the --encrypt-for recipients "
                                     "(the owner key stays one) and sign the new manifest with --sign-key. The "
                                     "encrypted chunks are kept byte for byte, so their signed hashes do not change.")
    rew.add_argument("file", type=Path)
    rew.add_argument("--owner-key", required=True, type=Path, metavar="KEY",
                     help="an X25519 private key that is a recipient of FILE (NAME.x25519.key)")
    rew.add_argument("--owner-passphrase-env", metavar="VAR", help="the owner key's passphrase, from this variable")
    add_encrypt_for(rew, required=True)
    _add_resign_options(rew)
    rew.set_defaults(func=_bundle_rewrap)


def add_encrypt_for(p: argparse.ArgumentParser, required: bool = False) -> None:
    """``--encrypt-for KEYS...``, shared with ``litefleet convert``."""
    p.add_argument("--encrypt-for", nargs="+", type=Path, metavar="KEYS", required=required,
                   help="recipients: X25519 public key files (NAME.x25519.pub), directories of them, or the JSON "
                        "`litefleet fleet keys --json` prints; add your owner key so you can re-wrap later")


def _add_resign_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sign-key", required=True, type=Path, metavar="KEY", help="release private key (PEM)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--passphrase-env", metavar="VAR", help="read the release key's passphrase from this variable")
    group.add_argument("--passphrase", action="store_true", help="ask for the release key's passphrase")
    p.add_argument("--trust", nargs="+", type=Path, metavar="PUBKEY",
                   help="release public key(s) the input bundle may be signed by (default: --sign-key's own)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="output bundle file (or an existing directory: the input's file name inside it)")
    p.add_argument("--json", action="store_true")


def load_recipients(paths: list[Path]) -> list[keys.Recipient]:
    """The --encrypt-for recipients, with a note on stderr when no owner key is among them."""
    recipients = keys.load_recipients(paths)
    if not any(r.label.startswith("owner") for r in recipients):
        print("note: no owner key (owner*.x25519.pub) among the recipients: re-wrapping this bundle later needs "
              "the private key of one of them", file=sys.stderr)
    return recipients


def _verified_input(args: argparse.Namespace, release_key: Any) -> tuple[bundle_mod.Bundle, Any]:
    """The input bundle, verified against --trust or the signing key's own public key: a bundle is
    never re-signed unchecked."""
    parts = bundle_mod.read_bundle(args.file)
    trusted = (keys.load_trust_paths(args.trust) if args.trust
               else [keys.PublicKey("release", release_key.public_key(), str(args.sign_key))])
    try:
        return parts, bundle_mod.verify(parts, trusted).manifest
    except SignatureError as exc:
        hint = "" if args.trust else "; pass --trust with the release key that signed it"
        raise BundleError(f"{args.file}: {exc}{hint}") from None
    except BundleError as exc:
        raise type(exc)(f"{args.file}: {exc}") from None


def _output_path(args: argparse.Namespace) -> Path:
    return args.output / args.file.name if args.output.is_dir() else args.output


def _bundle_encrypt(args: argparse.Namespace) -> int:
    release_key = keys.load_private(args.sign_key, read_passphrase(args.passphrase_env, args.passphrase))
    recipients = load_recipients(args.encrypt_for)
    parts, manifest = _verified_input(args, release_key)
    doc, ciphertext = encryption.encrypt(manifest.doc, parts.model, recipients)
    out = bundle_mod.write_bundle(_output_path(args), bundle_mod.build(doc, ciphertext, release_key))
    return _report_sealed(args, out, "encrypted", doc)


def _bundle_rewrap(args: argparse.Namespace) -> int:
    release_key = keys.load_private(args.sign_key, read_passphrase(args.passphrase_env, args.passphrase))
    owner = keys.load_x25519_private(args.owner_key, read_passphrase(args.owner_passphrase_env, False))
    recipients = keys.load_recipients(args.encrypt_for)
    parts, manifest = _verified_input(args, release_key)
    try:
        doc = encryption.rewrap(manifest.doc, parts.model, owner, recipients)
    except encryption.NotRecipientError as exc:
        raise BundleError(f"{args.file}: --owner-key {args.owner_key} cannot re-wrap it: {exc}") from None
    out = bundle_mod.write_bundle(_output_path(args), bundle_mod.build(doc, parts.model, release_key))
    return _report_sealed(args, out, "re-wrapped", doc)


def _report_sealed(args: argparse.Namespace, out: Path, verb: str, doc: dict[str, Any]) -> int:
    recipients = doc["encryption"]["recipients"]
    if args.json:
        print_json({"ok": True, "bundle": str(out), "name": doc["name"], "version": doc["version"],
                    "blob": bundle_mod.blob_id(bundle_mod.read_bundle(out).manifest_bytes),
                    "recipients": [{"label": r["label"], "key_id": r["key_id"]} for r in recipients]})
    else:
        print(f"{out}: {doc['name']} v{doc['version']} {verb} for {len(recipients)} recipient(s): "
              + ", ".join(f"{r['label']} ({r['key_id']})" for r in recipients))
    return 0


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
    enc = m.get("encryption")
    if enc:
        plain = enc.get("plaintext", {})
        recipients = enc.get("recipients", [])
        names = ", ".join(f"{r.get('label')} ({r.get('key_id')})" for r in recipients)
        print(f"  ENCRYPTED ({enc.get('aead')}): plaintext {plain.get('size')} bytes, sha256 {plain.get('sha256')}; "
              f"{len(recipients)} recipient(s): {names}")
    print(f"  signed by key {sig.get('key_id')}; min agent version {m.get('min_agent_version')}")
    return 0


def _bundle_verify(args: argparse.Namespace) -> int:
    trusted = keys.load_trust_paths(args.trust)
    verified = bundle_mod.verify(bundle_mod.read_bundle(args.file), trusted)
    m = verified.manifest
    recipients = encryption.recipients_of(m)
    if args.json:
        print_json({"ok": True, "name": m.name, "version": m.version, "profile": m.profile,
                    "sha256": m.sha256, "signer": verified.signer.key_id, "encrypted": bool(m.encryption),
                    "recipients": recipients})
    else:
        sealed = f" (encrypted for {len(recipients)} recipient(s))" if m.encryption else ""
        print(f"{args.file}: OK: {m.name} v{m.version} for {m.profile}, signed by release key "
              f"{verified.signer.key_id}, model sha256 {m.sha256[:16]}...{sealed}")
    return 0
