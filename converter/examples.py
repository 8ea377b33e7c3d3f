"""A small, real example model: a CNN on scikit-learn's bundled digits (no download needed).

The demo, the benchmarks and the tests all use it, so the figures they report are for the
same model. 1,797 8x8 grey images of handwritten digits, 10 classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): (N, 8, 8, 1) float32 in [0, 1], int64 labels; 80/20 split."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(len(x) * 0.8)
    return x[:split], y[:split], x[split:], y[split:]


def write_digits_npz(directory: Path) -> tuple[Path, Path]:
    """Write calibration (train split) and evaluation (test split) data as .npz files."""
    x_train, y_train, x_test, y_test = digits_data()
    directory.mkdir(parents=True, exist_ok=True)
    calibration, evaluation = directory / "digits-calibration.npz", directory / "digits-eval.npz"
    np.savez(calibration, x=x_train, y=y_train)
    np.savez(evaluation, x=x_test, y=y_test)
    return calibration, evaluation


def build_digits_cnn(width: int = 16):
    """Two convolutions, a pool and two dense layers: about 40k parameters."""
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


def train_digits_cnn(path: Path, epochs: int = 15, width: int = 16, seed: int = 0) -> Path:
    """Train the digits CNN and save it; the format follows the suffix (.keras, .h5, else SavedModel)."""
    import keras
    keras.utils.set_random_seed(seed)
    x_train, y_train, _, _ = digits_data()
    model = build_digits_cnn(width)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".keras", ".h5"):
        model.save(path)
    else:
        model.export(str(path))
    return path
