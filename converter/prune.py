"""Magnitude pruning with a sparsity schedule, done in Keras 3 itself.

TensorFlow 2.21 loads models with Keras 3, which tensorflow-model-optimization cannot wrap
(it needs tf-keras models, and tf-keras cannot read Keras 3 files). Keras 2 ``.h5`` files go
through tfmot itself (:mod:`converter.prune_tfmot`); for everything else the same algorithm is
applied here with masks: the sparsity rises from 0 to the target along tfmot's PolynomialDecay
(power 3) over the first two thirds of the fine-tuning steps; at each scheduled step the
smallest-magnitude weights of every kernel are masked, and after every optimizer step the
masks are applied again so a pruned weight stays exactly zero. The last third of the steps
lets the network recover at the final sparsity.

The fine-tuning loop is written with ``tf.GradientTape`` rather than ``model.fit`` so the
same loop prunes a SavedModel's variables in place (Keras 3 cannot load a SavedModel back as
a Keras model, but its serving function is differentiable). Structured pruning
(whole filters and units) lives in :mod:`converter.structured`.

What is pruned: every weight named ``kernel``, ``depthwise_kernel``, ``pointwise_kernel``,
``recurrent_kernel`` or ``embeddings`` (Conv, Dense, DepthwiseConv, SeparableConv, RNN,
Embedding layers); biases and normalisation parameters are left alone, as tfmot does. A
layer with any other multi-dimensional weight is refused by name, because its weights
cannot be pruned without knowing what they mean.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import Dataset
from .errors import ConverterError, DataError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

Progress = Callable[[str], None]
PRUNABLE_WEIGHTS = ("kernel", "depthwise_kernel", "pointwise_kernel", "recurrent_kernel", "embeddings")
SCHEDULE_POWER = 3.0            # tfmot PolynomialDecay's default
SCHEDULE_END = 2 / 3            # share of the fine-tuning steps over which the sparsity rises
SCHEDULE_UPDATES = 10           # mask recomputations along the rise
LEARNING_RATE = 1e-3


class PruneError(ConverterError):
    """The model cannot be pruned as asked: bad sparsity, nothing prunable, unprunable layers."""


@dataclass(frozen=True)
class LayerSparsity:
    """Sparsity of one weight tensor."""

    name: str          # Keras layer name (or TFLite tensor name when read back)
    kind: str          # "Conv2D", "Dense", ... (or the TFLite op)
    sparsity: float    # fraction of weights that are exactly zero
    params: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "sparsity": round(float(self.sparsity), 6),
                "params": int(self.params)}


@dataclass(frozen=True)
class ChannelChange:
    """What structured pruning did to one layer: output channels (filters or units) before and after."""

    name: str
    kind: str
    before: int
    after: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "channels_before": self.before, "channels_after": self.after}


@dataclass
class PruneResult:
    """A pruned model and what was measured on it.

    ``model`` is a ``keras.Model`` for Keras sources; for a SavedModel it is the loaded
    SavedModel object whose variables were pruned in place (see :func:`prune_savedmodel`).
    """

    model: Any                    # pruned, masks stripped, ready for the converter
    target: float
    structured: bool
    layers: list[LayerSparsity]   # measured on the weights after fine-tuning
    history: dict[str, list[float]]
    channels: list[ChannelChange] = field(default_factory=list)   # structured pruning only
    params_before: int = 0
    params_after: int = 0
    schedule: dict[str, Any] = field(default_factory=dict)
    fine_tuning: dict[str, Any] = field(default_factory=dict)
    tool: str = ""                # "tensorflow-model-optimization ..." when tfmot pruned it, else "" (masks)
    tool_note: str = ""           # why tfmot was not used, when it was not

    @property
    def sparsity(self) -> float:
        """Zero weights over all pruned tensors together."""
        total = sum(layer.params for layer in self.layers)
        return sum(layer.sparsity * layer.params for layer in self.layers) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "structured": self.structured, "method": self.method,
                "tool": self.tool or "keras 3 masks (converter/prune.py)", "tool_note": self.tool_note,
                "sparsity": round(self.sparsity, 6), "layers": [layer.to_dict() for layer in self.layers],
                "channels": [c.to_dict() for c in self.channels], "params_before": self.params_before,
                "params_after": self.params_after, "schedule": dict(self.schedule),
                "fine_tuning": dict(self.fine_tuning),
                "history": {k: [_finite(v) for v in vs] for k, vs in self.history.items()}}

    @property
    def method(self) -> str:
        if self.structured:
            return "structured: whole filters/units with the smallest L1 norm removed, narrower model rebuilt"
        if self.tool:
            return f"magnitude pruning, polynomial-decay schedule, {self.tool} prune_low_magnitude while fine-tuning"
        return "magnitude pruning, polynomial-decay schedule, masks applied in Keras 3 during fine-tuning"


def _finite(value: float) -> float | None:
    """A JSON-safe number: a diverged loss (NaN, inf) is reported as null, not as invalid JSON."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


# Checks ----------------------------------------------------------------------------------

def check_sparsity(sparsity: Any, flag: str = "--prune") -> float:
    """The sparsity as a float strictly between 0 and 1, or PruneError saying what was given."""
    if isinstance(sparsity, bool):
        raise PruneError(f"{flag} {sparsity!r}: the sparsity must be a number between 0 and 1 (exclusive), "
                         "e.g. 0.5 for half the weights")
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise PruneError(f"{flag} {sparsity!r}: not a number; give the fraction of weights to remove, "
                         "between 0 and 1 (exclusive), e.g. 0.5") from None
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        hint = " (a percentage? use 0.5 for 50%)" if 1.0 < value <= 100.0 else ""
        raise PruneError(f"{flag} {sparsity}: the sparsity must be between 0 and 1, exclusive{hint}")
    return value


def check_training(epochs: int, batch_size: int) -> None:
    for name, value in (("--epochs", epochs), ("batch size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PruneError(f"{name} {value!r}: must be a positive integer")


def check_labels(train: Dataset | None, purpose: str = "fine-tuning") -> None:
    """Fine-tuning is supervised: the data must carry labels (``y`` in the .npz, or class folders)."""
    if train is not None and train.y is None:
        raise DataError(f"{purpose} data {train.source} has no labels; pruning fine-tunes on labelled data: "
                        "save the labels as array 'y' in the .npz (or put images in one sub-folder per class)")


# The schedule and the masks --------------------------------------------------------------

@dataclass(frozen=True)
class PolynomialDecay:
    """tfmot's PolynomialDecay: s(t) = target * (1 - (1 - (t - begin) / (end - begin)) ** power)."""

    target: float
    begin_step: int
    end_step: int
    frequency: int = 1
    power: float = SCHEDULE_POWER

    @classmethod
    def over(cls, target: float, total_steps: int) -> PolynomialDecay:
        """A rise over the first SCHEDULE_END of ``total_steps`` with about SCHEDULE_UPDATES mask updates."""
        end = max(1, int(round(total_steps * SCHEDULE_END)))
        return cls(target=target, begin_step=0, end_step=end, frequency=max(1, end // SCHEDULE_UPDATES))

    def sparsity(self, step: int) -> float:
        if step >= self.end_step:
            return self.target
        if step <= self.begin_step:
            return 0.0
        progress = (step - self.begin_step) / (self.end_step - self.begin_step)
        return self.target * (1.0 - (1.0 - progress) ** self.power)

    def updates_at(self, step: int) -> bool:
        """Whether the masks are recomputed before ``step`` (0-based optimizer steps)."""
        if step < self.begin_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.begin_step) % self.frequency == 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "polynomial_decay", "initial_sparsity": 0.0, "final_sparsity": self.target,
                "begin_step": self.begin_step, "end_step": self.end_step, "frequency": self.frequency,
                "power": self.power}


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """1 where a weight is kept, 0 for the ``round(sparsity * size)`` smallest by magnitude."""
    flat = np.abs(np.asarray(weights)).ravel()
    k = int(round(sparsity * flat.size))
    mask = np.ones(flat.size, dtype=np.float32)
    if k > 0:
        mask[np.argpartition(flat, k - 1)[:k]] = 0.0
    return mask.reshape(np.shape(weights))


@dataclass
class _Target:
    """One weight tensor to prune and its mask (a variable, so the compiled step never retraces)."""

    variable: Any
    layer: str
    kind: str
    mask: Any = None

    def update(self, sparsity: float) -> None:
        self.mask.assign(magnitude_mask(np.asarray(self.variable.numpy()), sparsity).astype(self.mask.dtype.name))
        self.apply()

    def apply(self) -> None:
        self.variable.assign(self.variable * self.mask)

    def measure(self) -> LayerSparsity:
        values = np.asarray(self.variable.numpy())
        return LayerSparsity(self.layer, self.kind, float(np.mean(values == 0)) if values.size else 0.0,
                             int(values.size))


# Finding what to prune -------------------------------------------------------------------

def _leaf_layers(model) -> list:
    """Every layer that is not itself a model, in order, looking inside nested models."""
    import keras
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model) or (hasattr(layer, "layers") and type(layer).__name__ in
                                               ("Sequential", "Functional")):
            out.extend(_leaf_layers(layer))
        elif type(layer).__name__ != "InputLayer":
            out.append(layer)
    return out


def _short(variable) -> str:
    name = getattr(variable, "name", "") or ""
    return name.split("/")[-1].split(":")[0]


def keras_targets(model) -> list[_Target]:
    """The kernels of a Keras model; PruneError naming the layers that hold weights we cannot prune."""
    targets: list[_Target] = []
    refused: list[str] = []
    for layer in _leaf_layers(model):
        kind = type(layer).__name__
        unknown = [v for v in layer.weights if len(v.shape) >= 2 and _short(v) not in PRUNABLE_WEIGHTS]
        if unknown:
            refused.append(f"{layer.name} ({kind}: {', '.join(_short(v) for v in unknown)})")
            continue
        kernels = [v for v in layer.weights if len(v.shape) >= 2 and _short(v) in PRUNABLE_WEIGHTS]
        for v in kernels:
            name = layer.name if len(kernels) == 1 else f"{layer.name}/{_short(v)}"
            targets.append(_Target(v, name, kind))
    if refused:
        raise PruneError(f"model {model.name!r}: cannot prune layer(s) {'; '.join(refused)}: only kernels of "
                         f"Conv, Dense, DepthwiseConv, SeparableConv, RNN and Embedding layers "
                         f"({', '.join(PRUNABLE_WEIGHTS)}) can be pruned")
    if not targets:
        kinds = sorted({type(layer).__name__ for layer in _leaf_layers(model)}) or ["none"]
        raise PruneError(f"model {model.name!r} has no prunable layers (it has: {', '.join(kinds)}); pruning "
                         "removes weights of Conv, Dense, DepthwiseConv, SeparableConv, RNN and Embedding layers")
    return targets


_SAVEDMODEL_KINDS = {"depthwise_kernel": "DepthwiseConv2D", "pointwise_kernel": "SeparableConv2D",
                     "recurrent_kernel": "RNN", "embeddings": "Embedding"}
_KERNEL_KINDS = {2: "Dense", 3: "Conv1D", 4: "Conv2D", 5: "Conv3D"}


def savedmodel_targets(loaded, where: str) -> list[_Target]:
    """The kernels of a loaded SavedModel, found by variable name (the layer kind is inferred)."""
    targets: list[_Target] = []
    refused: list[str] = []
    for v in loaded.trainable_variables:
        if len(v.shape) < 2:
            continue
        full = v.name.split(":")[0]
        short = _short(v)
        if short not in PRUNABLE_WEIGHTS:
            refused.append(full)
            continue
        layer = full.rsplit("/", 1)[0] if "/" in full else full
        kind = _SAVEDMODEL_KINDS.get(short) or _KERNEL_KINDS.get(len(v.shape), "kernel")
        targets.append(_Target(v, layer if short == "kernel" else f"{layer}/{short}", kind))
    if refused:
        raise PruneError(f"{where}: cannot prune variable(s) {', '.join(refused)}: only kernels "
                         f"({', '.join(PRUNABLE_WEIGHTS)}) can be pruned")
    if not targets:
        raise PruneError(f"{where}: the SavedModel has no prunable (trainable kernel) variables")
    return targets


# Fine-tuning -----------------------------------------------------------------------------

class _Adam:
    """Adam on plain variables.

    Keras 3 optimizers name their slots after the variable, and a SavedModel's variables have
    names (``conv2d/kernel:0``) that Keras refuses as scope names; so this loop keeps its own.
    """

    def __init__(self, variables: list, learning_rate: float, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-7) -> None:
        import tensorflow as tf
        self.variables = variables
        self.lr, self.beta1, self.beta2, self.epsilon = learning_rate, beta1, beta2, epsilon
        self.m = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in variables]
        self.v = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in variables]
        self.t = tf.Variable(0.0, trainable=False)

    def apply(self, grads: list) -> None:
        import tensorflow as tf
        self.t.assign_add(1.0)
        correction = tf.sqrt(1.0 - self.beta2 ** self.t) / (1.0 - self.beta1 ** self.t)
        for var, grad, m, v in zip(self.variables, grads, self.m, self.v):
            if grad is None:
                continue
            grad = tf.convert_to_tensor(grad)
            m.assign(self.beta1 * m + (1.0 - self.beta1) * grad)
            v.assign(self.beta2 * v + (1.0 - self.beta2) * tf.square(grad))
            var.assign_sub(self.lr * correction * m / (tf.sqrt(v) + self.epsilon))


def _loss_for(outputs: np.ndarray, where: str):
    """A loss that fits the model's output: probabilities or logits over classes."""
    import keras
    if outputs.ndim != 2:
        raise PruneError(f"{where}: fine-tuning needs a classifier with output (N, classes), the model's output "
                         f"has shape {tuple(outputs.shape)}")
    in_unit = bool(np.all(outputs >= -1e-6) and np.all(outputs <= 1 + 1e-6))
    if outputs.shape[1] == 1:
        return keras.losses.BinaryCrossentropy(from_logits=not in_unit), True
    probabilities = in_unit and bool(np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3))
    return keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities), False


def _predicted(outputs, binary: bool) -> np.ndarray:
    out = np.asarray(outputs)
    return (out[:, 0] > (0.5 if np.all((out >= 0) & (out <= 1)) else 0.0)).astype(np.int64) if binary \
        else np.argmax(out, axis=1)


def check_label_range(train: Dataset, validation: Dataset | None, classes: int) -> None:
    """DataError naming the file whose labels do not fit the model's ``classes`` outputs."""
    for data, purpose in ((train, "fine-tuning"), (validation, "validation")):
        if data is None or data.y is None or not len(data.y):
            continue
        low, high = int(data.y.min()), int(data.y.max())
        if low < 0 or high >= classes:
            raise DataError(f"{purpose} data {data.source}: labels run from {low} to {high} but the model has "
                            f"{classes} classes (labels 0 to {classes - 1})")


def _finetune(forward: Callable, variables: list, targets: list[_Target], train: Dataset | None, *,
              target: float, epochs: int, batch_size: int, validation: Dataset | None, learning_rate: float,
              seed: int, where: str, progress: Progress) -> tuple[dict[str, list[float]], dict[str, Any], dict]:
    """Prune ``targets`` to ``target`` while fine-tuning ``variables``; returns (history, schedule, info).

    Without training data the masks are set at the target at once (one-shot pruning).
    """
    import tensorflow as tf
    for t in targets:
        t.mask = tf.Variable(tf.ones(t.variable.shape, t.variable.dtype), trainable=False)
    if train is None:
        progress(f"pruning to {target:.0%} at once (no fine-tuning data)")
        for t in targets:
            t.update(target)
        return {}, {"kind": "one_shot", "final_sparsity": target}, {"data": None, "epochs": 0}
    check_labels(train)
    n = len(train)
    sample_out = np.asarray(forward(tf.constant(train.x[:min(n, 64)]), False))
    loss_fn, binary = _loss_for(sample_out, where)
    check_label_range(train, validation, 2 if binary else sample_out.shape[1])
    steps_per_epoch = math.ceil(n / batch_size)
    schedule = PolynomialDecay.over(target, steps_per_epoch * epochs)
    optimizer = _Adam(variables, learning_rate)
    in_spec = tf.TensorSpec([None, *train.x.shape[1:]], tf.float32)
    y_dtype = tf.float32 if binary else tf.int64

    @tf.function(input_signature=[in_spec, tf.TensorSpec([None], y_dtype)])
    def step(x, y):
        with tf.GradientTape() as tape:
            out = forward(x, True)
            loss = loss_fn(y[:, None] if binary else y, out)
        optimizer.apply(tape.gradient(loss, variables))
        for t in targets:
            t.variable.assign(t.variable * t.mask)
        return loss, out

    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "sparsity": []}
    if validation is not None and validation.y is not None:
        history.update(val_loss=[], val_accuracy=[])
    rng = np.random.default_rng(seed)
    x_all = np.asarray(train.x, np.float32)
    y_all = np.asarray(train.y).astype(np.float32 if binary else np.int64)
    current = 0.0
    global_step = 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        losses, correct = [], 0
        for start in range(0, n, batch_size):
            if schedule.updates_at(global_step):
                current = schedule.sparsity(global_step)
                for t in targets:
                    t.update(current)
            index = order[start:start + batch_size]
            loss, out = step(tf.constant(x_all[index]), tf.constant(y_all[index]))
            losses.append(float(loss) * len(index))
            correct += int(np.sum(_predicted(out.numpy(), binary) == y_all[index].astype(np.int64)))
            global_step += 1
        history["loss"].append(sum(losses) / n)
        history["accuracy"].append(correct / n)
        history["sparsity"].append(current)
        line = (f"fine-tuning epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.4f}, "
                f"accuracy {history['accuracy'][-1]:.2%}, sparsity {current:.0%}")
        if validation is not None and validation.y is not None:
            v_loss, v_acc = _evaluate(forward, loss_fn, binary, validation, batch_size)
            history["val_loss"].append(v_loss)
            history["val_accuracy"].append(v_acc)
            line += f"; validation accuracy {v_acc:.2%}"
        progress(line)
    if current != target:   # fewer steps than the schedule's end: finish at the target
        for t in targets:
            t.update(target)
    info = {"data": train.describe(), "epochs": epochs, "batch_size": batch_size, "steps": global_step,
            "learning_rate": learning_rate, "optimizer": "adam",
            "loss": type(loss_fn).__name__ + (" (logits)" if getattr(loss_fn, "from_logits", False) else "")}
    if validation is not None and validation.y is not None:
        info["validation"] = validation.describe()
    return history, schedule.to_dict(), info


def _evaluate(forward, loss_fn, binary: bool, data: Dataset, batch_size: int) -> tuple[float, float]:
    import tensorflow as tf
    total_loss, correct = 0.0, 0
    y_all = np.asarray(data.y).astype(np.float32 if binary else np.int64)
    for start in range(0, len(data), max(batch_size, 256)):
        x = tf.constant(data.x[start:start + max(batch_size, 256)])
        y = y_all[start:start + max(batch_size, 256)]
        out = forward(x, False)
        total_loss += float(loss_fn(y[:, None] if binary else y, out)) * len(y)
        correct += int(np.sum(_predicted(np.asarray(out), binary) == y.astype(np.int64)))
    return total_loss / len(data), correct / len(data)


# Public entry points ---------------------------------------------------------------------

def count_params(model) -> int:
    return int(sum(int(np.prod(v.shape)) for v in model.weights))


def prune_model(model, sparsity: float, train: Dataset | None, *, epochs: int = 2, structured: bool = False,
                batch_size: int = 32, validation: Dataset | None = None, progress: Progress | None = None,
                learning_rate: float = LEARNING_RATE, seed: int = 0) -> PruneResult:
    """Prune a copy of a Keras model to ``sparsity`` and fine-tune it on ``train`` (labelled).

    Unstructured (default): the smallest-magnitude kernel weights become exactly zero, per
    tensor. ``structured``: whole Conv2D filters / Dense units are removed by L1 norm and a
    narrower model is rebuilt (simple chains only). The given model is not changed.
    """
    progress = progress or (lambda _: None)
    target = check_sparsity(sparsity)
    check_training(epochs, batch_size)
    check_labels(train)
    import keras
    keras.utils.set_random_seed(seed)
    where = f"model {getattr(model, 'name', '?')!r}"
    params_before = count_params(model)
    channels: list[ChannelChange] = []
    if structured:
        from .structured import narrow
        pruned, channels = narrow(model, target)
        for change in channels:
            progress(f"{change.name} ({change.kind}): kept {change.after} of {change.before} channels")
        targets: list[_Target] = []
    else:
        pruned = _copy(model)
        targets = keras_targets(pruned)

    def forward(x, training):
        out = pruned(x, training=training)
        return out[0] if isinstance(out, (list, tuple)) else (next(iter(out.values())) if isinstance(out, dict)
                                                             else out)

    history, schedule, info = _finetune(
        forward, list(pruned.trainable_variables), targets, train, target=0.0 if structured else target,
        epochs=epochs, batch_size=batch_size, validation=validation, learning_rate=learning_rate, seed=seed,
        where=where, progress=progress)
    if structured:
        schedule = {"kind": "one_shot_structured", "fraction_removed": target}
        history.pop("sparsity", None)
        layers = [t.measure() for t in _all_kernels(pruned)]
    else:
        layers = [t.measure() for t in targets]
    return PruneResult(model=pruned, target=target, structured=structured, layers=layers, history=history,
                       channels=channels, params_before=params_before, params_after=count_params(pruned),
                       schedule=schedule, fine_tuning=info)


def _all_kernels(model) -> list[_Target]:
    return [_Target(v, layer.name, type(layer).__name__) for layer in _leaf_layers(model)
            for v in layer.weights if len(v.shape) >= 2 and _short(v) in PRUNABLE_WEIGHTS]


def _copy(model):
    """A copy with the same weights, so the caller's model (the accuracy reference) stays intact."""
    import keras
    try:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
    except Exception as exc:  # noqa: BLE001 - subclassed models cannot be cloned
        raise PruneError(f"model {model.name!r} cannot be copied for pruning ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); pruning needs a Sequential or "
                         "functional Keras model") from None
    return clone


def prune_savedmodel(path, sparsity: float, train: Dataset | None, *, epochs: int = 2, batch_size: int = 32,
                     validation: Dataset | None = None, progress: Progress | None = None,
                     learning_rate: float = LEARNING_RATE, seed: int = 0):
    """Load a SavedModel afresh, prune its kernel variables in place through its serving function.

    Returns (the loaded SavedModel source, PruneResult). The SavedModel on disk is not changed.
    """
    from .models import load_source
    progress = progress or (lambda _: None)
    target = check_sparsity(sparsity)
    check_training(epochs, batch_size)
    check_labels(train)
    import keras
    keras.utils.set_random_seed(seed)
    source = load_source(path)
    if source.kind != "savedmodel":
        raise PruneError(f"{path}: not a SavedModel directory")
    loaded, signature = source._keepalive, source._model
    targets = savedmodel_targets(loaded, str(path))
    output = source.output_names[0]

    def forward(x, training):
        return signature(**{source.input_name: x})[output]

    variables = list(loaded.trainable_variables)
    params = int(sum(int(np.prod(v.shape)) for v in loaded.variables))
    history, schedule, info = _finetune(
        forward, variables, targets, train, target=target, epochs=epochs, batch_size=batch_size,
        validation=validation, learning_rate=learning_rate, seed=seed, where=str(path), progress=progress)
    info["note"] = ("fine-tuned through the SavedModel's serving function (inference mode: batch normalisation "
                    "uses its moving statistics, dropout is off)")
    result = PruneResult(model=loaded, target=target, structured=False, layers=[t.measure() for t in targets],
                         history=history, params_before=params, params_after=params, schedule=schedule,
                         fine_tuning=info)
    return source, result


def check_source(source, structured: bool) -> None:
    """Refuse, before any slow work, a source that cannot be pruned as asked."""
    if source.kind == "tflite":
        raise PruneError(f"{source.path}: a .tflite model is used as it is and cannot be pruned; pruning needs the "
                         "Keras model (.keras or .h5) or the SavedModel it was converted from")
    if structured and source.kind == "savedmodel":
        raise PruneError(f"{source.path}: structured pruning rebuilds a narrower Keras model, and Keras 3 cannot load "
                         "a SavedModel as a Keras model; give the .keras or .h5 file, or prune without "
                         "--prune-structured (unstructured pruning works on the SavedModel's variables)")


def prune_source(source, sparsity: float, train: Dataset | None, *, structured: bool = False, epochs: int = 2,
                 batch_size: int = 32, validation: Dataset | None = None, progress: Progress | None = None,
                 seed: int = 0):
    """Prune a loaded source model; returns (a SourceModel of the pruned model, PruneResult).

    ``source`` itself is left untouched: it stays the reference the converted model's accuracy
    is measured against.
    """
    import dataclasses
    check_source(source, structured)
    if source.kind == "savedmodel":
        return prune_savedmodel(source.path, sparsity, train, epochs=epochs, batch_size=batch_size,
                                validation=validation, progress=progress, seed=seed)
    why_not = "structured pruning rebuilds the model; tfmot prunes weights" if structured else \
        "tfmot prunes while fine-tuning; without --finetune data the weights are pruned at once" if train is None \
        else ""
    if not why_not:
        from .prune_tfmot import load_legacy, prune_with_tfmot
        legacy, why_not = load_legacy(source.path)
        if legacy is not None:
            (progress or (lambda _: None))("pruning with tensorflow-model-optimization (the file is a Keras 2 model)")
            result = prune_with_tfmot(legacy, source._model, sparsity, train, epochs=epochs, batch_size=batch_size,
                                      validation=validation, progress=progress, seed=seed)
            return dataclasses.replace(source, _model=result.model), result
    result = prune_model(source._model, sparsity, train, epochs=epochs, structured=structured,
                         batch_size=batch_size, validation=validation, progress=progress, seed=seed)
    result.tool_note = f"tfmot not used: {why_not}"
    return dataclasses.replace(source, _model=result.model), result


class MeasuredAgainst:
    """The pruned model for conversion and the quantization debugger, the original for reference outputs.

    Validation measures the accuracy drop against ``reference_predict``: with this wrapper the
    drop reported (and held to the profile's budget) is the whole drop from the model the
    operator gave, pruning and quantization together.
    """

    def __init__(self, pruned, original) -> None:
        self._pruned, self._original = pruned, original

    def __getattr__(self, name: str):
        return getattr(self._pruned, name)

    def reference_predict(self, x: np.ndarray) -> np.ndarray:
        return self._original.reference_predict(x)


SPARSE_MODES = ("float32", "float16")


def sparse_encoding_fits(mode: str, accelerator_kind: str, structured: bool) -> tuple[bool, str]:
    """Whether to store the pruned weights sparse (EXPERIMENTAL_SPARSITY), and why (not).

    Measured with ai-edge-litert 2.3: sparse float32/float16 models load in XNNPACK and in
    tflite-runtime 2.14 and are about a third the size; sparse int8 and dynamic-range models
    fail in XNNPACK ("failed to delegate FULLY_CONNECTED"), and the GPU delegate is not
    given DENSIFY ops, so those keep dense weights (their zeros still compress in transfer).
    """
    if structured:
        return False, "structured pruning leaves no zeros to encode"
    if mode not in SPARSE_MODES:
        return False, f"{mode} models with sparse weights do not load in XNNPACK; weights stored dense"
    if accelerator_kind != "none":
        return False, f"the {accelerator_kind} delegate does not take sparse weights; weights stored dense"
    return True, "weights stored sparse (EXPERIMENTAL_SPARSITY, DENSIFY at load time)"


def report_section(result: PruneResult, tflite: bytes, *, sparse_weights: bool, sparse_note: str,
                   original=None, pruned=None, data: Dataset | None = None) -> dict[str, Any]:
    """The report's ``pruning`` part: what was asked, what was done, the sparsity read back from ``tflite``.

    With labelled ``data`` it also gives the float accuracy of the ``original`` and ``pruned``
    source models, so the drop from pruning shows apart from the drop from quantization.
    """
    from . import metrics
    from .sparse import weight_tensors
    source_accuracy = pruned_accuracy = None
    if original is not None and pruned is not None and data is not None and data.y is not None and len(data):
        source_accuracy = metrics.accuracy(data.y, metrics.top1(np.asarray(original.reference_predict(data.x))))
        pruned_accuracy = metrics.accuracy(data.y, metrics.top1(np.asarray(pruned.reference_predict(data.x))))
    read_back = weight_tensors(tflite)
    doc = result.to_dict()
    doc["keras_layers"] = doc.pop("layers")
    doc["tflite_layers"] = [{"name": w.name, "op": w.op, "dtype": w.dtype, "params": w.params,
                             "sparsity": round(w.sparsity, 6), "encoded_sparse": w.encoded_sparse} for w in read_back]
    keras_layers = doc["keras_layers"]
    if len(keras_layers) == len(read_back) and all(k["params"] == w.params for k, w in zip(keras_layers, read_back)):
        # Same weights in the same order: name each tensor by its Keras layer (TF's tensor names are traced scopes).
        for entry, layer in zip(doc["tflite_layers"], keras_layers):
            entry["layer"] = layer["name"]
    total = sum(w.params for w in read_back)
    doc["tflite_sparsity"] = round(sum(w.zeros for w in read_back) / total, 6) if total else 0.0
    doc["sparse_weights"] = sparse_weights
    doc["sparse_note"] = sparse_note
    if source_accuracy is not None and pruned_accuracy is not None:
        doc["float_accuracy"] = {"source": source_accuracy, "pruned": pruned_accuracy,
                                 "drop_points": round((source_accuracy - pruned_accuracy) * 100.0, 6)}
    return doc


def manifest_summary(section: dict[str, Any]) -> dict[str, Any]:
    """The few facts about pruning the signed manifest carries (in quantization.settings)."""
    tuning = section.get("fine_tuning") or {}
    return {"target": section["target"], "structured": section["structured"], "method": section["method"],
            "tflite_sparsity": section["tflite_sparsity"], "sparse_weights": section["sparse_weights"],
            "params_before": section["params_before"], "params_after": section["params_after"],
            "fine_tuning": (f"{tuning['data']}, {tuning['epochs']} epoch(s)" if tuning.get("data")
                            else "none (one-shot)")}


def tflite_sparsity(model_bytes: bytes) -> list[LayerSparsity]:
    """Sparsity of each weight tensor read back from the converted .tflite (int8 or float).

    A weight is the constant filter input of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED,
    TRANSPOSE_CONV, CONV_3D or BATCH_MATMUL, followed back through DEQUANTIZE (float16 weights)
    and DENSIFY (sparse-encoded weights). A quantized weight is zero when it equals its zero
    point; a sparse-encoded tensor counts the values it does not store as zeros.
    """
    from .sparse import weight_tensors
    return [LayerSparsity(w.name, w.op, w.sparsity, w.params) for w in weight_tensors(model_bytes)]
