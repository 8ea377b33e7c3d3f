"""Convert a source model to TFLite in one of five quantization modes, within the runtime's reach.

The converter is asked for a model with a fixed batch of 1. After each conversion every op
and op version is read back and compared with the profile's oldest allowed runtime
(``runtime.min_version``); if an op is too new, the conversion is redone with settings that
avoid it (TF 2.21's dynamic-range FULLY_CONNECTED v12 needs runtime 2.17, the dense
per-channel switch gives v9 which tflite-runtime 2.14 loads). Op versions are never patched
down by hand: a kernel that does not understand the newer encoding computes garbage.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


from .data import Dataset
from .errors import ConversionError
from .models import SourceModel
from .ops import OpUse, blocking, model_ops, parse_model, runtime_problems

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODES = ("float32", "float16", "dynamic", "int8", "int16x8")
IO_TYPES = {
    "float32": ("float32",),
    "float16": ("float32",),
    "dynamic": ("float32",),
    "int8": ("int8", "uint8", "float32"),
    "int16x8": ("int16", "float32"),
}
DENSE_FLAG = "_experimental_disable_per_channel_quantization_for_dense_layers"
PER_CHANNEL_FLAG = "_experimental_disable_per_channel"
# Settings tried in order for quantized modes until every op fits the runtime.
RETRIES: tuple[dict[str, bool], ...] = (
    {},
    {DENSE_FLAG: True},
    {DENSE_FLAG: True, PER_CHANNEL_FLAG: True},
)
# TensorType enum of the TFLite schema -> numpy dtype name.
TENSOR_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8",
                10: "float64", 15: "uint32", 16: "uint16"}


@dataclass
class Conversion:
    """The converted model and everything about how it was made (recorded in the manifest)."""

    tflite: bytes
    mode: str
    input_type: str
    output_type: str
    calibration_samples: int
    settings: dict
    ops: list[OpUse]
    runtime_notes: list[str] = field(default_factory=list)   # op versions the table cannot vouch for


def convert(source: SourceModel, *, mode: str, input_type: str, output_type: str,
            calibration: Dataset | None, runtime_min_version: str,
            progress: Callable[[str], None], sparse_weights: bool = False) -> Conversion:
    """Convert ``source``; ConversionError naming the op and version when no settings fit the runtime.

    ``sparse_weights`` adds TFLite's EXPERIMENTAL_SPARSITY optimization: the converter stores
    mostly-zero weights (a pruned model) in a sparse encoding behind DENSIFY ops.
    """
    if source.kind == "tflite":
        return _existing(source, runtime_min_version, progress)
    _check_request(mode, input_type, output_type, calibration, source)
    attempts = RETRIES if mode in ("dynamic", "int8", "int16x8") else ({},)
    tried: list[tuple[dict, list[str]]] = []
    for extra in attempts:
        if tried:
            progress(f"retrying with {', '.join(f'{k}={v}' for k, v in extra.items())} "
                     f"because {tried[-1][1][0]}")
        tflite, settings = _convert_once(source, mode, input_type, output_type, calibration, extra, progress,
                                         sparse_weights)
        ops = model_ops(tflite)
        problems = runtime_problems(ops, runtime_min_version)
        hard = blocking(problems)
        if not hard:
            _check_result(tflite, source, input_type, output_type)
            if tried:
                settings["runtime_retry"] = "; ".join(tried[0][1]) + " (with the default settings)"
            for note in problems:
                progress(f"warning: {note}")
            samples = len(calibration) if calibration is not None and mode in ("int8", "int16x8") else 0
            return Conversion(tflite=tflite, mode=mode, input_type=input_type, output_type=output_type,
                              calibration_samples=samples, settings=settings, ops=ops, runtime_notes=problems)
        tried.append((extra, hard))
    best = min(tried, key=lambda t: len(t[1]))[1]
    raise ConversionError(f"{mode} conversion of {source.path} needs a newer runtime than the profile allows: "
                          f"{'; '.join(best)} (tried {len(tried)} setting(s)); "
                          "choose another quantization mode or a profile with a newer runtime.min_version")


def _check_request(mode: str, input_type: str, output_type: str, calibration: Dataset | None,
                   source: SourceModel) -> None:
    if mode not in MODES:
        raise ConversionError(f"unknown quantization mode {mode!r}; expected one of {', '.join(MODES)}")
    allowed = IO_TYPES[mode]
    for what, value in (("input_type", input_type), ("output_type", output_type)):
        if value not in allowed:
            raise ConversionError(f"mode {mode!r} takes {what} {' or '.join(allowed)}, got {value!r}")
    if mode in ("int8", "int16x8"):
        if calibration is None or len(calibration) == 0:
            raise ConversionError(f"mode {mode!r} needs calibration data (a representative sample of real inputs)")
        if tuple(calibration.x.shape[1:]) != tuple(source.input_shape[1:]):
            raise ConversionError(f"calibration data {calibration.source} has samples of shape "
                                  f"{tuple(calibration.x.shape[1:])}, the model takes {tuple(source.input_shape[1:])}")


def _representative(calibration: Dataset, progress: Callable[[str], None]) -> Callable[[], Iterator[list]]:
    """A generator factory that feeds one sample at a time and reports every 10%."""
    x = calibration.x
    total = len(x)

    def gen() -> Iterator[list]:
        step = max(1, total // 10)
        for i in range(total):
            yield [x[i:i + 1]]
            done = i + 1
            if done % step == 0 or done == total:
                progress(f"calibrating: {done}/{total} samples ({100 * done // total}%)")
    return gen


def _build_converter(source: SourceModel, mode: str, input_type: str, output_type: str,
                     calibration: Dataset | None, extra: dict, progress: Callable[[str], None],
                     sparse_weights: bool = False):
    """A TFLiteConverter for ``mode`` and the dict of every flag set on it (for the manifest)."""
    import tensorflow as tf
    concrete = source.concrete_function()
    # No trackable object: in a standalone run TF 2.21 with a Keras 3 model passed here kept the
    # weights as resource variables (VAR_HANDLE/READ_VARIABLE ops) instead of freezing them.
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    settings: dict = {"batch_size": 1, "input_shape": list(source.input_shape)}
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        settings["optimizations"] = ["DEFAULT"]
    if sparse_weights:
        converter.optimizations = [*converter.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
        settings["optimizations"] = [*settings.get("optimizations", []), "EXPERIMENTAL_SPARSITY"]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
        settings["supported_types"] = ["float16"]
    if mode in ("int8", "int16x8"):
        converter.representative_dataset = _representative(calibration, progress)
        settings["representative_dataset_samples"] = len(calibration)
        if mode == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            settings["supported_ops"] = ["TFLITE_BUILTINS_INT8"]
        else:
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
            settings["supported_ops"] = ["EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8"]
        if input_type != "float32":
            converter.inference_input_type = tf.as_dtype(input_type)
        if output_type != "float32":
            converter.inference_output_type = tf.as_dtype(output_type)
        settings["inference_input_type"] = input_type
        settings["inference_output_type"] = output_type
    for name, value in extra.items():
        setattr(converter, name, value)
        settings[name] = value
    return converter, settings


def make_converter(source: SourceModel, conversion: Conversion, calibration: Dataset | None):
    """A fresh, unconverted TFLiteConverter set up exactly like ``conversion`` but with float I/O.

    For TF's quantization debugger, which compares each quantized layer with its float twin and
    needs the converter itself rather than the converted bytes.
    """
    extra = {k: v for k, v in conversion.settings.items() if k in (DENSE_FLAG, PER_CHANNEL_FLAG)}
    converter, _ = _build_converter(source, conversion.mode, "float32", "float32", calibration, extra,
                                    lambda _: None)
    return converter


def _convert_once(source: SourceModel, mode: str, input_type: str, output_type: str,
                  calibration: Dataset | None, extra: dict[str, bool],
                  progress: Callable[[str], None], sparse_weights: bool = False) -> tuple[bytes, dict]:
    converter, settings = _build_converter(source, mode, input_type, output_type, calibration, extra, progress,
                                           sparse_weights)
    progress(f"converting {source.path.name} to TFLite ({mode})")
    try:
        tflite = converter.convert()
    except Exception as exc:
        first = str(exc).strip().splitlines()
        detail = first[0][:300] if first else type(exc).__name__
        raise ConversionError(f"TensorFlow could not convert {source.path} in mode {mode!r}: {detail}") from None
    return bytes(tflite), settings


def io_details(tflite: bytes) -> tuple[list[int], str, str]:
    """(input shape signature, input dtype, output dtype) read from the flatbuffer itself."""
    model = parse_model(tflite)
    graph = model.Subgraphs(0)
    inp = graph.Tensors(graph.Inputs(0))
    out = graph.Tensors(graph.Outputs(0))
    signature = inp.ShapeSignatureAsNumpy() if not inp.ShapeSignatureIsNone() else inp.ShapeAsNumpy()
    return ([int(d) for d in signature], TENSOR_TYPES.get(inp.Type(), str(inp.Type())),
            TENSOR_TYPES.get(out.Type(), str(out.Type())))


def _check_result(tflite: bytes, source: SourceModel, input_type: str, output_type: str) -> None:
    signature, got_in, got_out = io_details(tflite)
    if any(d < 0 for d in signature):
        raise ConversionError(f"converted model of {source.path} has a dynamic input shape {tuple(signature)}; "
                              "delegates need a fixed batch of 1")
    if (got_in, got_out) != (input_type, output_type):
        raise ConversionError(f"converted model of {source.path} has {got_in} input and {got_out} output, "
                              f"the profile asks for {input_type} and {output_type}")


def infer_mode(tflite: bytes) -> str:
    """The quantization mode of an existing .tflite, read from its tensor types.

    int16 activations -> int16x8; int8/uint8 activations -> int8; int8 weights with float
    activations -> dynamic; float16 weights -> float16; otherwise float32.
    """
    model = parse_model(tflite)
    constant: set[str] = set()
    variable: set[str] = set()
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            kind = TENSOR_TYPES.get(tensor.Type(), "other")
            buf = model.Buffers(tensor.Buffer()) if tensor.Buffer() < model.BuffersLength() else None
            has_data = buf is not None and (buf.DataLength() > 0 or buf.Offset() > 1)
            (constant if has_data else variable).add(kind)
    if "int16" in variable:
        return "int16x8"
    if variable & {"int8", "uint8"}:
        return "int8"
    if "int8" in constant:
        return "dynamic"
    if "float16" in constant:
        return "float16"
    return "float32"


def _existing(source: SourceModel, runtime_min_version: str, progress: Callable[[str], None]) -> Conversion:
    tflite = source.tflite or b""
    ops = model_ops(tflite)
    problems = runtime_problems(ops, runtime_min_version)
    hard = blocking(problems)
    if hard:
        raise ConversionError(f"{source.path} (used as is, not converted again) needs a newer runtime than the "
                              f"profile allows: {'; '.join(hard)}; convert it from the Keras or SavedModel source")
    for note in problems:
        progress(f"warning: {note}")
    _, input_type, output_type = io_details(tflite)
    mode = infer_mode(tflite)
    progress(f"{source.path.name} is already TFLite ({mode}); using it as is")
    return Conversion(tflite=tflite, mode=mode, input_type=input_type, output_type=output_type,
                      calibration_samples=0, settings={"converted": False, "source": "tflite"}, ops=ops,
                      runtime_notes=problems)
