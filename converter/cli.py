"""``litefleet convert``: a trained model in, a validated and signed bundle per profile out.

Progress goes to stderr while calibrating and converting; the report goes to stdout (human
text, or the same facts as JSON with ``--json``). Exit codes: 0 signed, 2 bad input (one
line on stderr naming the thing), 3 validation failed (the report says which check).
Tensorflow is imported only when the command runs, so ``litefleet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from agent.protocol.manifest import QUANT_MODES


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (versions start at 1)")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert, validate and sign a model for a device profile",
        description="Convert a Keras (.keras/.h5), SavedModel or .tflite model for a device profile, validate it "
                    "(accuracy against the source, op versions, every allowed runtime, size, memory, latency) and "
                    "write a signed DIR/{name}-v{version}-{profile}.lfb with its .report.json. Nothing is written "
                    "when a check fails, unless --force.")
    p.add_argument("model", type=Path, help="Keras file, SavedModel directory or .tflite file")
    p.add_argument("--profile", required=True, metavar="NAME", help="device profile name, or a path to a .toml")
    p.add_argument("--profiles-dir", type=Path, metavar="DIR",
                   help="profile directory (default: $LITEFLEET_PROFILES_DIR or the bundled ones)")
    p.add_argument("--calibration", type=Path, metavar="DATA",
                   help="representative inputs: .npz (x, optional y), .npy, or a folder of images")
    p.add_argument("--eval", type=Path, metavar="DATA",
                   help="labelled evaluation data (default: the calibration data, and the report says so)")
    p.add_argument("--name", required=True, help="model name in the manifest")
    p.add_argument("--version", required=True, type=_positive_int, metavar="V",
                   help="positive integer, increasing with every release of this model")
    p.add_argument("--sign-key", required=True, type=Path, metavar="KEY", help="release private key (PEM)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--passphrase-env", metavar="VAR", help="read the key's passphrase from this variable")
    group.add_argument("--passphrase", action="store_true", help="ask for the key's passphrase on the terminal")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="DIR")
    p.add_argument("--mode", choices=QUANT_MODES, help="override the profile's quantization mode")
    p.add_argument("--force", action="store_true",
                   help="sign even when checks fail (recorded in the manifest's 'forced'); never when an allowed "
                        "runtime cannot load the model")
    p.add_argument("--skip-edgetpu-compile", action="store_true",
                   help="for Edge TPU profiles without edgetpu_compiler: ship the model uncompiled (runs on the CPU)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    _add_compression(p)
    from litefleet.protocol_commands import add_encrypt_for
    add_encrypt_for(p)
    p.set_defaults(func=_convert)


def _epochs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: fine-tuning needs at least 1 epoch")
    return value


def _add_compression(p: argparse.ArgumentParser) -> None:
    """Pruning and --search (docs/compression.md)."""
    g = p.add_argument_group("pruning and search (docs/compression.md)")
    g.add_argument("--prune", metavar="SPARSITY",
                   help="prune before quantizing: the fraction of weights to remove, between 0 and 1 (e.g. 0.5); "
                        "magnitude pruning with a polynomial-decay schedule while fine-tuning on --finetune")
    g.add_argument("--prune-structured", action="store_true",
                   help="with --prune (or --search): remove whole Conv filters and Dense units by L1 norm and "
                        "rebuild a narrower model (Keras chains only) instead of zeroing single weights")
    g.add_argument("--finetune", type=Path, metavar="DATA",
                   help="labelled training data (.npz with x and y, or class folders) to fine-tune the pruned "
                        "model on; without it pruning is one-shot")
    g.add_argument("--epochs", type=_epochs, default=2, metavar="N",
                   help="fine-tuning epochs while pruning (default: 2)")
    g.add_argument("--search", action="store_true",
                   help="try every quantization mode the profile's hardware runs, each with and without pruning, "
                        "and sign the best candidate within the profile's accuracy tolerance; prints a table of all")
    g.add_argument("--search-goal", choices=("size", "latency"), default="size",
                   help="with --search: pick the smallest (default) or the fastest fitting candidate")
    g.add_argument("--search-modes", metavar="LIST",
                   help="with --search: comma-separated modes to try (default: those the profile's hardware runs)")
    g.add_argument("--search-prune", metavar="LIST", default="0.5,0.8",
                   help="with --search: comma-separated sparsities to try besides no pruning (default: 0.5,0.8; "
                        "'none' for no pruned candidates)")


def _check_compression(args: argparse.Namespace) -> tuple[float | None, list[float], list[str] | None]:
    """(prune, search sparsities, search modes) from the flags; ConverterError for combinations that make no sense."""
    from .errors import ConverterError
    from .prune import check_sparsity
    if args.search:
        for flag, value in (("--mode", args.mode), ("--prune", args.prune)):
            if value is not None:
                raise ConverterError(f"{flag} cannot be combined with --search, which tries the modes and sparsities "
                                     "itself (narrow it with --search-modes and --search-prune)")
        text = (args.search_prune or "").strip()
        levels = [] if text.lower() in ("", "none") else [check_sparsity(v.strip(), "--search-prune")
                                                          for v in text.split(",")]
        modes = [m.strip() for m in args.search_modes.split(",") if m.strip()] if args.search_modes else None
        return None, levels, modes
    if args.prune is None:
        for flag, given in (("--prune-structured", args.prune_structured), ("--finetune", args.finetune is not None)):
            if given:
                raise ConverterError(f"{flag} needs --prune SPARSITY (or --search)")
        return None, [], None
    return check_sparsity(args.prune), [], None


class ConsoleProgress:
    """Progress lines on stderr with elapsed time; a spinner on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        from rich.console import Console
        self.console = Console(stderr=True, soft_wrap=True, highlight=False)
        self.start = time.monotonic()
        self.status = self.console.status("starting") if self.console.is_terminal else None
        if self.status:
            self.status.start()

    def __call__(self, message: str) -> None:
        from rich.markup import escape
        elapsed = time.monotonic() - self.start
        if self.status:
            self.status.update(escape(message))
        self.console.print(f"[dim]{elapsed:6.1f}s[/] {escape(message)}")

    def stop(self) -> None:
        if self.status:
            self.status.stop()
            self.status = None


def _quiet_tensorflow() -> None:
    """Keep TensorFlow's own chatter off the terminal; the report says what matters."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("absl", "tensorflow", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _convert(args: argparse.Namespace) -> int:
    from agent.clikit import print_json
    from litefleet.protocol_commands import load_recipients, read_passphrase

    from .errors import ValidationFailed
    _quiet_tensorflow()
    passphrase = read_passphrase(args.passphrase_env, args.passphrase)
    recipients = load_recipients(args.encrypt_for) if args.encrypt_for else None  # before the slow part
    prune, levels, modes = _check_compression(args)
    from . import pipeline, report
    from . import search as search_mod
    progress = ConsoleProgress()
    common = dict(calibration=args.calibration, eval=args.eval, name=args.name, version=args.version,
                  sign_key=args.sign_key, passphrase=passphrase, out_dir=args.output, force=args.force,
                  skip_edgetpu_compile=args.skip_edgetpu_compile, progress=progress,
                  profiles_dir=args.profiles_dir, encrypt_for=recipients, finetune=args.finetune, epochs=args.epochs)
    try:
        if args.search:
            result = search_mod.search(args.model, args.profile, goal=args.search_goal, modes=modes,
                                       sparsities=levels, structured=args.prune_structured, **common)
        else:
            result = pipeline.convert_to_bundle(args.model, args.profile, mode_override=args.mode, prune=prune,
                                                prune_structured=args.prune_structured, **common)
    except (ValidationFailed, search_mod.SearchFailed) as exc:
        progress.stop()
        doc = getattr(exc, "document", None)
        if doc is not None:
            _show(doc, args.json, print_json, report)
        raise
    except Exception as exc:
        progress.stop()
        if args.json:
            print_json({"ok": False, "signed": False, "error": str(exc) or type(exc).__name__})
        raise
    progress.stop()
    _show(result.report, args.json, print_json, report)
    return 0


def _show(doc: dict, as_json: bool, print_json, report) -> None:
    if as_json:
        print_json(doc)
        return
    from rich.console import Console
    console = Console(file=sys.stdout, soft_wrap=True, highlight=False)
    if doc.get("search"):
        from .search import render
        render(doc["search"], console)
    if "name" in doc:
        report.render(doc, console)
    elif doc.get("error"):
        console.print(f"[bold red]NOT signed:[/] {doc['error']}", highlight=False)
