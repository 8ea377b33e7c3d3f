"""Load and run a model in every TFLite runtime a profile allows, for real.

A bundle is only worth signing if the runtimes on the devices can load it, so the converter
runs the model in each of them: ai-edge-litert in this process, tflite-runtime 2.14 in its
own numpy<2 environment (a subprocess: it cannot share a process with numpy 2), and
tensorflow.lite in this process when a profile allows it. Interpreter helpers for the other
checks (quantize an input, dequantize an output) live here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TFLITE214_ENV = "LITEFLEET_TFLITE214_PYTHON"
SUBPROCESS_TIMEOUT_S = 300.0


# Interpreter helpers -------------------------------------------------------------------

def litert_interpreter(model: bytes, threads: int = 1):
    """An ai-edge-litert interpreter with tensors allocated (what a device runs)."""
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=model, num_threads=threads)
    interp.allocate_tensors()
    return interp


def quant_params(detail: dict[str, Any]) -> tuple[float, int] | None:
    """(scale, zero_point) of a per-tensor quantized tensor, or None for a float tensor."""
    q = detail.get("quantization_parameters") or {}
    scales = q.get("scales")
    if scales is not None and len(scales):
        return float(scales[0]), int(q["zero_points"][0])
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return (float(scale), int(zero_point)) if scale else None


def quantize_input(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float samples in the model's input dtype: scaled, rounded and clipped for integer inputs."""
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return np.asarray(x, dtype=dtype)
    params = quant_params(detail)
    scale, zero_point = params if params else (1.0, 0)
    info = np.iinfo(dtype)
    return np.clip(np.round(np.asarray(x, np.float64) / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """An output in real units (float32), whatever its dtype."""
    params = quant_params(detail) if np.issubdtype(np.dtype(detail["dtype"]), np.integer) else None
    if params is None:
        return np.asarray(y, dtype=np.float32)
    scale, zero_point = params
    return ((np.asarray(y, np.float32) - zero_point) * scale).astype(np.float32)


def invoke_each(interp, samples: np.ndarray) -> list[np.ndarray]:
    """Run samples one by one (batch 1, as the model is built); one stacked array per output."""
    inp = interp.get_input_details()[0]
    outs = interp.get_output_details()
    results: list[list[np.ndarray]] = [[] for _ in outs]
    for sample in samples:
        interp.set_tensor(inp["index"], sample[None])
        interp.invoke()
        for i, detail in enumerate(outs):
            results[i].append(interp.get_tensor(detail["index"])[0].copy())
    return [np.stack(r) for r in results]


# Running in each runtime ---------------------------------------------------------------

@dataclass
class RuntimeRun:
    """What one runtime did with the model: its raw outputs per sample, or why it failed."""

    runtime: str
    ok: bool
    version: str = ""
    outputs: list[np.ndarray] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "ok": self.ok, "version": self.version, "error": self.error,
                "seconds": round(self.seconds, 3)}


def _version(module: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "unknown"


def run_litert(model: bytes, samples: np.ndarray, threads: int) -> RuntimeRun:
    """ai-edge-litert in this process."""
    start = time.perf_counter()
    try:
        outputs = invoke_each(litert_interpreter(model, threads), samples)
    except Exception as exc:  # noqa: BLE001 - any load or invoke failure is the finding
        return RuntimeRun("ai-edge-litert", False, _version("ai-edge-litert"), error=_one_line(exc),
                          seconds=time.perf_counter() - start)
    return RuntimeRun("ai-edge-litert", True, _version("ai-edge-litert"), outputs, seconds=time.perf_counter() - start)


def run_tensorflow(model: bytes, samples: np.ndarray, threads: int) -> RuntimeRun:
    """tensorflow.lite in this process (host only; devices never install tensorflow)."""
    start = time.perf_counter()
    try:
        import tensorflow as tf
        interp = tf.lite.Interpreter(model_content=model, num_threads=threads)
        interp.allocate_tensors()
        outputs = invoke_each(interp, samples)
    except Exception as exc:  # noqa: BLE001
        return RuntimeRun("tensorflow", False, _version("tensorflow-cpu"), error=_one_line(exc),
                          seconds=time.perf_counter() - start)
    return RuntimeRun("tensorflow", True, _version("tensorflow-cpu"), outputs, seconds=time.perf_counter() - start)


def tflite214_python() -> Path:
    """The python of the tflite-runtime 2.14 environment: $LITEFLEET_TFLITE214_PYTHON or .venv-tflite214."""
    env = os.environ.get(TFLITE214_ENV)
    return Path(env) if env else ROOT / ".venv-tflite214" / "bin" / "python"


def missing_env_message(python: Path) -> str:
    return (f"the tflite-runtime 2.14 environment is missing ({python} not found): run scripts/setup to create "
            f".venv-tflite214, or set {TFLITE214_ENV} to a python with tflite-runtime==2.14 and numpy<2")


# Runs inside the numpy<2 environment: load the model from a file, invoke each sample, print JSON.
_SCRIPT = r"""
import json, sys
import numpy as np
try:
    from importlib import metadata
    version = metadata.version("tflite-runtime")
except Exception:
    version = "unknown"
try:
    from tflite_runtime.interpreter import Interpreter
    interp = Interpreter(model_path=sys.argv[1], num_threads=int(sys.argv[3]))
    interp.allocate_tensors()
    samples = np.load(sys.argv[2])
    inp = interp.get_input_details()[0]
    outs = interp.get_output_details()
    results = [[] for _ in outs]
    for sample in samples:
        interp.set_tensor(inp["index"], sample[None])
        interp.invoke()
        for i, d in enumerate(outs):
            results[i].append(interp.get_tensor(d["index"])[0].tolist())
    print(json.dumps({"ok": True, "version": version,
                      "outputs": [{"dtype": np.dtype(d["dtype"]).name, "data": r} for d, r in zip(outs, results)]}))
except Exception as exc:
    print(json.dumps({"ok": False, "version": version, "error": " ".join(str(exc).split()) or type(exc).__name__}))
    sys.exit(1)
"""


def run_tflite_runtime(model: bytes, samples: np.ndarray, threads: int, python: Path | None = None) -> RuntimeRun:
    """tflite-runtime 2.14 in its own environment, as a subprocess fed through temp files."""
    python = python or tflite214_python()
    start = time.perf_counter()
    if not python.exists():
        return RuntimeRun("tflite-runtime", False, error=missing_env_message(python))
    with tempfile.TemporaryDirectory(prefix="litefleet-tflite214-") as tmp:
        model_path, samples_path = Path(tmp) / "model.tflite", Path(tmp) / "samples.npy"
        model_path.write_bytes(model)
        np.save(samples_path, np.ascontiguousarray(samples))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        try:
            proc = subprocess.run([str(python), "-c", _SCRIPT, str(model_path), str(samples_path), str(threads)],
                                  capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return RuntimeRun("tflite-runtime", False, error=f"cannot run {python}: {_one_line(exc)}",
                              seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    try:
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = " ".join(proc.stderr.split()[-40:])
        return RuntimeRun("tflite-runtime", False, error=f"{python} exited with {proc.returncode}: {tail}",
                          seconds=seconds)
    if not doc.get("ok"):
        return RuntimeRun("tflite-runtime", False, doc.get("version", ""), error=doc.get("error", ""), seconds=seconds)
    outputs = [np.asarray(o["data"], dtype=o["dtype"]) for o in doc["outputs"]]
    return RuntimeRun("tflite-runtime", True, doc.get("version", ""), outputs, seconds=seconds)


RUNNERS = {"ai-edge-litert": run_litert, "tflite-runtime": run_tflite_runtime, "tensorflow": run_tensorflow}


def run_all(model: bytes, samples: np.ndarray, allowed: list[str], threads: int) -> list[RuntimeRun]:
    """Run ``samples`` (already in the model's input dtype, shape (N, *input[1:])) in each runtime."""
    return [RUNNERS[name](model, samples, threads) for name in allowed]


AGREE_STEPS = 2.0  # quantization steps two runtimes' outputs may differ by (measured: see below)


def output_steps(model: bytes) -> list[float | None]:
    """The quantization step of each output, in the output's own units, or None for a float model.

    Integer outputs: 1 (their unit is the step). Float outputs fed by a DEQUANTIZE (a
    quantized model with float I/O): the scale of the DEQUANTIZE's input, since the runtimes'
    integer kernels differ in whole steps of it.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    root = schema.Model.GetRootAsModel(model, 0)
    graph = root.Subgraphs(0)
    producer: dict[int, Any] = {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        for j in range(op.OutputsLength()):
            producer[op.Outputs(j)] = op
    dequantize = schema.BuiltinOperator.DEQUANTIZE
    steps: list[float | None] = []
    for k in range(graph.OutputsLength()):
        index = graph.Outputs(k)
        tensor = graph.Tensors(index)
        if tensor.Type() not in (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16):
            steps.append(1.0)
            continue
        op = producer.get(index)
        step = None
        if op is not None:
            code = root.OperatorCodes(op.OpcodeIndex())
            if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == dequantize and op.InputsLength():
                q = graph.Tensors(op.Inputs(0)).Quantization()
                if q is not None and q.ScaleLength():
                    step = float(q.Scale(0))
        steps.append(step)
    return steps


def outputs_agree(reference: list[np.ndarray], other: list[np.ndarray], steps: list[float | None] | None = None,
                  float_rtol: float = 1e-3) -> tuple[bool, float, str]:
    """Whether two runtimes' raw outputs agree.

    Quantized outputs (integer, or float behind a DEQUANTIZE) may differ by AGREE_STEPS
    quantization steps: tflite-runtime 2.14 and ai-edge-litert 2.3 round differently inside
    their int8 kernels (measured on the digits CNN: 2 steps on 2 of 3,600 int8 outputs), and
    the device's smoke test allows the same. Float outputs of float models may differ by
    ``float_rtol`` of the largest reference magnitude. Returns (agree, worst difference, unit).
    """
    worst, unit, ok = 0.0, "", True
    if len(reference) != len(other):
        return False, float("inf"), "outputs"
    steps = steps or [None] * len(reference)
    for ref, out, step in zip(reference, other, steps):
        if ref.shape != out.shape:
            return False, float("inf"), f"shape {out.shape} vs {ref.shape}"
        diff = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64)))) if ref.size else 0.0
        if np.issubdtype(ref.dtype, np.integer):
            this, this_unit, bound = diff, "quantization steps", AGREE_STEPS
        elif step:
            this, this_unit, bound = diff / step, "quantization steps", AGREE_STEPS + 1e-6
        else:
            this, this_unit = diff, "absolute"
            bound = float_rtol * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
        if this > bound:
            ok = False
        if this >= worst:
            worst, unit = this, this_unit
    return ok, worst, unit


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# Memory ----------------------------------------------------------------------------------

def constant_tensors(model: bytes) -> set[int]:
    """Indices of the main subgraph's tensors whose data is stored in the model (weights)."""
    from tensorflow.lite.python import schema_py_generated as schema
    root = schema.Model.GetRootAsModel(model, 0)
    subgraph = root.Subgraphs(0)
    constants = set()
    for i in range(subgraph.TensorsLength()):
        buffer_index = subgraph.Tensors(i).Buffer()
        if 0 < buffer_index < root.BuffersLength():
            buf = root.Buffers(buffer_index)
            if buf.DataLength() > 0 or buf.Offset() > 1:
                constants.add(i)
    return constants


def memory_estimate(model: bytes, threads: int = 1) -> dict[str, int]:
    """Estimated runtime memory of a model on a device.

    ``arena_bytes`` is the sum of the sizes of every non-constant tensor after
    ``allocate_tensors()`` (inputs, outputs, activations, kernel scratch): an upper bound on
    TFLite's arena, whose planner shares memory between tensors that are not alive at the
    same time. ``peak_memory_bytes`` adds the model itself (the interpreter keeps it mapped).
    ``rss_delta_bytes`` is this process's resident-set growth while loading, allocating and
    invoking once: informative only, since freed memory of earlier interpreters is reused.
    """
    import psutil
    process = psutil.Process()
    before = process.memory_info().rss
    interp = litert_interpreter(model, threads)
    inp = interp.get_input_details()[0]
    interp.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    interp.invoke()
    rss_delta = max(0, process.memory_info().rss - before)
    constants = constant_tensors(model)
    arena = 0
    for detail in interp.get_tensor_details():
        if detail["index"] in constants:
            continue
        shape = detail.get("shape")
        count = int(np.prod(shape)) if shape is not None and len(shape) else 1
        arena += count * np.dtype(detail["dtype"]).itemsize
    return {"arena_bytes": int(arena), "peak_memory_bytes": int(arena + len(model)), "rss_delta_bytes": int(rss_delta)}
