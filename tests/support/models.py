"""Small real models for tests: the digits CNN from converter.examples, plainly converted."""

from __future__ import annotations

from pathlib import Path

from converter.examples import build_digits_cnn, digits_data, train_digits_cnn  # noqa: F401  (re-exported)


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
