"""Load the model the operator wants to ship: Keras (.keras, .h5), a SavedModel, or a .tflite.

Every source is pinned to a batch size of 1 here, because a dynamic batch dimension in the
converted model stops delegates (XNNPACK, Edge TPU, GPU) from planning it ahead of time.
A .tflite file is taken as it is: it is never converted again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelInputError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

KERAS_SUFFIXES = {".keras": "keras", ".h5": "h5", ".hdf5": "h5"}
PREDICT_BATCH = 256


@dataclass
class SourceModel:
    """A loaded source model and what the converter needs to know about its single input."""

    path: Path
    kind: str                      # "keras" | "h5" | "savedmodel" | "tflite"
    input_shape: tuple[int, ...]   # batch dimension fixed to 1, e.g. (1, 8, 8, 1)
    input_dtype: str
    input_name: str
    output_names: list[str]
    tflite: bytes | None = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False)       # keras.Model, or the SavedModel's signature
    _interpreter: Any = field(default=None, repr=False)
    _keepalive: Any = field(default=None, repr=False)   # a SavedModel's signature holds its variables weakly

    def concrete_function(self):
        """A concrete tf.function with a fixed ``[1, ...]`` input, ready for TFLiteConverter.

        Keras models are called directly (training=False); SavedModels through their serving
        signature. Outputs are returned as a dict so the TFLite output tensors keep their names.
        """
        if self.kind == "tflite":
            raise ModelInputError(f"{self.path}: a .tflite model is used as it is and has no TensorFlow function")
        import tensorflow as tf
        spec = tf.TensorSpec(list(self.input_shape), tf.as_dtype(self.input_dtype), name=self.input_name)
        model, names, input_name = self._model, self.output_names, self.input_name
        if self.kind == "savedmodel":
            fn = tf.function(lambda x: dict(model(**{input_name: x})))
        else:
            def call(x):
                out = model(x, training=False)
                outs = out if isinstance(out, (list, tuple)) else [out]
                return {name: o for name, o in zip(names, outs)}
            fn = tf.function(call)
        return fn.get_concrete_function(spec)

    def reference_predict(self, x: np.ndarray) -> np.ndarray:
        """The source model's float output (the first output) for a batch, computed in chunks.

        For a .tflite source this runs the model in ai-edge-litert one sample at a time,
        quantizing the input and dequantizing the output with the tensors' own parameters.
        """
        x = np.asarray(x)
        if x.shape[1:] != self.input_shape[1:]:
            raise ModelInputError(f"{self.path}: input batch has shape {x.shape}, "
                                  f"the model takes (N, {', '.join(map(str, self.input_shape[1:]))})")
        if self.kind == "tflite":
            return self._predict_tflite(x)
        import tensorflow as tf
        outs = []
        for start in range(0, len(x), PREDICT_BATCH):
            chunk = tf.constant(x[start:start + PREDICT_BATCH].astype(self.input_dtype))
            if self.kind == "savedmodel":
                out = self._model(**{self.input_name: chunk})[self.output_names[0]]
            else:
                out = self._model(chunk, training=False)
                if isinstance(out, (list, tuple)):
                    out = out[0]
                elif isinstance(out, dict):
                    out = out[self.output_names[0]]
            outs.append(np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.float32))
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    def _predict_tflite(self, x: np.ndarray) -> np.ndarray:
        interp = self._interpreter
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        results = []
        for sample in x:
            batch = sample[None]
            if np.issubdtype(inp["dtype"], np.integer):
                scale, zero = inp["quantization"]
                if scale:
                    info = np.iinfo(inp["dtype"])
                    batch = np.clip(np.round(batch / scale + zero), info.min, info.max)
            interp.set_tensor(inp["index"], batch.astype(inp["dtype"]))
            interp.invoke()
            y = interp.get_tensor(out["index"])
            if np.issubdtype(out["dtype"], np.integer):
                scale, zero = out["quantization"]
                y = (y.astype(np.float32) - zero) * scale if scale else y.astype(np.float32)
            results.append(np.asarray(y, dtype=np.float32)[0])
        return np.stack(results) if results else np.zeros((0,), np.float32)


def load_source(path: str | Path) -> SourceModel:
    """Load a model; ModelInputError (one line naming the file and the problem) when it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise ModelInputError(f"{path}: no such file or directory")
    if path.is_dir():
        if not ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()):
            raise ModelInputError(f"{path}: a directory but not a SavedModel (no saved_model.pb in it)")
        return _load_savedmodel(path)
    suffix = path.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        return _load_keras(path, KERAS_SUFFIXES[suffix])
    if suffix == ".tflite":
        return _load_tflite(path)
    raise ModelInputError(f"{path}: unsupported model format {suffix or '(no suffix)'!r}; "
                          "expected a .keras or .h5 file, a SavedModel directory, or a .tflite file")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _fixed_shape(path: Path, shape, what: str) -> tuple[int, ...]:
    dims = list(shape)
    if not dims:
        raise ModelInputError(f"{path}: {what} is a scalar; litefleet needs a batched input")
    rest = dims[1:]
    if any(d is None or d < 0 for d in rest):
        raise ModelInputError(f"{path}: {what} has shape {tuple(dims)}; only the batch dimension may be "
                              "unknown (re-export the model with fixed height/width/channels)")
    return (1, *(int(d) for d in rest))


def _layer_name(tensor) -> str:
    """The name of the layer that produced a Keras output tensor (what the operator called it)."""
    history = getattr(tensor, "_keras_history", None)
    operation = getattr(history, "operation", None) if history is not None else None
    return getattr(operation, "name", "") or ""


def _load_keras(path: Path, kind: str) -> SourceModel:
    try:
        import keras
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise ModelInputError(f"{path}: cannot load as a Keras model ({_first_line(exc)})") from None
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise ModelInputError(f"{path}: the model has {len(inputs)} inputs; litefleet converts single-input models")
    tensor = inputs[0]
    shape = _fixed_shape(path, tensor.shape, f"input {tensor.name!r}")
    outputs = model.outputs if isinstance(model.outputs, (list, tuple)) else [model.outputs]
    names = [_layer_name(t) or f"output_{i}" for i, t in enumerate(outputs)]
    if len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(outputs))]
    return SourceModel(path=path, kind=kind, input_shape=shape, input_dtype=str(np.dtype(tensor.dtype).name),
                       input_name=tensor.name or "input", output_names=names, _model=model)


def _load_savedmodel(path: Path) -> SourceModel:
    try:
        import tensorflow as tf
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ModelInputError(f"{path}: cannot load the SavedModel ({_first_line(exc)})") from None
    signatures = getattr(loaded, "signatures", {}) or {}
    if "serving_default" not in signatures:
        raise ModelInputError(f"{path}: the SavedModel has no 'serving_default' signature "
                              f"(has: {', '.join(signatures) or 'none'}); export it with model.export()")
    sig = signatures["serving_default"]
    _, kwargs = sig.structured_input_signature
    if len(kwargs) != 1:
        raise ModelInputError(f"{path}: the serving signature has {len(kwargs)} inputs; "
                              "litefleet converts single-input models")
    (input_name, spec), = kwargs.items()
    shape = _fixed_shape(path, spec.shape.as_list() if spec.shape.rank is not None else [],
                         f"input {input_name!r}")
    names = sorted(sig.structured_outputs)
    return SourceModel(path=path, kind="savedmodel", input_shape=shape, input_dtype=spec.dtype.name,
                       input_name=input_name, output_names=names, _model=sig, _keepalive=loaded)


def _load_tflite(path: Path) -> SourceModel:
    from .ops import parse_model
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        parse_model(data)
    except ModelInputError as exc:
        raise ModelInputError(f"{path}: {exc}") from None
    try:
        from ai_edge_litert.interpreter import Interpreter
        interp = Interpreter(model_content=data)
        interp.allocate_tensors()
    except Exception as exc:
        raise ModelInputError(f"{path}: not a loadable TFLite model ({_first_line(exc)})") from None
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1:
        raise ModelInputError(f"{path}: the model has {len(inputs)} inputs; litefleet deploys single-input models")
    inp = inputs[0]
    signature = [int(d) for d in inp.get("shape_signature", inp["shape"])]
    if signature and signature[0] < 0:
        raise ModelInputError(f"{path}: the input has a dynamic batch dimension {tuple(signature)}; "
                              "convert from the Keras/SavedModel source so litefleet can fix it to 1")
    shape = _fixed_shape(path, signature, f"input {inp['name']!r}")
    return SourceModel(path=path, kind="tflite", input_shape=shape, input_dtype=np.dtype(inp["dtype"]).name,
                       input_name=inp["name"], output_names=[o["name"] for o in outputs], tflite=data,
                       _interpreter=interp)
