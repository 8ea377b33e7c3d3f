"""``litefleet demo``: the whole host-side path on a real model, start to finish.

Makes keys, trains the digits CNN on scikit-learn's bundled data, converts, validates and
signs it for every device profile, verifies each bundle the way a device would, then
installs one on a local agent store and runs an inference through it. No root, no network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("demo-out")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train, convert for every profile, sign, verify and install a real model",
                              description="Run the whole path on the digits CNN: keys, training, conversion and "
                                          "validation for every device profile, signed bundles, verification, "
                                          "and an install plus inference on a local agent store.")
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT, help="working folder (default: %(default)s)")
    p.add_argument("--profiles", nargs="+", metavar="NAME", help="profiles to convert for (default: all)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="remove the working folder first")
    p.set_defaults(func=_demo)


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from rich.console import Console
    from rich.table import Table

    from agent.protocol import bundle as bundle_mod
    from agent.protocol import keys, profiles
    from converter.examples import train_digits_cnn, write_digits_npz
    from converter.pipeline import convert_to_bundle

    started = time.monotonic()
    out: Path = args.output
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    _step("keys: a release key signs bundles, an operator key signs commands, a root key signs key lists")
    key_dir = out / "keys"
    for role in keys.ROLES:
        if not (key_dir / f"{role}.key").exists():
            keys.generate(role, key_dir)
        print(f"  {role:8s} {keys.load_public(key_dir / f'{role}.pub').key_id}  {key_dir / (role + '.key')} (0600)")

    _step(f"training the digits CNN ({args.epochs} epochs on scikit-learn's bundled digits)")
    model_path = out / "digits.keras"
    if not model_path.exists():
        train_digits_cnn(model_path, epochs=args.epochs)
    calibration, evaluation = write_digits_npz(out / "data")
    print(f"  model {model_path}; calibration {calibration}; evaluation {evaluation}")

    names = args.profiles or profiles.available()
    bundles_dir = out / "bundles"
    version = _next_version(bundles_dir)
    results: list[dict[str, Any]] = []
    for name in names:
        _step(f"converting for {name}")
        profile = profiles.load_profile(name)
        result = convert_to_bundle(
            model_path, name, calibration=calibration, eval=evaluation, name="digits", version=version,
            sign_key=key_dir / "release.key", out_dir=bundles_dir,
            skip_edgetpu_compile=profile.accelerator["kind"] == "edgetpu" and not shutil.which("edgetpu_compiler"),
            progress=lambda line: print(f"  {line}", flush=True))
        verified = bundle_mod.verify(bundle_mod.read_bundle(result.bundle_path),
                                     [keys.load_public(key_dir / "release.pub")])
        results.append({"profile": name, "path": result.bundle_path, "manifest": result.manifest,
                        "signer": verified.signer.key_id})
        print(f"  signed and verified: {result.bundle_path}")

    _step("installing the x86-cpu bundle on a local agent store and running an inference")
    inference = _install_and_predict(out, key_dir, results, evaluation)
    print(f"  {inference}")

    table = Table(title=f"digits v{version}: one bundle per device profile", header_style="bold")
    for column in ("profile", "mode", "I/O", "float acc", "model acc", "drop", "size", "host latency", "runs on"):
        table.add_column(column)
    for r in results:
        m = r["manifest"]
        acc = _check(m, "accuracy")
        lat = _check(m, "latency")
        accel = m["accelerator"]
        table.add_row(r["profile"], m["quantization"]["mode"],
                      f"{m['quantization']['input_type']}/{m['quantization']['output_type']}",
                      _pct(acc.get("source_accuracy")), _pct(acc.get("converted_accuracy")),
                      _pts(acc.get("drop_points")), f"{m['model']['size'] / 1024:.0f} KiB",
                      _ms(lat.get("median_ms")), "Edge TPU" if accel.get("compiled") else accel["target"].upper())
    Console(width=shutil.get_terminal_size((140, 24)).columns).print(table)
    print(f"\nbundles in {bundles_dir}; verify one with:\n"
          f"  litefleet bundle verify {results[0]['path']} --trust {key_dir / 'release.pub'}")
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


def _next_version(bundles_dir: Path) -> int:
    """One more than the newest digits bundle already there, so re-running the demo works."""
    import re
    versions = [int(m.group(1)) for p in bundles_dir.glob("digits-v*-*.lfb")
                if (m := re.match(r"digits-v(\d+)-", p.name))]
    return max(versions, default=0) + 1


def _install_and_predict(out: Path, key_dir: Path, results: list[dict[str, Any]], evaluation: Path) -> str:
    import numpy as np

    from agent.engine import load_model
    from agent.installer import Installer
    from agent.protocol import keys, profiles
    from agent.store import ModelStore

    chosen = next((r for r in results if r["profile"] == "x86-cpu"), results[0])
    profile = profiles.load_profile(chosen["profile"])
    trusted = keys.load_trusted_dir(key_dir)
    installer = Installer(ModelStore(out / "device-state"), trusted, profile, loader=load_model)
    result = installer.install_file(chosen["path"])
    if not result.ok:
        return f"install refused ({result.code}): {result.message}"
    loaded = result.loaded
    data = np.load(evaluation)
    x, y = data["x"][:200], data["y"][:200]
    correct = sum(int(np.argmax(loaded.predict([x[i:i + 1]])[0]) == y[i]) for i in range(len(x)))
    engine = loaded.report
    loaded.close()
    return (f"{result.message}\n  on {engine.runtime} {engine.runtime_version} with {engine.delegate}: "
            f"{correct}/{len(x)} evaluation digits right")


def _check(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    for check in manifest.get("validation", {}).get("checks", []):
        if check.get("name") == name:
            return check.get("details", {})
    return {}


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _pts(value: Any) -> str:
    return f"{value:+.2f} pt" if isinstance(value, (int, float)) else "-"


def _ms(value: Any) -> str:
    return f"{value:.2f} ms" if isinstance(value, (int, float)) else "-"


if __name__ == "__main__":
    sys.exit(0)
