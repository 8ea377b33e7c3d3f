"""Knowledge distillation: train a smaller student on a teacher's softened outputs.

The loss is Hinton's: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(y, softmax(s))``
with ``t`` and ``s`` the teacher's and the student's logits. ``T^2`` keeps the soft term's
gradients on the same scale whatever the temperature. Data without labels leaves only the
soft term (``alpha = 1``).

Both models usually end in a softmax, so their logits are recovered first: from the input of
a final ``Softmax`` layer, or from the last layer run without its softmax activation (exact);
otherwise, when the outputs are probabilities (SavedModel and .tflite teachers), from their
log, which equals the logits up to a per-row constant that the softmax ignores. The teacher's
logits are computed once, before training; the teacher is never trained.

A student is a Keras model file (trained further from its own weights) or ``width=W``: the
teacher's architecture with every Conv/Dense layer's channels multiplied by W, except the
layers that produce the class scores, with fresh weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics
from .data import Dataset, load_dataset
from .errors import ConverterError, DataError, ModelInputError
from .models import KERAS_SUFFIXES, SourceModel, load_source

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

Progress = Callable[[str], None]

DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.9
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 2e-3
LATENCY_THREADS = 2                  # host latency of the float32 .tflite, ai-edge-litert
LATENCY_RUNTIME = "2.14"             # the float32 conversion must load in the oldest runtime litefleet supports
PREDICT_BATCH = 256
LOG_FLOOR = 1e-12                    # probabilities are clipped here before their log is taken

REPORT_FORMAT = "litefleet.distill-report"
REPORT_VERSION = 1

# Layers whose width the multiplier scales (the config key that holds it).
SCALED = {"Dense": "units", "Conv1D": "filters", "Conv2D": "filters", "Conv3D": "filters",
          "SeparableConv1D": "filters", "SeparableConv2D": "filters", "Conv1DTranspose": "filters",
          "Conv2DTranspose": "filters", "Conv3DTranspose": "filters"}
# Layers with weights whose shapes follow their input's channels, so they need no change.
FOLLOWING = {"DepthwiseConv1D", "DepthwiseConv2D", "BatchNormalization", "LayerNormalization", "PReLU"}


def _noop(_: str) -> None:
    pass


# The student's specification ------------------------------------------------------------

@dataclass(frozen=True)
class StudentSpec:
    """``--student``: a Keras model file, or a width multiplier on the teacher's architecture."""

    path: Path | None = None
    width: float | None = None

    def describe(self) -> str:
        return f"width={self.width:g} of the teacher's architecture" if self.width is not None else str(self.path)


def parse_student_spec(text: str) -> StudentSpec:
    """``width=0.5`` or a path to a ``.keras``/``.h5`` file; ModelInputError saying which forms exist."""
    text = (text or "").strip()
    if text.lower().startswith("width="):
        value = text.split("=", 1)[1]
        try:
            width = float(value)
        except ValueError:
            width = math.nan
        if not math.isfinite(width) or width <= 0:
            raise ModelInputError(f"--student {text!r}: the width multiplier must be a positive number, "
                                  "e.g. width=0.5")
        return StudentSpec(width=width)
    path = Path(text)
    if path.suffix.lower() not in KERAS_SUFFIXES:
        raise ModelInputError(f"--student {text!r}: expected a Keras model file (.keras or .h5) or a width "
                              "multiplier on the teacher's architecture, e.g. width=0.5")
    if not path.is_file():
        raise ModelInputError(f"--student {text!r}: no such file (for a smaller copy of the teacher's "
                              "architecture use width=0.5)")
    return StudentSpec(path=path)


def _layers_to_outputs(model) -> set[str]:
    """Names of the scaled layers that produce the model's outputs (their width is the class count).

    Walks back from each output through layers that do not set a width (activations, pooling,
    reshapes, normalizations) until it meets a Dense or Conv layer on every branch.
    """
    keep: set[str] = set()
    seen: set[int] = set()
    stack = [t._keras_history.operation for t in model.outputs]
    while stack:
        op = stack.pop()
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        if type(op).__name__ in SCALED:
            keep.add(op.name)
            continue
        for node in getattr(op, "_inbound_nodes", []):
            stack.extend(t._keras_history.operation for t in node.input_tensors)
    return keep


def width_student(teacher, width: float, teacher_label: str = "the teacher"):
    """The teacher's architecture with Conv/Dense widths times ``width`` (at least 1), fresh weights.

    ModelInputError naming the layers when the multiplier is not defined for the architecture
    (layers with weights other than Conv/Dense/DepthwiseConv/normalization, nested models, or
    shapes that stop fitting once the widths change).
    """
    import keras
    unsupported = [f"{layer.name} ({type(layer).__name__})" for layer in teacher.layers
                   if layer.weights and type(layer).__name__ not in SCALED and type(layer).__name__ not in FOLLOWING]
    if unsupported:
        raise ModelInputError(
            f"--student width={width:g}: the width multiplier is defined for chains of Conv, Dense, DepthwiseConv "
            f"and normalization layers; {teacher_label} also has {', '.join(unsupported[:5])}"
            f"{' and more' if len(unsupported) > 5 else ''}: pass a student model file (.keras) instead")
    keep = _layers_to_outputs(teacher)

    def scaled(layer):
        config = layer.get_config()
        key = SCALED.get(type(layer).__name__)
        if key and layer.name not in keep:
            config[key] = max(1, int(round(config[key] * width)))
        return layer.__class__.from_config(config)

    try:
        student = keras.models.clone_model(teacher, clone_function=scaled)
    except Exception as exc:  # noqa: BLE001 - any shape conflict means the multiplier does not apply
        raise ModelInputError(f"--student width={width:g}: {teacher_label}'s architecture does not take a width "
                              f"multiplier ({_first_line(exc)}); pass a student model file (.keras) instead") from None
    return student


# Logits -------------------------------------------------------------------------------------

@dataclass
class LogitsView:
    """How to get a Keras model's logits: ``fn(x, training)`` and a phrase for the report."""

    fn: Callable[..., Any]
    how: str
    raw_outputs: bool = False     # no softmax found: the outputs are logits, or probabilities to take the log of


def _activation_name(layer) -> str:
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") if activation is not None else ""


def logits_view(model) -> LogitsView:
    """The logits of a single-output Keras classifier, sharing its weights (so the student can train through it)."""
    import keras
    last = model.outputs[0]._keras_history.operation
    if isinstance(last, keras.layers.Softmax) or (type(last).__name__ == "Activation"
                                                  and _activation_name(last) == "softmax"):
        body = keras.Model(model.inputs, last.input)
        return LogitsView(lambda x, training=False: body(x, training=training),
                          f"the input of its softmax layer {last.name!r}")
    if _activation_name(last) == "softmax" and hasattr(last, "activation"):
        body = keras.Model(model.inputs, last.input)

        def fn(x, training=False):
            # The layer's own weights, run once without its softmax (read when traced).
            saved = last.activation
            last.activation = keras.activations.linear
            try:
                return last(body(x, training=training))
            finally:
                last.activation = saved
        return LogitsView(fn, f"layer {last.name!r} without its softmax")
    return LogitsView(lambda x, training=False: model(x, training=training), "its outputs (taken as logits)",
                      raw_outputs=True)


def looks_like_probabilities(outputs: np.ndarray) -> bool:
    """Rows of non-negative numbers summing to 1: a softmax output rather than logits."""
    outputs = np.asarray(outputs, dtype=np.float64)
    return bool(outputs.size and outputs.min() >= 0.0 and outputs.max() <= 1.0 + 1e-6
                and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3))


def probabilities_to_logits(probs: np.ndarray) -> np.ndarray:
    """log(p): the logits up to a per-row constant, which softmax(·/T) ignores for any T."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), LOG_FLOOR, None)).astype(np.float32)


def teacher_logits(source: SourceModel, x: np.ndarray) -> tuple[np.ndarray, str]:
    """(logits of shape (N, classes), how they were read) for every sample, computed once."""
    model = source._model if source.kind in ("keras", "h5") else None
    if model is not None:
        view = logits_view(model)
        if not view.raw_outputs:
            import tensorflow as tf
            out = [np.asarray(view.fn(tf.constant(x[i:i + PREDICT_BATCH]), training=False), dtype=np.float32)
                   for i in range(0, len(x), PREDICT_BATCH)]
            return _classes(np.concatenate(out), source.path), view.how
    out = _classes(source.reference_predict(x), source.path)
    if looks_like_probabilities(out):
        return probabilities_to_logits(out), "the log of its output probabilities"
    return out, "its outputs (already logits)"


def _classes(outputs: np.ndarray, where: Path) -> np.ndarray:
    outputs = np.asarray(outputs, dtype=np.float32)
    flat = outputs.reshape(len(outputs), -1)
    if flat.shape[1] < 2:
        raise ModelInputError(f"{where}: the output has shape {tuple(outputs.shape[1:])} per sample; distillation "
                              "needs a classifier with one score per class (at least 2)")
    return flat


# The loss -----------------------------------------------------------------------------------

def distillation_loss(teacher_logits, student_logits, labels=None, *, temperature: float, alpha: float):
    """(total, soft, hard) batch means of Hinton's loss; ``labels`` None means alpha must be 1.

    soft = KL(softmax(t/T) || softmax(s/T)), hard = CE(labels, softmax(s)),
    total = alpha * T^2 * soft + (1 - alpha) * hard.
    """
    import tensorflow as tf
    t = tf.convert_to_tensor(teacher_logits, tf.float32) / temperature
    s = tf.convert_to_tensor(student_logits, tf.float32)
    log_pt = tf.nn.log_softmax(t, axis=-1)
    log_ps = tf.nn.log_softmax(s / temperature, axis=-1)
    soft = tf.reduce_mean(tf.reduce_sum(tf.exp(log_pt) * (log_pt - log_ps), axis=-1))
    if labels is None:
        hard = tf.constant(0.0)
    else:
        hard = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=s))
    total = alpha * temperature * temperature * soft + (1.0 - alpha) * hard
    return total, soft, hard


def check_settings(*, temperature: float, alpha: float, epochs: int, batch_size: int, learning_rate: float) -> None:
    """ConverterError naming the option when a setting is out of range."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConverterError(f"--temperature {temperature:g}: must be a positive number "
                             f"(default {DEFAULT_TEMPERATURE:g})")
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ConverterError(f"--alpha {alpha:g}: must be between 0 and 1 (the weight of the teacher's soft targets; "
                             f"default {DEFAULT_ALPHA:g})")
    if epochs < 1:
        raise ConverterError(f"--epochs {epochs}: must be at least 1")
    if batch_size < 1:
        raise ConverterError(f"--batch-size {batch_size}: must be at least 1")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ConverterError(f"--learning-rate {learning_rate:g}: must be a positive number")


def resolve_alpha(alpha: float | None, labelled: bool, data_label: str) -> tuple[float, str | None]:
    """(alpha to use, note): the default depends on labels; asking for labels that are not there is an error."""
    if labelled:
        return (DEFAULT_ALPHA if alpha is None else alpha), None
    if alpha is None or alpha == 1.0:
        return 1.0, f"{data_label} has no labels: pure distillation from the teacher's outputs (alpha = 1)"
    raise DataError(f"{data_label} has no labels (no array 'y' or class sub-folders), so the student can learn only "
                    f"from the teacher: --alpha {alpha:g} asks for {1 - alpha:.0%} of the loss from labels. "
                    "Pass --alpha 1 for pure distillation, or labelled data")


def train_student(student, soft_targets: np.ndarray, x: np.ndarray, y: np.ndarray | None, *,
                  epochs: int = DEFAULT_EPOCHS, temperature: float = DEFAULT_TEMPERATURE,
                  alpha: float = DEFAULT_ALPHA, batch_size: int = DEFAULT_BATCH_SIZE,
                  learning_rate: float = DEFAULT_LEARNING_RATE, seed: int = 0,
                  progress: Progress = _noop) -> tuple[list[dict[str, float]], str]:
    """Train ``student`` in place on the teacher's logits ``soft_targets``.

    Returns (per-epoch losses, how the student's logits were read).
    """
    import keras
    import tensorflow as tf
    if y is None and alpha != 1.0:
        raise DataError("the training data has no labels: distillation without labels needs alpha = 1")
    view = logits_view(student)
    if view.raw_outputs:
        head = x[:PREDICT_BATCH]
        sample = np.asarray(student(head, training=False), dtype=np.float32).reshape(len(head), -1)
        if looks_like_probabilities(sample):
            plain = view.fn

            def log_of(xb, training=False):
                return tf.math.log(tf.maximum(plain(xb, training=training), LOG_FLOOR))
            view = LogitsView(log_of, "the log of its output probabilities")
    labels = np.zeros(len(x), np.int64) if y is None else np.asarray(y, np.int64)
    data = (tf.data.Dataset.from_tensor_slices((x.astype(np.float32), soft_targets.astype(np.float32), labels))
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(batch_size))
    optimizer = keras.optimizers.Adam(learning_rate)
    variables = student.trainable_variables
    use_labels = y is not None and alpha < 1.0

    @tf.function(reduce_retracing=True)
    def step(xb, tb, yb):
        with tf.GradientTape() as tape:
            s = tf.reshape(view.fn(xb, training=True), [tf.shape(xb)[0], -1])
            total, soft, hard = distillation_loss(tb, s, yb if use_labels else None,
                                                  temperature=temperature, alpha=alpha)
            if student.losses:
                total = total + tf.add_n(student.losses)
        grads = tape.gradient(total, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return total, soft, hard

    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        sums = np.zeros(3)
        batches = 0
        for xb, tb, yb in data:
            sums += [float(v) for v in step(xb, tb, yb)]
            batches += 1
        loss, soft, hard = sums / max(1, batches)
        record = {"epoch": epoch, "loss": loss, "soft": soft, "hard": hard if use_labels else None,
                  "seconds": time.perf_counter() - start}
        history.append(record)
        hard_text = f", labels {hard:.4f}" if use_labels else ""
        progress(f"epoch {epoch}/{epochs}: loss {loss:.4f} (teacher KL {soft:.4f}{hard_text}), "
                 f"{record['seconds']:.1f} s")
    return history, view.how


# Measuring both models ----------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def parameter_count(source: SourceModel) -> int | None:
    """Weights of a Keras or SavedModel source (None for a .tflite, whose constants are not only weights)."""
    if source.kind in ("keras", "h5"):
        return int(source._model.count_params())
    variables = getattr(source._keepalive, "variables", None)
    if source.kind == "savedmodel" and variables:
        return int(sum(int(np.prod(v.shape)) for v in variables))
    return None


def file_bytes(path: Path) -> int:
    """Size on disk: a file, or every file under a SavedModel directory."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def float_tflite(source: SourceModel) -> bytes:
    """The model as the converter makes a float32 .tflite (a .tflite source as it is)."""
    from .quantize import convert
    conversion = convert(source, mode="float32", input_type="float32", output_type="float32", calibration=None,
                         runtime_min_version=LATENCY_RUNTIME, progress=_noop)
    return conversion.tflite


def measure(source: SourceModel, evaluation: Dataset, notes: list[str], role: str) -> dict[str, Any]:
    """Parameters, sizes, accuracy with per-class figures, and float32 .tflite latency of one model."""
    from .validate import measure_latency
    outputs = np.asarray(source.reference_predict(evaluation.x), dtype=np.float32)
    predicted = metrics.top1(outputs)
    facts: dict[str, Any] = {"path": str(source.path), "kind": source.kind, "parameters": parameter_count(source),
                             "file_bytes": file_bytes(source.path), "predictions": predicted}
    if evaluation.y is not None:
        facts["accuracy"] = metrics.accuracy(evaluation.y, predicted)
    try:
        tflite = float_tflite(source)
        facts["tflite_float32_bytes"] = len(tflite)
        latency = measure_latency(tflite, LATENCY_THREADS, evaluation.x[0].astype(np.float32))
        facts["latency"] = {k: latency[k] for k in ("median_ms", "p90_ms", "runs", "threads", "runtime")}
    except Exception as exc:  # noqa: BLE001 - the comparison still stands without latency
        facts["tflite_float32_bytes"] = None
        facts["latency"] = None
        notes.append(f"{role}: no float32 .tflite latency ({_first_line(exc)})")
    return facts


def _ratio(student: float | None, teacher: float | None) -> float | None:
    return None if student is None or not teacher else student / teacher


# The whole command --------------------------------------------------------------------------

@dataclass
class DistillResult:
    """The student written to ``path`` and the report comparing it with its teacher."""

    path: Path
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _check_output(out: Path, teacher: Path, spec: StudentSpec) -> None:
    if out.suffix.lower() not in KERAS_SUFFIXES:
        raise ConverterError(f"-o {out}: the student is written as a Keras model; use a .keras (or .h5) file name")
    if out.is_dir():
        raise ConverterError(f"-o {out}: is a directory; give the student's file name, e.g. {out / 'student.keras'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConverterError(f"-o {out}: {out.parent} is not a directory")
    for other, what in ((teacher, "the teacher"), (spec.path, "the student model file")):
        if other is not None and Path(other).exists() and out.exists() and out.resolve() == Path(other).resolve():
            raise ConverterError(f"-o {out}: is {what}; write the student to a new file")


def _load_student_file(spec: StudentSpec, teacher: SourceModel) -> Any:
    import keras
    try:
        model = keras.models.load_model(spec.path, compile=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelInputError(f"--student {spec.path}: cannot load as a Keras model ({_first_line(exc)})") from None
    if len(getattr(model, "inputs", None) or []) != 1 or len(model.outputs) != 1:
        raise ModelInputError(f"--student {spec.path}: has {len(model.inputs or [])} input(s) and "
                              f"{len(model.outputs)} output(s); a student has one of each, like its teacher")
    shape = tuple(model.inputs[0].shape[1:])
    if shape != tuple(teacher.input_shape[1:]):
        raise ModelInputError(f"--student {spec.path}: takes inputs of shape {shape}, the teacher "
                              f"{tuple(teacher.input_shape[1:])}; the student must read the same data")
    return model


def _check_labels(data: Dataset, classes: int, label: str) -> None:
    if data.y is None or not len(data.y):
        return
    bad = np.flatnonzero((data.y < 0) | (data.y >= classes))
    if len(bad):
        raise DataError(f"{label}: label {int(data.y[bad[0]])} at index {int(bad[0])} is not one of the teacher's "
                        f"{classes} classes (0-{classes - 1})")


def distill(teacher_path: str | Path, student: str | StudentSpec, data_path: str | Path, out_path: str | Path, *,
            epochs: int = DEFAULT_EPOCHS, temperature: float = DEFAULT_TEMPERATURE, alpha: float | None = None,
            batch_size: int = DEFAULT_BATCH_SIZE, learning_rate: float = DEFAULT_LEARNING_RATE,
            eval_path: str | Path | None = None, seed: int = 0, progress: Progress = _noop) -> DistillResult:
    """Distil ``teacher_path`` into the student, write it atomically to ``out_path`` and compare the two.

    Everything cheap is checked before training (options, output name, student spec, data and
    labels), so a typo fails in seconds; nothing is written unless the whole run succeeds.
    """
    out = Path(out_path)
    teacher_path = Path(teacher_path)
    spec = student if isinstance(student, StudentSpec) else parse_student_spec(student)
    check_settings(temperature=temperature, alpha=1.0 if alpha is None else alpha, epochs=epochs,
                   batch_size=batch_size, learning_rate=learning_rate)
    _check_output(out, teacher_path, spec)
    progress(f"loading the teacher {teacher_path}")
    teacher = load_source(teacher_path)
    if len(teacher.output_names) != 1:
        raise ModelInputError(f"{teacher_path}: the model has {len(teacher.output_names)} outputs "
                              f"({', '.join(teacher.output_names)}); distillation needs a classifier with one output")
    train = load_dataset(data_path, teacher.input_shape, purpose="training")
    alpha, alpha_note = resolve_alpha(alpha, train.y is not None, f"--data {data_path}")
    notes = [alpha_note] if alpha_note else []
    if eval_path is not None:
        evaluation = load_dataset(eval_path, teacher.input_shape, purpose="evaluation")
    else:
        evaluation = train
        notes.append("no --eval data: both models were measured on the training data, which flatters the student")

    import keras
    keras.utils.set_random_seed(seed)
    if spec.width is not None:
        if teacher.kind not in ("keras", "h5"):
            raise ModelInputError(f"--student width={spec.width:g} needs the teacher's Keras architecture; "
                                  f"{teacher_path} is a {teacher.kind}: pass a student model file (.keras) instead")
        model = width_student(teacher._model, spec.width, str(teacher_path))
    else:
        model = _load_student_file(spec, teacher)
    progress(f"computing the teacher's logits on {len(train)} training samples")
    soft_targets, teacher_how = teacher_logits(teacher, train.x)
    classes = soft_targets.shape[1]
    _check_labels(train, classes, f"--data {data_path}")
    _check_labels(evaluation, classes, f"--eval {eval_path}")
    student_classes = int(np.prod(model.outputs[0].shape[1:]))
    if student_classes != classes:
        raise ModelInputError(f"--student {spec.describe()}: gives {student_classes} scores per sample, the teacher "
                              f"{classes}; the student must predict the same classes")
    warnings: list[str] = []
    teacher_params, student_params = parameter_count(teacher), int(model.count_params())
    if teacher_params is not None and student_params > teacher_params:
        warnings.append(f"the student ({spec.describe()}) has {student_params:,} parameters, more than the "
                        f"teacher's {teacher_params:,}: distillation usually trains a smaller model")
        progress(f"warning: {warnings[-1]}")

    progress(f"distilling for {epochs} epoch(s): temperature {temperature:g}, alpha {alpha:g}, "
             f"{len(train)} samples, batch {batch_size}")
    history, student_how = train_student(model, soft_targets, train.x, train.y if alpha < 1.0 else None,
                                         epochs=epochs, temperature=temperature, alpha=alpha, batch_size=batch_size,
                                         learning_rate=learning_rate, seed=seed, progress=progress)

    tmp = out.parent / f".{out.stem}.tmp-{os.getpid()}{out.suffix}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save(tmp)
        progress(f"measuring teacher and student on {evaluation.describe()}")
        saved = load_source(tmp)          # what is measured is what was written
        teacher_facts = measure(teacher, evaluation, notes, "teacher")
        student_facts = measure(saved, evaluation, notes, "student")
        student_facts["path"] = str(out)
        doc = report(teacher_facts, student_facts, evaluation, train, spec=spec, settings={
            "temperature": temperature, "alpha": alpha, "epochs": epochs, "batch_size": batch_size,
            "learning_rate": learning_rate, "seed": seed, "teacher_logits": teacher_how,
            "student_logits": student_how}, history=history, warnings=warnings, notes=notes)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return DistillResult(path=out, report=doc, warnings=warnings)


def report(teacher: dict[str, Any], student: dict[str, Any], evaluation: Dataset, train: Dataset, *,
           spec: StudentSpec, settings: dict[str, Any], history: list[dict[str, float]],
           warnings: list[str], notes: list[str]) -> dict[str, Any]:
    """The comparison document printed by ``litefleet distill`` (and with ``--json``)."""
    y = evaluation.y
    t_pred, s_pred = teacher.pop("predictions"), student.pop("predictions")
    per_class: dict[str, Any] = {}
    if y is not None:
        labels = np.union1d(y, np.union1d(t_pred, s_pred))
        for role, facts, pred in (("teacher", teacher, t_pred), ("student", student, s_pred)):
            cr = metrics.class_report(y, pred, labels)
            facts["macro"] = cr.macro
            per_class[role] = cr.to_dict()["per_class"]
    latency = (lambda f: f["latency"]["median_ms"] if f.get("latency") else None)
    ratios = {
        "parameters": _ratio(student["parameters"], teacher["parameters"]),
        "file_bytes": _ratio(student["file_bytes"], teacher["file_bytes"]),
        "tflite_float32_bytes": _ratio(student.get("tflite_float32_bytes"), teacher.get("tflite_float32_bytes")),
        "latency_median_ms": _ratio(latency(student), latency(teacher)),
    }
    return {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION, "ok": True,
        "student_spec": spec.describe(), "settings": settings,
        "training": {"data": train.describe(), "labels": train.y is not None, "history": history},
        "evaluation": {"data": evaluation.describe(), "labels": y is not None, "samples": len(evaluation),
                       "top1_agreement": metrics.accuracy(t_pred, s_pred)},
        "teacher": teacher, "student": student, "student_vs_teacher": ratios, "per_class": per_class,
        "warnings": warnings, "notes": notes,
    }
