"""Pruning with tensorflow-model-optimization, for the models tf-keras can read.

tfmot wraps tf-keras (Keras 2) models only. TensorFlow 2.21 saves and loads with Keras 3, whose
files tf-keras cannot read, so those are pruned by :mod:`converter.prune`'s masks on the same
schedule. A ``.h5`` written by Keras 2 (TensorFlow 2.15 and older: many models in the field)
goes through tfmot itself: ``prune_low_magnitude`` with its ``PolynomialDecay``,
``UpdatePruningStep`` while fitting, then ``strip_pruning``. The pruned weights are copied into
the Keras 3 model of the same file, so conversion, validation and the report have one path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset
from .prune import (LEARNING_RATE, PolynomialDecay, Progress, PruneError, PruneResult, _copy, _loss_for,
                    check_label_range, check_labels, check_sparsity, check_training, count_params,
                    keras_targets)

LEGACY_SUFFIXES = (".h5", ".hdf5")


def tool_version() -> str:
    """``tensorflow-model-optimization X (tf-keras Y)``, or "" when either is not installed."""
    try:
        import tensorflow_model_optimization as tfmot
        import tf_keras
    except ImportError:
        return ""
    return f"tensorflow-model-optimization {tfmot.__version__} (tf-keras {tf_keras.__version__})"


def load_legacy(path: str | Path) -> tuple[Any | None, str]:
    """``(tf-keras model, "")`` when tfmot can prune this file, else ``(None, why not)``."""
    path = Path(path)
    if path.suffix.lower() not in LEGACY_SUFFIXES:
        return None, f"{path.suffix or 'this'} files are Keras 3's own format, which tf-keras cannot read"
    if not tool_version():
        return None, "tensorflow-model-optimization or tf-keras is not installed"
    import tf_keras
    try:
        return tf_keras.models.load_model(path, compile=False), ""
    except Exception as exc:  # noqa: BLE001 - any failure means: not a file tf-keras understands
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return None, f"tf-keras cannot read it (saved by Keras 3: {first})"


def prune_with_tfmot(legacy: Any, model: Any, sparsity: float, train: Dataset, *, epochs: int = 2,
                     batch_size: int = 32, validation: Dataset | None = None, progress: Progress | None = None,
                     learning_rate: float = LEARNING_RATE, seed: int = 0) -> PruneResult:
    """Prune ``legacy`` (tf-keras) with tfmot; return the result in a copy of ``model`` (its Keras 3 twin).

    Needs labelled ``train`` data (tfmot prunes while fitting; a one-shot prune without data takes
    the masks path). Neither model given is changed. Layers that cannot be pruned are refused by
    name before any training, as on the Keras 3 path.
    """
    import tensorflow_model_optimization as tfmot
    import tf_keras

    progress = progress or (lambda _: None)
    target = check_sparsity(sparsity)
    check_training(epochs, batch_size)
    if train is None:
        raise PruneError("pruning with tfmot fine-tunes: it needs labelled data (--finetune)")
    check_labels(train)
    twin = _copy(model)
    targets = keras_targets(twin)                 # names the unprunable layers, as the masks path does
    before = [w.shape for w in twin.get_weights()]
    if [tuple(w.shape) for w in legacy.get_weights()] != [tuple(s) for s in before]:
        raise PruneError(f"model {model.name!r}: tf-keras and Keras 3 read different weights from the same file; "
                         "save it again with Keras 3 (model.save('model.keras')) and prune that")
    tf_keras.utils.set_random_seed(seed)
    params_before = count_params(model)
    wrapped, history, schedule_doc, info = _fit(legacy, target, train, epochs, batch_size, validation,
                                                learning_rate, progress, str(getattr(model, "name", "?")))
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    twin.set_weights(stripped.get_weights())
    info["tool"] = tool_version()
    return PruneResult(model=twin, target=target, structured=False, layers=[t.measure() for t in targets],
                       history=history, params_before=params_before, params_after=count_params(twin),
                       schedule=schedule_doc, fine_tuning=info, tool=tool_version())


def _fit(legacy: Any, target: float, train: Dataset, epochs: int, batch_size: int, validation: Dataset | None,
         learning_rate: float, progress: Progress, where: str) -> tuple[Any, dict, dict, dict]:
    import tensorflow_model_optimization as tfmot
    import tf_keras

    n = len(train)
    sample_out = np.asarray(legacy(train.x[:min(n, 64)], training=False))
    keras3_loss, binary = _loss_for(sample_out, f"model {where!r}")
    logits = bool(getattr(keras3_loss, "from_logits", False))
    check_label_range(train, validation, 2 if binary else sample_out.shape[1])
    loss = (tf_keras.losses.BinaryCrossentropy(from_logits=logits) if binary
            else tf_keras.losses.SparseCategoricalCrossentropy(from_logits=logits))
    ours = PolynomialDecay.over(target, math.ceil(n / batch_size) * epochs)
    schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.0, final_sparsity=target,
                                                    begin_step=ours.begin_step, end_step=ours.end_step,
                                                    power=ours.power, frequency=ours.frequency)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(legacy, pruning_schedule=schedule)
    wrapped.compile(optimizer=tf_keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])
    has_validation = validation is not None and validation.y is not None
    steps_per_epoch = math.ceil(n / batch_size)

    class _Progress(tf_keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            line = (f"fine-tuning epoch {epoch + 1}/{epochs} (tfmot): loss {logs.get('loss', float('nan')):.4f}, "
                    f"accuracy {logs.get('accuracy', float('nan')):.2%}, "
                    f"sparsity {ours.sparsity((epoch + 1) * steps_per_epoch):.0%}")
            if "val_accuracy" in logs:
                line += f"; validation accuracy {logs['val_accuracy']:.2%}"
            progress(line)

    y = np.asarray(train.y).astype(np.float32 if binary else np.int64)
    fitted = wrapped.fit(
        np.asarray(train.x, np.float32), y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
        validation_data=((np.asarray(validation.x, np.float32), np.asarray(validation.y)) if has_validation
                         else None),
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), _Progress()])
    history = {k: [float(v) for v in fitted.history.get(k, [])]
               for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in fitted.history}
    history["sparsity"] = [ours.sparsity((e + 1) * steps_per_epoch) for e in range(epochs)]
    info = {"data": train.describe(), "epochs": epochs, "batch_size": batch_size, "steps": steps_per_epoch * epochs,
            "learning_rate": learning_rate, "optimizer": "adam",
            "loss": type(loss).__name__ + (" (logits)" if logits else "")}
    if has_validation:
        info["validation"] = validation.describe()
    return wrapped, history, ours.to_dict(), info
