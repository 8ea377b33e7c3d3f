"""Loading source models: .keras, .h5, SavedModel and .tflite, and clear errors for everything else."""

from __future__ import annotations

import numpy as np
import pytest

from converter.errors import ModelInputError
from converter.models import load_source
from tests.converter_fixtures import *  # noqa: F401,F403


def test_keras_source_is_pinned_to_batch_one_and_predicts_like_the_trained_model(digits_source, digits):
    _, _, x_test, y_test = digits
    assert digits_source.kind == "keras"
    assert digits_source.input_shape == (1, 8, 8, 1)
    assert digits_source.input_dtype == "float32"
    assert digits_source.input_name == "image"
    assert digits_source.output_names == ["probs"]
    probs = digits_source.reference_predict(x_test)
    assert probs.shape == (len(x_test), 10) and probs.dtype == np.float32
    assert (probs.argmax(1) == y_test).mean() > 0.9


@pytest.mark.parametrize("fixture, kind", [("digits_h5", "h5"), ("digits_savedmodel", "savedmodel")])
def test_h5_and_savedmodel_give_the_same_outputs_as_keras(request, fixture, kind, digits_source, digits):
    x = digits[2][:50]
    source = load_source(request.getfixturevalue(fixture))
    assert source.kind == kind
    assert source.input_shape == (1, 8, 8, 1)
    np.testing.assert_allclose(source.reference_predict(x), digits_source.reference_predict(x), atol=1e-5)
    concrete = source.concrete_function()
    assert concrete.inputs[0].shape.as_list() == [1, 8, 8, 1]


def test_tflite_source_is_kept_as_is_and_predicts_dequantized(digits_tflite_int8, digits_source,
                                                              digits, tmp_path):
    path = tmp_path / "digits_int8.tflite"
    path.write_bytes(digits_tflite_int8)
    source = load_source(path)
    assert source.kind == "tflite"
    assert source.tflite == digits_tflite_int8
    assert source.input_dtype == "int8" and source.input_shape == (1, 8, 8, 1)
    x, y = digits[2][:100], digits[3][:100]
    probs = source.reference_predict(x)
    assert probs.dtype == np.float32 and probs.shape == (100, 10)
    agree = (probs.argmax(1) == digits_source.reference_predict(x).argmax(1)).mean()
    assert agree > 0.9
    with pytest.raises(ModelInputError, match="used as it is"):
        source.concrete_function()


def _one_line_naming(exc: pytest.ExceptionInfo, path) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_text_file_renamed_keras_is_a_model_input_error(tmp_path):
    path = tmp_path / "notes.keras"
    path.write_text("these are my notes, not a model\n")
    with pytest.raises(ModelInputError) as exc:
        load_source(path)
    assert "cannot load as a Keras model" in _one_line_naming(exc, path)


def test_random_directory_is_not_a_savedmodel(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ModelInputError) as exc:
        load_source(tmp_path)
    assert "not a SavedModel" in _one_line_naming(exc, tmp_path)


def test_truncated_tflite_is_rejected(digits_tflite_float, tmp_path):
    path = tmp_path / "cut.tflite"
    path.write_bytes(digits_tflite_float[: len(digits_tflite_float) // 3])
    with pytest.raises(ModelInputError) as exc:
        load_source(path)
    _one_line_naming(exc, path)


def test_non_tflite_bytes_with_tflite_suffix(tmp_path):
    path = tmp_path / "photo.tflite"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ModelInputError) as exc:
        load_source(path)
    assert "TFL3" in _one_line_naming(exc, path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(ModelInputError) as exc:
        load_source(tmp_path / "nope.keras")
    assert "no such file" in _one_line_naming(exc, tmp_path / "nope.keras")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x01")
    with pytest.raises(ModelInputError) as exc:
        load_source(onnx)
    assert "'.onnx'" in _one_line_naming(exc, onnx)


def test_unknown_spatial_dimensions_cannot_be_fixed(tmp_path):
    import keras
    model = keras.Sequential([keras.Input(shape=(None, None, 1)), keras.layers.Conv2D(2, 3),
                              keras.layers.GlobalAveragePooling2D()])
    path = tmp_path / "any_size.keras"
    model.save(path)
    with pytest.raises(ModelInputError) as exc:
        load_source(path)
    assert "only the batch dimension may be unknown" in _one_line_naming(exc, path)
