"""The demo's models: digits v1 and v2 through the real converter, and a slow v3 released by hand.

- v1: the digits CNN trained on scikit-learn's bundled digits, converted, validated and signed
  for each profile by :func:`converter.pipeline.convert_to_bundle`.
- v2: v1 trained a few more epochs (other weights, same architecture), converted the same way.
- v3: the "bad release": a wide CNN on the same input, about 1 G multiply-adds, ~20x slower than
  digits here. It skips the converter's validation (the way a hurried release would) but is
  signed, verifies, and passes its smoke test on every device: only the fleet's health rule
  can catch it. Its manifest takes the profile's v1 manifest as a template.

Everything is cached in the output folder: a re-run reuses the trained models and bundles.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Progress = Callable[[str], None]
NAME = "digits"


@dataclass
class Models:
    """Bundle paths per version and profile, and a few figures to show."""

    bundles: dict[int, dict[str, Path]] = field(default_factory=dict)
    accuracy: dict[int, dict[str, float]] = field(default_factory=dict)   # version -> profile -> accuracy
    evaluation: Path | None = None


def bundle_path(out: Path, version: int, profile: str) -> Path:
    from converter.pipeline import bundle_filename
    return out / "bundles" / bundle_filename(NAME, version, profile)


def prepare(out: Path, profiles: list[str], *, epochs: int, key_dir: Path, progress: Progress) -> Models:
    """Train (or reuse) and convert (or reuse) v1 and v2, build v3; every bundle verified."""
    from converter.examples import train_digits_cnn, write_digits_npz
    models_dir = out / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    calibration, evaluation = write_digits_npz(out / "data")
    result = Models(evaluation=evaluation)

    v1 = models_dir / "digits-v1.keras"
    if v1.exists():
        progress(f"v1: reusing {v1}")
    else:
        progress(f"v1: training the digits CNN, {epochs} epochs")
        tmp = v1.with_name("digits-v1.tmp.keras")
        train_digits_cnn(tmp, epochs=epochs)
        tmp.replace(v1)
    v2 = models_dir / "digits-v2.keras"
    if v2.exists():
        progress(f"v2: reusing {v2}")
    else:
        extra = max(2, epochs // 3)
        progress(f"v2: v1 trained {extra} more epochs")
        fine_tune(v1, v2, extra)

    for version, source in ((1, v1), (2, v2)):
        result.bundles[version], result.accuracy[version] = {}, {}
        for profile in profiles:
            path = bundle_path(out, version, profile)
            if not path.exists():
                progress(f"v{version}: converting for {profile} (quantize, validate, sign)")
                convert(source, profile, version, calibration, evaluation, key_dir, out / "bundles")
            result.bundles[version][profile] = path
            result.accuracy[version][profile] = converted_accuracy(path)
        progress(f"v{version}: " + ", ".join(f"{p} {100 * a:.1f}%" for p, a in result.accuracy[version].items())
                 + " accuracy on held-out digits")

    wide = models_dir / "wide-v3.tflite"
    if not wide.exists():
        progress("v3: building the wide CNN (the bad release)")
        wide.write_bytes(wide_cnn_tflite(models_dir))
    result.bundles[3] = {}
    for profile in profiles:
        path = bundle_path(out, 3, profile)
        if not path.exists():
            write_slow_bundle(path, wide.read_bytes(), result.bundles[1][profile], key_dir / "release.key",
                              evaluation, version=3)
        result.bundles[3][profile] = path
    progress("v3: signed without validation for " + ", ".join(profiles))
    verify_all(result, key_dir)
    return result


def fine_tune(source: Path, dest: Path, epochs: int) -> None:
    """Train ``source`` ``epochs`` more on a reshuffled training set; save to ``dest``."""
    import keras

    from converter.examples import digits_data
    keras.utils.set_random_seed(1)
    model = keras.models.load_model(source)
    x_train, y_train, _, _ = digits_data(seed=0)
    order = np.random.default_rng(1).permutation(len(x_train))
    model.fit(x_train[order], y_train[order], epochs=epochs, batch_size=32, verbose=0)
    tmp = dest.with_name(dest.stem + ".tmp.keras")
    model.save(tmp)
    tmp.replace(dest)


def convert(source: Path, profile: str, version: int, calibration: Path, evaluation: Path, key_dir: Path,
            out_dir: Path) -> Path:
    from converter.pipeline import convert_to_bundle
    result = convert_to_bundle(source, profile, calibration=calibration, eval=evaluation, name=NAME,
                               version=version, sign_key=key_dir / "release.key", out_dir=out_dir)
    return result.bundle_path


def manifest_of(path: Path) -> dict[str, Any]:
    from agent.protocol import bundle as bundle_mod
    return json.loads(bundle_mod.read_bundle(path).manifest_bytes)


def converted_accuracy(path: Path) -> float:
    for check in manifest_of(path).get("validation", {}).get("checks", []):
        if check.get("name") == "accuracy":
            value = check.get("details", {}).get("converted_accuracy")
            if isinstance(value, (int, float)):
                return float(value)
    return float("nan")


def wide_cnn_tflite(directory: Path) -> bytes:
    """A wide CNN on the digits input: converts and runs fine, ~20x slower than digits.

    The 8x8 input upsampled to 32x32, then three 192-filter convolutions (about 1 G
    multiply-adds). Untrained: its answers do not matter, its latency does.
    """
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.UpSampling2D(4)(inp)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    for _ in range(3):
        x = keras.layers.Conv2D(192, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(x))
    fn = tf.function(lambda t: model(t, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, 8, 8, 1], tf.float32, name="image"))
    # from a concrete function: weights frozen as constants, no resource variables
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete]).convert()


def write_slow_bundle(path: Path, model: bytes, template: Path, release_key: Path, evaluation: Path,
                      version: int) -> Path:
    """Sign ``model`` as digits v``version`` for the template bundle's profile, without validation."""
    from ai_edge_litert.interpreter import Interpreter

    from agent.protocol import bundle as bundle_mod
    from agent.protocol import keys
    from agent.protocol.manifest import TensorData, model_section
    from converter.pipeline import tensor_spec
    doc = manifest_of(template)
    interp = Interpreter(model_content=model)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    sample = np.load(evaluation)["x"][:1].astype(np.float32).reshape(inp["shape"])
    interp.set_tensor(inp["index"], sample)
    interp.invoke()
    expected = interp.get_tensor(out["index"])

    def tensor(array: np.ndarray) -> dict[str, Any]:
        return TensorData(array.dtype.name, tuple(array.shape), np.ascontiguousarray(array).tobytes()).to_dict()

    chunk_size = int(doc.get("model", {}).get("chunk_size") or 256 * 1024)
    doc.update({
        "version": version,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model": model_section(model, chunk_size),
        "inputs": [tensor_spec(d) for d in interp.get_input_details()],
        "outputs": [tensor_spec(d) for d in interp.get_output_details()],
        "quantization": {"mode": "float32", "input_type": "float32", "output_type": "float32",
                         "calibration_samples": 0},
        "validation": {},
        "smoke_test": {"inputs": [tensor(sample)], "expected_outputs": [tensor(expected)], "atol": 1e-3},
    })
    doc["estimates"] = {"arena_bytes": 8 << 20, "peak_memory_bytes": len(model) + (8 << 20)}
    doc.pop("forced", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    bundle_mod.write_bundle(tmp, bundle_mod.build(doc, model, keys.load_private(release_key)))
    os.replace(tmp, path)
    return path


def verify_all(models: Models, key_dir: Path) -> None:
    """Every bundle verifies against the release key, as a device would check it."""
    from agent.protocol import bundle as bundle_mod
    from agent.protocol import keys
    trusted = [keys.load_public(key_dir / "release.pub")]
    for per_profile in models.bundles.values():
        for path in per_profile.values():
            bundle_mod.verify(bundle_mod.read_bundle(path), trusted)


__all__ = ["Models", "prepare", "bundle_path", "wide_cnn_tflite", "write_slow_bundle", "NAME"]
