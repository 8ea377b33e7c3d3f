"""``litefleet distill``: the digits CNN distilled into a half-width student for real, compared with its
teacher, converted like any model; bad input refused with one clear line and nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.converter_fixtures import *  # noqa: F401,F403


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="module")
def half_width(tmp_path_factory, digits_keras, digits_npz) -> tuple[dict, Path]:
    """One real distillation: width=0.5 student, 2 epochs, measured on the test split."""
    out = tmp_path_factory.mktemp("distill") / "students" / "digits-half.keras"
    calibration, evaluation = digits_npz
    proc = run_cli("distill", str(digits_keras), "--student", "width=0.5", "--data", str(calibration),
                   "--eval", str(evaluation), "--epochs", "2", "-o", str(out), "--json")
    return _json(proc), out


def test_half_width_student_is_smaller_and_learns_digits(half_width, digits):
    doc, out = half_width
    assert _files(out.parent) == [out.name]          # written atomically: no temporary file left
    teacher, student = doc["teacher"], doc["student"]
    assert student["path"] == str(out)
    assert student["parameters"] < teacher["parameters"] / 3          # half the channels: about a quarter the weights
    assert student["tflite_float32_bytes"] < teacher["tflite_float32_bytes"] / 2
    assert doc["student_vs_teacher"]["parameters"] < 0.34
    assert student["latency"]["median_ms"] > 0 and teacher["latency"]["median_ms"] > 0
    # Ten classes: chance is 10%. Two epochs on 1,437 digits get a half-width student well past it.
    assert student["accuracy"] > 0.7, doc
    assert teacher["accuracy"] > 0.9
    assert set(doc["per_class"]["student"]) == {str(c) for c in range(10)}
    assert set(doc["per_class"]["teacher"]) == set(doc["per_class"]["student"])
    assert doc["settings"]["temperature"] == 4 and doc["settings"]["alpha"] == 0.9
    assert "without its softmax" in doc["settings"]["teacher_logits"]
    assert len(doc["training"]["history"]) == 2
    assert doc["warnings"] == [] and doc["notes"] == []
    # The file is the student the report measured: same accuracy when loaded again.
    import keras
    model = keras.models.load_model(out)
    _, _, x_test, y_test = digits
    accuracy = float(np.mean(model.predict(x_test, verbose=0).argmax(1) == y_test))
    assert accuracy == pytest.approx(student["accuracy"], abs=1e-9)


def test_student_converts_like_any_model(half_width, digits_npz, keys_dir, tmp_path):
    _, student = half_width
    calibration, evaluation = digits_npz
    proc = run_cli("convert", str(student), "--profile", "x86-cpu", "--calibration", str(calibration), "--eval",
                   str(evaluation), "--name", "digits-half", "--version", "1", "--sign-key",
                   str(keys_dir / "release.key"), "-o", str(tmp_path), "--json")
    doc = _json(proc)
    assert doc["signed"] and Path(doc["bundle"]).is_file()


def test_unlabelled_data_means_pure_distillation_and_a_bigger_student_warns(digits_keras, digits_npz, digits,
                                                                            tmp_path):
    x_train = digits[0]
    np.save(tmp_path / "unlabelled.npy", x_train)
    out = tmp_path / "wide.keras"
    proc = run_cli("distill", str(digits_keras), "--student", "width=1.5", "--data", str(tmp_path / "unlabelled.npy"),
                   "--eval", str(digits_npz[1]), "--epochs", "1", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file()
    assert "warning" in proc.stderr and "more than the teacher's" in proc.stderr
    # the human report: both tables, the warning again, and why alpha is 1
    for text in ("teacher vs student", "per class", "parameters", "accuracy", "warning:", "alpha 1",
                 "pure distillation"):
        assert text in proc.stdout, proc.stdout


BAD_INPUT = {
    "unknown spec": (["--student", "small"], "expected a Keras model file (.keras or .h5) or a width multiplier"),
    "missing student file": (["--student", "student.keras"], "no such file"),
    "zero width": (["--student", "width=0"], "the width multiplier must be a positive number"),
    "no labels, alpha below 1": (["--student", "width=0.5", "--data", "{unlabelled}", "--alpha", "0.5"],
                                 "has no labels"),
    "alpha outside 0-1": (["--student", "width=0.5", "--alpha", "1.5"], "--alpha 1.5: must be between 0 and 1"),
    "zero temperature": (["--student", "width=0.5", "--temperature", "0"], "--temperature 0: must be a positive"),
    "output not a model file": (["--student", "width=0.5", "-o", "{dir}/student.txt"], "use a .keras"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, digits_keras, digits_npz, digits, tmp_path):
    args, message = BAD_INPUT[case]
    np.save(tmp_path / "unlabelled.npy", digits[0][:50])
    out_dir = tmp_path / "out"
    fill = {"unlabelled": str(tmp_path / "unlabelled.npy"), "dir": str(out_dir)}
    args = [a.format(**fill) for a in args]
    base = ["distill", str(digits_keras), "--data", str(digits_npz[0]), "--epochs", "1", "-o",
            str(out_dir / "student.keras")]
    # later options win in argparse, so the case's own --data / -o replace the defaults
    proc = run_cli(*base, *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    error = [line for line in proc.stderr.splitlines() if line.startswith("litefleet: error:")]
    assert len(error) == 1 and message in error[0], proc.stderr[-2000:]
    if case == "no labels, alpha below 1":
        assert "--alpha 1" in error[0]        # says what to do instead
    assert _files(out_dir) == []


def test_width_multiplier_on_an_unsupported_architecture_names_the_layer(tmp_path):
    import keras

    from converter.distill import width_student
    from converter.errors import ModelInputError
    inputs = keras.Input((8, 8))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.LSTM(16, name="recurrent")(inputs))
    with pytest.raises(ModelInputError, match=r"recurrent \(LSTM\).*pass a student model file"):
        width_student(keras.Model(inputs, outputs), 0.5)


def test_width_student_keeps_the_class_scores_and_scales_the_rest(digits_source):
    from converter.distill import width_student
    teacher = digits_source._model
    student = width_student(teacher, 0.5)
    widths = {layer.name: layer.get_config().get("filters") or layer.get_config().get("units")
              for layer in student.layers}
    assert widths == {"conv2d": 8, "conv2d_1": 16, "max_pooling2d": None, "flatten": None, "dense": 32, "probs": 10}


def test_logits_are_recovered_exactly_from_a_softmax_output(digits_source, digits):
    import tensorflow as tf

    from converter.distill import teacher_logits
    x = digits[2][:64]
    logits, how = teacher_logits(digits_source, x)
    assert "without its softmax" in how
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), digits_source.reference_predict(x), atol=1e-5)


def test_distillation_loss_is_hintons(digits):
    from converter.distill import distillation_loss
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(8, 10)) * 3, rng.normal(size=(8, 10))
    y = rng.integers(0, 10, 8)
    T, alpha = 4.0, 0.7

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    pt, ps = softmax(t / T), softmax(s / T)
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), 1))
    ce = np.mean(-np.log(softmax(s)[np.arange(8), y]))
    total, soft, hard = distillation_loss(t, s, y, temperature=T, alpha=alpha)
    assert float(soft) == pytest.approx(kl, rel=1e-5)
    assert float(hard) == pytest.approx(ce, rel=1e-5)
    assert float(total) == pytest.approx(alpha * T * T * kl + (1 - alpha) * ce, rel=1e-5)


def test_savedmodel_teacher_teaches_a_student_file_through_its_probabilities(digits_savedmodel, digits_npz, tmp_path):
    import keras

    from converter.distill import distill
    student = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10),
                                keras.layers.Softmax()])
    student.save(tmp_path / "mlp.keras")
    result = distill(digits_savedmodel, str(tmp_path / "mlp.keras"), digits_npz[0], tmp_path / "out" / "mlp.keras",
                     eval_path=digits_npz[1], epochs=2)
    doc = result.report
    assert doc["settings"]["teacher_logits"] == "the log of its output probabilities"
    assert doc["settings"]["student_logits"].startswith("the input of its softmax layer")
    assert doc["teacher"]["kind"] == "savedmodel" and doc["teacher"]["parameters"] > doc["student"]["parameters"]
    assert doc["student"]["accuracy"] > 0.5
    assert _files(tmp_path / "out") == ["mlp.keras"]
