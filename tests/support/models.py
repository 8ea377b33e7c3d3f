"""Small real models for tests: a CNN trained on scikit-learn's bundled digits (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 8x8x1 float32 images in [0, 1], int labels."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    split = int(len(x) * 0.8)
    return x[:split], y[:split], x[split:], y[split:]


def build_digits_cnn(width: int = 16):
    import keras
    return keras.Sequential([
        keras.Input(shape=(8, 8, 1), name="image"),
        keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(width * 2, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax", name="probs"),
    ], name="digits_cnn")


def train_digits_cnn(path: Path, epochs: int = 15, width: int = 16) -> Path:
    """Train the digits CNN and save it (format from the suffix: .keras, .h5, or a SavedModel dir)."""
    import keras
    keras.utils.set_random_seed(0)
    x_train, y_train, _, _ = digits_data()
    model = build_digits_cnn(width)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    path = Path(path)
    if path.suffix in (".keras", ".h5"):
        model.save(path)
    else:
        model.export(str(path))
    return path


def convert_tflite(keras_path: Path, mode: str = "float32") -> bytes:
    """A plain TF conversion (not litefleet's converter), for tests of the device side."""
    import keras
    import tensorflow as tf
    model = keras.models.load_model(keras_path)
    x_train, _, _, _ = digits_data()
    fn = tf.function(lambda x: model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, 8, 8, 1], tf.float32, name="image"))
    # No trackable object: the converter then freezes the weights into constants instead of
    # emitting resource variables (VAR_HANDLE/READ_VARIABLE) that delegates cannot take.
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    if mode == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None]] for x in x_train[:100])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif mode != "float32":
        raise ValueError(mode)
    return converter.convert()
