"""Pruning: real fine-tuning of the digits CNN with the Keras 3 masks, read back from real conversions.

What an operator notices: the sparsity asked for is the sparsity found in the converted model's
weights (int8 and float), accuracy survives, float models get smaller files, every source
format works, and every bad request is one clear line with nothing written.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from converter.data import Dataset
from converter.errors import DataError
from converter.prune import PolynomialDecay, PruneError, check_sparsity, prune_model, tflite_sparsity
from tests.conftest import run_cli
from tests.converter_fixtures import *  # noqa: F401,F403


@pytest.fixture(scope="module")
def train(digits) -> Dataset:
    x_train, y_train, _, _ = digits
    return Dataset(x_train, y_train, "digits-train.npz")


@pytest.fixture(scope="module")
def test_set(digits) -> Dataset:
    _, _, x_test, y_test = digits
    return Dataset(x_test, y_test, "digits-test.npz")


@pytest.fixture(scope="module")
def half(digits_source, train, test_set):
    """The digits CNN pruned to 50% with one epoch of fine-tuning (the source model stays as it was)."""
    return prune_model(digits_source._model, 0.5, train, epochs=1, validation=test_set)


def _accuracy(predict, data: Dataset) -> float:
    return float(np.mean(np.argmax(np.asarray(predict(data.x)), axis=1) == data.y))


def _convert(source, model, mode: str, calibration: Dataset) -> bytes:
    import dataclasses

    from converter.quantize import convert
    pruned = dataclasses.replace(source, _model=model)
    io = "int8" if mode == "int8" else "float32"
    return convert(pruned, mode=mode, input_type=io, output_type=io, calibration=calibration,
                   runtime_min_version="2.14", progress=lambda _: None).tflite


def test_pruned_to_half_reads_back_half_from_the_converted_model(half, digits_source, train, test_set):
    assert half.target == 0.5 and not half.structured
    assert [layer.name for layer in half.layers] == ["conv2d", "conv2d_1", "dense", "probs"]
    for layer in half.layers:                       # measured on the Keras weights after fine-tuning
        assert abs(layer.sparsity - 0.5) < 0.01, layer
    # The schedule rose during fine-tuning and ended at the target.
    assert half.history["sparsity"][-1] == pytest.approx(0.5) and half.schedule["kind"] == "polynomial_decay"
    # Still a good classifier, and the model that was given is untouched (it stays the reference).
    assert _accuracy(lambda x: half.model(x, training=False), test_set) > 0.95
    assert np.mean(digits_source._model.layers[-1].get_weights()[0] == 0) < 0.01

    calibration = Dataset(train.x[:100], train.y[:100], "calibration")
    for mode in ("int8", "float32"):
        read_back = tflite_sparsity(_convert(digits_source, half.model, mode, calibration))
        assert [w.kind for w in read_back] == ["CONV_2D", "CONV_2D", "FULLY_CONNECTED", "FULLY_CONNECTED"]
        assert [w.params for w in read_back] == [layer.params for layer in half.layers]
        for weights in read_back:
            assert abs(weights.sparsity - 0.5) < 0.02, (mode, weights)


def test_the_unpruned_model_reads_back_dense(digits_tflite_int8):
    assert all(w.sparsity < 0.05 for w in tflite_sparsity(digits_tflite_int8))


def test_schedule_rises_from_zero_to_the_target_like_tfmot():
    schedule = PolynomialDecay.over(0.8, total_steps=90)
    values = [schedule.sparsity(step) for step in range(91)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.8) and values[schedule.end_step] == pytest.approx(0.8)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[schedule.end_step // 2] > 0.8 * 0.5          # power 3: fast early, slow near the end
    assert sum(schedule.updates_at(step) for step in range(91)) >= 10


@pytest.mark.parametrize("value, hint", [(0, "between 0 and 1"), (1, "between 0 and 1"), (-0.2, "between 0 and 1"),
                                         (1.5, "between 0 and 1"), (50, "use 0.5 for 50%"), ("half", "not a number"),
                                         (float("nan"), "between 0 and 1"), (True, "between 0 and 1")])
def test_bad_sparsity_is_refused_with_what_was_given(value, hint):
    with pytest.raises(PruneError) as info:
        check_sparsity(value)
    assert hint in str(info.value) and "--prune" in str(info.value)


def test_model_with_unprunable_layers_names_them():
    import keras

    class Mixer(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], input_shape[-1]), name="w")

        def call(self, x):
            return x @ self.w

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, name="hidden")(x)
    x = Mixer(name="mixer")(x)
    model = keras.Model(inputs, keras.layers.Dense(10, name="out")(x), name="custom")
    with pytest.raises(PruneError) as info:
        prune_model(model, 0.5, None)
    message = str(info.value)
    assert "mixer (Mixer: w)" in message and "cannot prune" in message and "hidden" not in message

    no_weights = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(2.0),
                                   keras.layers.GlobalAveragePooling2D()], name="plain")
    with pytest.raises(PruneError, match="'plain' has no prunable layers .*Rescaling"):
        prune_model(no_weights, 0.5, None)


def test_fine_tuning_data_without_labels_is_refused_naming_the_file(digits_source, train):
    with pytest.raises(DataError) as info:
        prune_model(digits_source._model, 0.5, Dataset(train.x, None, "/data/unlabelled.npz"))
    assert "/data/unlabelled.npz" in str(info.value) and "labels" in str(info.value)


def test_structured_pruning_removes_whole_filters_and_shrinks_the_model(digits_source, train, test_set):
    result = prune_model(digits_source._model, 0.5, train, epochs=1, structured=True)
    assert [(c.name, c.before, c.after) for c in result.channels] == [
        ("conv2d", 16, 8), ("conv2d_1", 32, 16), ("dense", 64, 32)]      # the output layer keeps its 10 units
    assert result.params_after < 0.3 * result.params_before
    assert result.model.output_shape == (None, 10) and result.model.inputs[0].name == "image"
    assert _accuracy(lambda x: result.model(x, training=False), test_set) > 0.95
    calibration = Dataset(train.x[:100], train.y[:100], "calibration")
    narrow = _convert(digits_source, result.model, "float32", calibration)
    full = _convert(digits_source, digits_source._model, "float32", calibration)
    assert len(narrow) < 0.35 * len(full)


def test_structured_pruning_refuses_branches_naming_the_layer():
    import keras
    inputs = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(4, 3, padding="same", name="left")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="right")(inputs)
    x = keras.layers.Add(name="join")([a, b])
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(x)), name="branchy")
    with pytest.raises(PruneError, match="simple chains only.*'right'"):
        prune_model(model, 0.5, None, structured=True)


# Through `litefleet convert`: .h5 and SavedModel sources, bad input ----------------------------------

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, digits_h5, digits_savedmodel, digits_npz, keys_dir, digits):
    base = tmp_path_factory.mktemp("prune_cli")
    cal, ev = digits_npz
    unlabelled = base / "unlabelled.npz"
    np.savez(unlabelled, x=digits[0][:64])

    def convert(model, out: str, *extra: str, profile: str = "rpi4-cpu") -> list[str]:
        return ["convert", str(model), "--profile", profile, "--calibration", str(cal), "--eval", str(ev),
                "--name", "digits", "--version", "1", "--sign-key", str(keys_dir / "release.key"),
                "-o", str(base / out), *extra]

    jobs = {
        "h5": convert(digits_h5, "h5", "--prune", "0.5", "--finetune", str(cal), "--epochs", "1", "--json"),
        # A float model on a CPU profile: the pruned weights are stored sparse.
        "savedmodel": convert(digits_savedmodel, "savedmodel", "--prune", "0.8", "--finetune", str(cal),
                              "--epochs", "2", "--mode", "float32", "--json"),
        "percent": convert(digits_h5, "percent", "--prune", "50"),
        "unlabelled": convert(digits_h5, "unlabelled", "--prune", "0.5", "--finetune", str(unlabelled)),
        "structured_savedmodel": convert(digits_savedmodel, "structured_savedmodel", "--prune", "0.5",
                                         "--prune-structured"),
        "structured_alone": convert(digits_h5, "structured_alone", "--prune-structured"),
    }
    with ThreadPoolExecutor(3) as pool:
        futures = {key: pool.submit(run_cli, *args) for key, args in jobs.items()}
        return {key: (future.result(), base / key) for key, future in futures.items()}, unlabelled


def test_h5_source_is_pruned_converted_and_signed_with_the_sparsity_in_report_and_manifest(cli_runs, keys_dir):
    proc, out = cli_runs[0]["h5"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    pruning = doc["pruning"]
    assert pruning["target"] == 0.5 and pruning["structured"] is False
    assert pruning["tool"].startswith("keras 3 masks") and "tf-keras cannot read it" in pruning["tool_note"]
    assert abs(pruning["tflite_sparsity"] - 0.5) < 0.02
    assert [layer["layer"] for layer in pruning["tflite_layers"]] == ["conv2d", "conv2d_1", "dense", "probs"]
    assert all(layer["dtype"] == "int8" for layer in pruning["tflite_layers"])
    assert pruning["sparse_weights"] is False and "XNNPACK" in pruning["sparse_note"]   # int8: stored dense
    assert pruning["fine_tuning"]["epochs"] == 1 and pruning["float_accuracy"]["pruned"] > 0.95
    assert doc["transfer"]["model_deflate_bytes"] < doc["transfer"]["model_bytes"]
    assert doc["validation"]["ok"]
    bundle = out / "digits-v1-rpi4-cpu.lfb"
    verify = run_cli("bundle", "verify", str(bundle), "--trust", str(keys_dir / "release.pub"))
    assert verify.returncode == 0, verify.stderr
    manifest = json.loads(run_cli("bundle", "inspect", str(bundle), "--json").stdout)["manifest"]
    recorded = manifest["quantization"]["settings"]["pruning"]
    assert recorded["target"] == 0.5 and abs(recorded["tflite_sparsity"] - 0.5) < 0.02
    assert "1 epoch" in recorded["fine_tuning"]


def test_savedmodel_source_is_pruned_through_its_variables_and_stored_sparse(cli_runs):
    proc, _ = cli_runs[0]["savedmodel"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    pruning = doc["pruning"]
    assert abs(pruning["tflite_sparsity"] - 0.8) < 0.02
    assert pruning["sparse_weights"] is True and all(layer["encoded_sparse"] for layer in pruning["tflite_layers"])
    assert "EXPERIMENTAL_SPARSITY" in doc["quantization"]["settings"]["optimizations"]
    # A dense float32 digits CNN is ~156 KB; stored sparse at 80% it is about a third of that on the wire.
    assert doc["transfer"]["model_bytes"] < 60_000 and doc["transfer"]["mqtt_pull_bytes"] < 70_000
    runtimes = {c["name"]: c for c in doc["validation"]["checks"]}["runtimes"]
    assert runtimes["ok"] and "tflite-runtime 2.14" in runtimes["summary"]


@pytest.mark.parametrize("case, expected", [
    ("percent", "--prune 50: the sparsity must be between 0 and 1"),
    ("unlabelled", "has no labels"),
    ("structured_savedmodel", "structured pruning rebuilds a narrower Keras model"),
    ("structured_alone", "--prune-structured needs --prune"),
])
def test_bad_pruning_requests_give_one_clear_line_and_write_nothing(cli_runs, case, expected):
    (proc, out), unlabelled = cli_runs[0][case], cli_runs[1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    if case == "unlabelled":
        assert str(unlabelled) in errors[0]
    assert not out.exists() or not list(out.iterdir())


def test_a_keras_2_h5_file_is_pruned_by_tensorflow_model_optimization(digits_source, digits_npz, tmp_path, keys_dir):
    """A .h5 saved by Keras 2 (TensorFlow <= 2.15) can pass through tf-keras, so tfmot prunes it; the
    sparsity is read back from the converted model like any other."""
    import tf_keras
    layers = tf_keras.layers
    legacy = tf_keras.Sequential([
        tf_keras.Input(shape=(8, 8, 1), name="image"),
        layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2d"),
        layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2d_1"),
        layers.MaxPooling2D(2), layers.Flatten(),
        layers.Dense(64, activation="relu", name="dense"),
        layers.Dense(10, activation="softmax", name="probs")], name="digits_cnn")
    legacy.set_weights(digits_source._model.get_weights())      # the trained digits CNN, as Keras 2 saves it
    legacy.save(tmp_path / "digits-keras2.h5")
    cal, ev = digits_npz
    proc = run_cli("convert", str(tmp_path / "digits-keras2.h5"), "--profile", "rpi4-cpu", "--calibration", str(cal),
                   "--eval", str(ev), "--name", "digits", "--version", "1", "--sign-key", str(keys_dir / "release.key"),
                   "--prune", "0.5", "--finetune", str(cal), "--epochs", "1", "-o", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pruning with tensorflow-model-optimization" in proc.stderr
    pruning = json.loads(proc.stdout)["pruning"]
    assert pruning["tool"].startswith("tensorflow-model-optimization 0.8") and pruning["tool_note"] == ""
    assert "prune_low_magnitude" in pruning["method"] and pruning["schedule"]["kind"] == "polynomial_decay"
    assert [layer["layer"] for layer in pruning["tflite_layers"]] == ["conv2d", "conv2d_1", "dense", "probs"]
    assert all(abs(layer["sparsity"] - 0.5) < 0.02 for layer in pruning["tflite_layers"]), pruning["tflite_layers"]
    assert pruning["float_accuracy"]["pruned"] > 0.95
