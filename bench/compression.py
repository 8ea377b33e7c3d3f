"""Benchmark: compression beyond quantization (pruning, distillation) against the float32 model.

On the digits CNN and on a MobileNetV2, for each of float32, int8, pruned 50% + int8, pruned
80% + int8 and a distilled half-width student + int8: accuracy on labelled test data in
ai-edge-litert, file size, compressed size (zlib -9, what a compressing link or a gzip'd copy
carries), the weight sparsity read back from the .tflite, and host latency (ai-edge-litert,
2 threads, raw invokes in alternating rounds), each beside float32's figure as a ratio. The
pruned and distilled models are real training runs in this run (``--epochs`` of fine-tuning
from the teacher's weights, ``--student-epochs`` for students that start from fresh weights);
the teachers are trained once and cached in bench/.cache/.

The MobileNetV2 is keras.applications.MobileNetV2 (alpha 1.0, weights=None, 10 classes, 2.27M
parameters) on 32x32 RGB inputs, with batch-normalisation momentum 0.9 instead of 0.999 so
its statistics settle in a short training. Its data are real labelled images: scikit-learn's
digits scaled to 24x24, placed at a random offset on a 32x32 canvas in random foreground and
background colours with noise (the training split four times over, the test split once).

    .venv/bin/python -m bench.compression [--quick] [--json] [--epochs N] [--student-epochs N]
                                          [--teacher-epochs N] [--models digits,mobilenet]
"""

from __future__ import annotations

import os
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import (CACHE, RUNTIME_MIN_VERSION, THREADS, Report, fmt_ratio, litert_interpreter, log,
                          parse_args, raw_invoke, summary, tf_version)

MODELS = ("digits", "mobilenet")
VARIANTS = ("float32", "int8", "pruned 50% + int8", "pruned 80% + int8", "distilled student + int8")
PRUNE_TARGETS = {"pruned 50% + int8": 0.5, "pruned 80% + int8": 0.8}
STUDENT_WIDTH = 0.5
ZLIB_LEVEL = 9
SPARSITY_TOLERANCE = 0.02       # read-back sparsity may fall short of the target by this much
MAX_PRUNED50_DROP_POINTS = 2.0  # acceptance on a full run: pruned 50% + int8 vs float32
MOBILENET_SIZE, MOBILENET_DIGIT, MOBILENET_COPIES = 32, 24, 4
MOBILENET_TEACHER_EPOCHS = 15
STUDENT_EPOCHS = 15             # a student starts from fresh weights: it gets a teacher's training budget
MAX_STUDENT_DROP_POINTS = 5.0   # acceptance on a full run: distilled student + int8 vs float32 teacher
CALIBRATION_SAMPLES = 200


@dataclass
class Subject:
    """A teacher model with its labelled data and the training settings that suit it."""

    key: str
    label: str
    keras_path: Path
    train: object                  # converter.data.Dataset (labelled)
    evaluation: object             # converter.data.Dataset (labelled)
    calibration: object
    batch_size: int
    notes: list[str] = field(default_factory=list)


@dataclass
class Variant:
    name: str
    tflite: bytes
    train_s: float | None = None
    sparsity: float | None = None


# --------------------------------------------------------------------------- subjects

def _dataset(x: np.ndarray, y: np.ndarray, source: str):
    from converter.data import Dataset
    return Dataset(x=np.ascontiguousarray(x, np.float32), y=np.asarray(y, np.int64), source=source, total=len(x))


def digits_subject() -> Subject:
    from bench.converter_digits import trained_model
    from converter.examples import digits_data
    x_train, y_train, x_test, y_test = digits_data()
    return Subject("digits", "digits CNN", trained_model(),
                   _dataset(x_train, y_train, "digits train split"), _dataset(x_test, y_test, "digits test split"),
                   _dataset(x_train[:CALIBRATION_SAMPLES], y_train[:CALIBRATION_SAMPLES], "digits train split"),
                   batch_size=32,
                   notes=[f"digits CNN: 8x8x1, trained 15 epochs on {len(x_train)} digits, tested on {len(x_test)}"])


def colour_digits(x: np.ndarray, y: np.ndarray, copies: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits as 32x32 RGB scenes: scaled, placed at random, random colours, noise; values in [-1, 1]."""
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    size, digit = MOBILENET_SIZE, MOBILENET_DIGIT
    small = tf.image.resize(x, (digit, digit), method="bilinear").numpy()[..., 0]
    n = len(x) * copies
    index = np.tile(np.arange(len(x)), copies)
    foreground, background = rng.uniform(0.4, 1.0, (n, 3)), rng.uniform(0.0, 0.5, (n, 3))
    offsets = rng.integers(0, size - digit + 1, (n, 2))
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        canvas = np.zeros((size, size, 1), np.float32)
        top, left = offsets[i]
        canvas[top:top + digit, left:left + digit, 0] = small[index[i]]
        out[i] = canvas * foreground[i] + (1 - canvas) * background[i]
    out += rng.normal(0.0, 0.08, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0) * 2.0 - 1.0, np.tile(y, copies)


def mobilenet_subject(teacher_epochs: int) -> Subject:
    """MobileNetV2 trained on colour digits, once per (epochs, TF version), cached in bench/.cache/."""
    import keras

    from converter.examples import digits_data
    x_train, y_train, x_test, y_test = digits_data()
    xt, yt = colour_digits(x_train, y_train, MOBILENET_COPIES, seed=1)
    xe, ye = colour_digits(x_test, y_test, 1, seed=2)
    path = CACHE / f"mobilenetv2-{MOBILENET_SIZE}-colour-digits-e{teacher_epochs}-tf{tf_version()}.keras"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"training the MobileNetV2 teacher for {teacher_epochs} epochs (once; cached in bench/.cache/)")
        keras.utils.set_random_seed(0)

        def settle_faster(layer):
            config = layer.get_config()
            if type(layer).__name__ == "BatchNormalization":
                config["momentum"] = 0.9
            return layer.__class__.from_config(config)
        model = keras.models.clone_model(
            keras.applications.MobileNetV2(weights=None, input_shape=(MOBILENET_SIZE, MOBILENET_SIZE, 3),
                                           classes=10), clone_function=settle_faster)
        model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
        model.fit(xt, yt, epochs=teacher_epochs, batch_size=64, verbose=0)
        tmp = path.with_name(f"tmp-{os.getpid()}-{path.name}")
        model.save(tmp)
        os.replace(tmp, path)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(xt), CALIBRATION_SAMPLES, replace=False)
    return Subject("mobilenet", "MobileNetV2", path,
                   _dataset(xt, yt, "colour digits train"), _dataset(xe, ye, "colour digits test"),
                   _dataset(xt[pick], yt[pick], "colour digits train"), batch_size=64,
                   notes=[f"MobileNetV2: alpha 1.0, {MOBILENET_SIZE}x{MOBILENET_SIZE}x3, 10 classes, trained "
                          f"{teacher_epochs} epochs on {len(xt)} colour-digit images, tested on {len(xe)}"])


# --------------------------------------------------------------------------- the variants

def _convert(keras_path: Path, mode: str, calibration) -> bytes:
    from converter.models import load_source
    from converter.quantize import convert
    io = "int8" if mode == "int8" else "float32"
    conversion = convert(load_source(keras_path), mode=mode, input_type=io, output_type=io,
                         calibration=calibration if mode == "int8" else None,
                         runtime_min_version=RUNTIME_MIN_VERSION, progress=lambda _: None)
    return conversion.tflite


def read_back_sparsity(tflite: bytes) -> float:
    """Zero weights over all weight tensors of the converted model (converter.prune reads them)."""
    from converter.prune import tflite_sparsity
    layers = tflite_sparsity(tflite)
    total = sum(layer.params for layer in layers)
    return sum(layer.sparsity * layer.params for layer in layers) / total if total else 0.0


def make_variants(subject: Subject, epochs: int, student_epochs: int, work: Path,
                  progress: Callable[[str], None]) -> list[Variant]:
    """float32 and int8 of the teacher, then the pruned and distilled models trained now and converted to int8."""
    import keras

    from converter import distill
    from converter.models import load_source
    from converter.prune import prune_model
    out = [Variant("float32", _convert(subject.keras_path, "float32", None)),
           Variant("int8", _convert(subject.keras_path, "int8", subject.calibration))]
    out[0].sparsity, out[1].sparsity = read_back_sparsity(out[0].tflite), read_back_sparsity(out[1].tflite)
    source = load_source(subject.keras_path)
    teacher = source._model
    for name, target in PRUNE_TARGETS.items():
        progress(f"{subject.key}: pruning to {target:.0%} with {epochs} epoch(s) of fine-tuning")
        start = time.perf_counter()
        result = prune_model(teacher, target, subject.train, epochs=epochs, batch_size=subject.batch_size,
                             progress=lambda m: progress(f"{subject.key} {name}: {m}"))
        seconds = time.perf_counter() - start
        path = work / f"{subject.key}-pruned{int(target * 100)}.keras"
        result.model.save(path)
        tflite = _convert(path, "int8", subject.calibration)
        out.append(Variant(name, tflite, seconds, read_back_sparsity(tflite)))
    progress(f"{subject.key}: distilling a width={STUDENT_WIDTH:g} student for {student_epochs} epoch(s)")
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    student = distill.width_student(teacher, STUDENT_WIDTH, subject.label)
    logits, _ = distill.teacher_logits(source, subject.train.x)
    distill.train_student(student, logits, subject.train.x, subject.train.y, epochs=student_epochs,
                          batch_size=subject.batch_size,
                          progress=lambda m: progress(f"{subject.key} student: {m}"))
    seconds = time.perf_counter() - start
    path = work / f"{subject.key}-student.keras"
    student.save(path)
    tflite = _convert(path, "int8", subject.calibration)
    out.append(Variant("distilled student + int8", tflite, seconds, read_back_sparsity(tflite)))
    return out


# --------------------------------------------------------------------------- measuring

def litert_accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    from bench.converter_digits import litert_accuracy as accuracy
    return accuracy(model, x, y)


def alternating_latency(models: dict[str, bytes], x: np.ndarray, repeats: int, rounds: int = 10) -> dict[str, dict]:
    """Raw invoke latency of every model, timed in alternating rounds so load changes hit all alike."""
    from converter.runtimes import quantize_input
    calls = {}
    for name, model in models.items():
        interp = litert_interpreter(model, THREADS)
        call = raw_invoke(interp, quantize_input(x[:1], interp.get_input_details()[0]))
        for _ in range(5):
            call()
        calls[name] = call
    samples: dict[str, list[float]] = {name: [] for name in models}
    per_round = max(1, repeats // rounds)
    clock = time.perf_counter
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(per_round):
                start = clock()
                call()
                samples[name].append((clock() - start) * 1000.0)
    return {name: summary(values) for name, values in samples.items()}


def main(argv: Sequence[str] | None = None) -> int:
    def extra(parser) -> None:
        parser.add_argument("--epochs", type=int, default=None,
                            help="fine-tuning epochs of the pruned models (default 5; 1 with --quick)")
        parser.add_argument("--student-epochs", type=int, default=None,
                            help="distillation epochs of the students, which start from fresh weights "
                                 f"(default {STUDENT_EPOCHS}; 1 with --quick)")
        parser.add_argument("--teacher-epochs", type=int, default=MOBILENET_TEACHER_EPOCHS,
                            help="MobileNetV2 teacher's training epochs, cached "
                                 f"(default {MOBILENET_TEACHER_EPOCHS})")
        parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    epochs = args.epochs or (1 if args.quick else 5)
    student_epochs = args.student_epochs or (1 if args.quick else STUDENT_EPOCHS)
    repeats = 200 if args.quick else 2000
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown or not chosen:
        raise SystemExit(f"--models {args.models!r}: choose from {', '.join(MODELS)}")

    report = Report(f"compression vs float32 (pruning: {epochs} fine-tuning epoch(s), distillation: "
                    f"{student_epochs} epoch(s))",
                    ["model", "variant", "accuracy %", "Δ vs float32 pts", "file bytes", "size vs float32",
                     "zlib -9 bytes", "zlib vs float32", "weight sparsity %", "median ms", "latency vs float32",
                     "train s"])
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        for key in chosen:
            subject = digits_subject() if key == "digits" else mobilenet_subject(args.teacher_epochs)
            report.notes.extend(subject.notes)
            variants = make_variants(subject, epochs, student_epochs, Path(tmp), log)
            log(f"{key}: measuring accuracy, sizes and latency")
            latency = alternating_latency({v.name: v.tflite for v in variants}, subject.evaluation.x, repeats)
            rows = {}
            for v in variants:
                rows[v.name] = {"accuracy": litert_accuracy(v.tflite, subject.evaluation.x, subject.evaluation.y),
                                "bytes": len(v.tflite), "zlib_bytes": len(zlib.compress(v.tflite, ZLIB_LEVEL)),
                                "sparsity": v.sparsity, "latency": latency[v.name], "train_s": v.train_s}
            base = rows["float32"]
            for name, r in rows.items():
                report.add(subject.label if name == "float32" else "", name, r["accuracy"],
                           r["accuracy"] - base["accuracy"], r["bytes"], fmt_ratio(r["bytes"] / base["bytes"]),
                           r["zlib_bytes"], fmt_ratio(r["zlib_bytes"] / base["zlib_bytes"]),
                           100.0 * r["sparsity"], r["latency"]["median_ms"],
                           fmt_ratio(r["latency"]["median_ms"] / base["latency"]["median_ms"]), r["train_s"])
            results[key] = {"label": subject.label, "test_samples": len(subject.evaluation),
                            "train_samples": len(subject.train), "rows": rows}
            _verdicts(report, subject.key, rows)
    report.notes.append("accuracy: top-1 on the labelled test split in ai-edge-litert, outputs dequantized")
    report.notes.append("zlib vs float32 = compressed bytes / float32's compressed bytes; weight sparsity read back from "
                        "the .tflite weight tensors (an int8 weight is zero when it equals its zero point)")
    report.notes.append(f"latency: raw set_tensor/invoke/get_tensor in ai-edge-litert, {THREADS} threads, batch 1, "
                        f"{repeats} invokes per model in 10 alternating rounds")
    report.notes.append(f"pruned: converter.prune magnitude pruning with fine-tuning from the teacher's weights; "
                        f"student: converter.distill width={STUDENT_WIDTH:g} of the teacher, fresh weights, T=4, "
                        "alpha=0.9, Adam 0.002; train s = that training's wall time")
    report.data["results"] = results
    report.data["epochs"] = epochs
    report.data["student_epochs"] = student_epochs
    report.print(args.json)
    return 0 if all(p for _, p, _ in report.verdicts) else 1


def _verdicts(report: Report, key: str, rows: dict[str, dict]) -> None:
    for name, target in PRUNE_TARGETS.items():
        got = rows[name]["sparsity"]
        report.verdict(f"{key} {name} sparsity", got >= target - SPARSITY_TOLERANCE,
                       f"{got:.1%} of the weights are zero in the .tflite (target {target:.0%})")
    int8_zlib, p80_zlib = rows["int8"]["zlib_bytes"], rows["pruned 80% + int8"]["zlib_bytes"]
    report.verdict(f"{key} pruned 80% transfer", p80_zlib < int8_zlib,
                   f"compressed {p80_zlib} bytes vs int8's {int8_zlib} ({p80_zlib / int8_zlib:.1%})")
    drop = rows["float32"]["accuracy"] - rows["pruned 50% + int8"]["accuracy"]
    report.verdict(f"{key} pruned 50% accuracy", drop <= MAX_PRUNED50_DROP_POINTS,
                   f"drop {drop:.2f} points from float32's {rows['float32']['accuracy']:.2f}% "
                   f"(limit {MAX_PRUNED50_DROP_POINTS})")
    drop = rows["float32"]["accuracy"] - rows["distilled student + int8"]["accuracy"]
    report.verdict(f"{key} student accuracy", drop <= MAX_STUDENT_DROP_POINTS,
                   f"drop {drop:.2f} points from float32's {rows['float32']['accuracy']:.2f}% "
                   f"(limit {MAX_STUDENT_DROP_POINTS})")
    student, int8 = rows["distilled student + int8"]["bytes"], rows["int8"]["bytes"]
    report.verdict(f"{key} student size", student < int8,
                   f"student + int8 is {student} bytes, the teacher's int8 {int8} ({student / int8:.1%})")


if __name__ == "__main__":
    raise SystemExit(main())
