"""``litefleet distill``: train a smaller student on a teacher's softened outputs, and compare the two.

Progress (one line per epoch) goes to stderr; the comparison goes to stdout as tables, or as
JSON with ``--json``. Exit codes: 0 written, 2 bad input (one line on stderr naming the thing;
nothing written). TensorFlow is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# converter.distill imports TensorFlow only when it trains, so its defaults can be shown in --help.
from .distill import DEFAULT_ALPHA, DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LEARNING_RATE, DEFAULT_TEMPERATURE


def _number(kind: type, minimum: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        return value
    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill", help="train a smaller student model on a teacher's outputs (knowledge distillation)",
        description="Train a student on the teacher's softened outputs (Hinton's knowledge distillation): "
                    "loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * "
                    "cross-entropy(labels, student). Logits are read before a final softmax (or as the log of "
                    "output probabilities). Writes the student atomically to -o and prints teacher vs student: "
                    "accuracy, per-class precision/recall/F1, parameters, size and host latency of the float32 "
                    ".tflite. Convert the student like any model with `litefleet convert STUDENT.keras ...`.")
    p.add_argument("teacher", type=Path, help="the trained teacher: Keras file, SavedModel directory or .tflite")
    p.add_argument("--student", required=True, metavar="SPEC",
                   help="a Keras model file (.keras/.h5) trained further from its weights, or width=W: the "
                        "teacher's architecture (Keras teacher) with every Conv/Dense layer's channels times W, "
                        "fresh weights, e.g. width=0.5")
    p.add_argument("--data", required=True, type=Path, metavar="DATA",
                   help="training inputs: .npz (x, optional y), .npy, or a folder of images; without labels "
                        "the student learns from the teacher alone (alpha = 1)")
    p.add_argument("--eval", type=Path, metavar="DATA",
                   help="data both models are measured on (default: the training data, and the report says so)")
    p.add_argument("--epochs", type=_number(int, 1), default=DEFAULT_EPOCHS, metavar="N",
                   help=f"passes over DATA (default {DEFAULT_EPOCHS})")
    p.add_argument("--temperature", type=_number(float), default=DEFAULT_TEMPERATURE, metavar="T",
                   help=f"softens both models' outputs; higher shows more of how the teacher ranks wrong classes "
                        f"(default {DEFAULT_TEMPERATURE:g})")
    p.add_argument("--alpha", type=_number(float), default=None, metavar="A",
                   help=f"weight of the teacher's soft targets, 0-1; the rest is cross-entropy with the labels "
                        f"(default {DEFAULT_ALPHA:g} with labels, 1 without)")
    p.add_argument("--batch-size", type=_number(int, 1), default=DEFAULT_BATCH_SIZE, metavar="B",
                   help=f"(default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--learning-rate", type=_number(float), default=DEFAULT_LEARNING_RATE, metavar="LR",
                   help=f"Adam's learning rate (default {DEFAULT_LEARNING_RATE:g})")
    p.add_argument("--seed", type=_number(int), default=0, help="seed for weights and shuffling (default 0)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="STUDENT.keras",
                   help="where the student is written (.keras or .h5), atomically")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=_distill)


def _distill(args: argparse.Namespace) -> int:
    from agent.clikit import print_json

    from .cli import ConsoleProgress, _quiet_tensorflow
    _quiet_tensorflow()
    from . import distill
    progress = ConsoleProgress()
    try:
        result = distill.distill(args.teacher, args.student, args.data, args.output, epochs=args.epochs,
                                 temperature=args.temperature, alpha=args.alpha, batch_size=args.batch_size,
                                 learning_rate=args.learning_rate, eval_path=args.eval, seed=args.seed,
                                 progress=progress)
    except Exception as exc:
        progress.stop()
        if args.json:
            print_json({"ok": False, "error": str(exc) or type(exc).__name__})
        raise
    progress.stop()
    if args.json:
        print_json(result.report)
    else:
        from rich.console import Console
        render(result.report, Console(file=sys.stdout, soft_wrap=True, highlight=False))
    return 0


# The human report ---------------------------------------------------------------------------

def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "count":
        return f"{value:,}"
    if kind == "bytes":
        return f"{value:,} B"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "ms":
        return f"{value:.3f} ms"
    if kind == "ratio":
        return f"{value:.3f}x"
    return f"{value:.3f}"


def summary_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, teacher, student, student vs teacher) rows; pure, so it can be checked without a terminal."""
    t, s, r = doc["teacher"], doc["student"], doc["student_vs_teacher"]
    lat = (lambda f: (f.get("latency") or {}).get("median_ms"))
    acc_t, acc_s = t.get("accuracy"), s.get("accuracy")
    rows = [
        ("parameters", _fmt(t["parameters"], "count"), _fmt(s["parameters"], "count"), _fmt(r["parameters"], "ratio")),
        ("model file", _fmt(t["file_bytes"], "bytes"), _fmt(s["file_bytes"], "bytes"), _fmt(r["file_bytes"], "ratio")),
        ("float32 .tflite", _fmt(t.get("tflite_float32_bytes"), "bytes"), _fmt(s.get("tflite_float32_bytes"), "bytes"),
         _fmt(r["tflite_float32_bytes"], "ratio")),
        ("host latency (median)", _fmt(lat(t), "ms"), _fmt(lat(s), "ms"), _fmt(r["latency_median_ms"], "ratio")),
        ("accuracy", _fmt(acc_t, "pct"), _fmt(acc_s, "pct"),
         "n/a" if acc_t is None or acc_s is None else f"{100 * (acc_s - acc_t):+.2f} pts"),
    ]
    if "macro" in t and "macro" in s:
        rows.append(("macro F1", _fmt(t["macro"]["f1"], "f"), _fmt(s["macro"]["f1"], "f"),
                     f"{s['macro']['f1'] - t['macro']['f1']:+.3f}"))
    rows.append(("top-1 agreement with the teacher", "", _fmt(doc["evaluation"]["top1_agreement"], "pct"), ""))
    return rows


def render(doc: dict[str, Any], console) -> None:
    """Teacher vs student, then per-class precision/recall/F1, then warnings and notes."""
    from rich.markup import escape
    from rich.table import Table
    settings = doc["settings"]
    console.print(f"[bold]student written: {escape(doc['student']['path'])}[/] ({escape(doc['student_spec'])})")
    console.print(escape(f"  trained on {doc['training']['data']} for {settings['epochs']} epoch(s), temperature "
                         f"{settings['temperature']:g}, alpha {settings['alpha']:g}; teacher logits: "
                         f"{settings['teacher_logits']}; student logits: {settings['student_logits']}"))
    table = Table(title=f"teacher vs student on {doc['evaluation']['data']}")
    for i, column in enumerate(("", "teacher", "student", "student vs teacher")):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in summary_rows(doc):
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    per_class = doc.get("per_class") or {}
    if per_class:
        classes = Table(title="per class: precision / recall / F1")
        for i, column in enumerate(("class", "support", "teacher", "student")):
            classes.add_column(column, justify="left" if i == 0 else "right")
        for label, t in per_class["teacher"].items():
            s = per_class["student"][label]
            classes.add_row(label, str(t["support"]),
                            f"{t['precision']:.3f} / {t['recall']:.3f} / {t['f1']:.3f}",
                            f"{s['precision']:.3f} / {s['recall']:.3f} / {s['f1']:.3f}")
        console.print(classes)
    latency = doc["teacher"].get("latency") or doc["student"].get("latency")
    if latency:
        console.print(escape(f"latency: float32 .tflite of each model, ai-edge-litert, {latency['threads']} threads, "
                             "batch 1, on this host"))
    for warning in doc.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    for note in doc.get("notes", []):
        console.print(f"[dim]note: {escape(note)}[/]")
