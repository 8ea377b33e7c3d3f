"""Load a model on the best accelerator the device has, and serve inferences from it.

The profile's delegate chain is tried in order (Edge TPU, GPU, any external delegate) and ends
at XNNPACK on the CPU, so loading never fails because an accelerator is absent. Each failure is
told apart (library missing, no device, refused the graph, failed at run time, wrong answers,
model not compiled for it), logged once per library and reason, and emitted as an event.
Before an accelerator is used its output on the manifest's sample input is compared with the
CPU's: an accelerator that gives wrong answers is not used.

Interpreters are not thread-safe, so a :class:`LoadedModel` keeps a pool of ``workers``
interpreters and lends one per call; ``invoke`` releases the GIL, so workers run in parallel.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agent import events as ev
from agent.errors import InferenceError, ModelLoadError, SmokeTestError
from agent.events import Event, EventSink, discard
from agent.protocol.manifest import Manifest, TensorData
from agent.protocol.profiles import Delegate, Profile
from agent.runtime import Runtime, select_runtime
from agent.tflite_graph import EDGETPU_CUSTOM_OP, GraphInfo, ModelFormatError, read_graph

log = logging.getLogger("litefleet.engine")

OUTCOMES = ("used", "missing", "no_device", "invoke_failed", "wrong_output", "not_compiled_for_it", "failed")
ACCELERATORS = ("edgetpu", "gpu", "external")


@dataclass(frozen=True)
class DelegateAttempt:
    """One step of the delegate chain and what became of it."""

    kind: str
    library: str
    outcome: str   # one of OUTCOMES
    reason: str    # one line a person can act on


@dataclass(frozen=True)
class EngineReport:
    """What the model finally runs on, and why the steps before it were not used."""

    runtime: str
    runtime_version: str
    delegate: str              # kind finally used: "edgetpu" | "gpu" | "external" | "xnnpack"
    threads: int
    workers: int
    delegated_nodes: int | None
    total_nodes: int | None
    full_graph: bool | None
    attempts: tuple[DelegateAttempt, ...]

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["attempts"] = [asdict(a) for a in self.attempts]
        return doc


# ---------------------------------------------------------------------------------------------
# Tensors: specs and (de)quantization (pure)


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the interpreter sees it."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: np.ndarray | None        # None when the tensor is not quantized
    zero_point: np.ndarray | None
    quantized_dimension: int

    @classmethod
    def from_detail(cls, detail: dict[str, Any]) -> "TensorSpec":
        q = detail.get("quantization_parameters") or {}
        scales = np.asarray(q.get("scales", []), dtype=np.float32)
        zeros = np.asarray(q.get("zero_points", []), dtype=np.int64)
        dtype = np.dtype(detail["dtype"])
        quantized = dtype.kind in "iu" and scales.size > 0 and bool(np.any(scales != 0))
        return cls(index=int(detail["index"]), name=str(detail["name"]),
                   shape=tuple(int(d) for d in detail["shape"]), dtype=dtype,
                   scale=scales if quantized else None,
                   zero_point=(zeros if zeros.size else np.zeros_like(scales, dtype=np.int64)) if quantized else None,
                   quantized_dimension=int(q.get("quantized_dimension", 0)))

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def _broadcast(self, values: np.ndarray) -> np.ndarray:
        if values.size == 1:
            return values.reshape(())
        shape = [1] * len(self.shape)
        shape[self.quantized_dimension] = values.size
        return values.reshape(shape)

    @functools.cached_property
    def _scale_f32(self) -> np.ndarray:
        return self._broadcast(np.asarray(self.scale, dtype=np.float32))

    @functools.cached_property
    def _zero_point_f32(self) -> np.ndarray:
        return self._broadcast(np.asarray(self.zero_point, dtype=np.float32))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Real values -> this tensor's integer dtype, rounded and clipped to its range.

        All in float32 and in place: with an int64 zero point NumPy would promote a camera
        frame to float64 and cost more than the inference itself.
        """
        info = np.iinfo(self.dtype)
        q = np.divide(x, self._scale_f32, dtype=np.float32)
        q += self._zero_point_f32
        np.rint(q, out=q)
        np.clip(q, info.min, info.max, out=q)
        return q.astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """This tensor's integer values -> real values (float32)."""
        out = q.astype(np.float32)
        out -= self._zero_point_f32
        out *= self._scale_f32
        return out

    def describe(self) -> str:
        return f"{self.name!r} (shape {list(self.shape)}, dtype {self.dtype.name})"


def _to_model_input(spec: TensorSpec, position: int, x: np.ndarray) -> np.ndarray:
    """Real values -> what the model takes; raise InferenceError(400) when they cannot be."""
    if spec.quantized and x.dtype.kind == "f":
        return spec.quantize(x)
    if spec.dtype.kind == "f" and x.dtype.kind in "fiu":
        return x.astype(spec.dtype)
    if not spec.quantized and spec.dtype.kind in "iu" and x.dtype.kind in "iu" and np.can_cast(x.dtype, spec.dtype):
        return x.astype(spec.dtype)
    want = f"{spec.dtype.name} (raw) or float values to quantize" if spec.quantized else spec.dtype.name
    raise InferenceError(400, f"input {position} {spec.name!r}: expected dtype {want}, got {x.dtype.name}")


# ---------------------------------------------------------------------------------------------
# Interpreters


class _Worker:
    """One interpreter with its tensor indices and bound methods resolved once."""

    __slots__ = ("interpreter", "_set", "_invoke", "_get", "_inputs", "_outputs")

    def __init__(self, interpreter: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.interpreter = interpreter
        self._set = interpreter.set_tensor
        self._invoke = interpreter.invoke
        self._get = interpreter.get_tensor
        self._inputs = tuple(s.index for s in inputs)
        self._outputs = tuple(s.index for s in outputs)

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        set_tensor = self._set
        for index, array in zip(self._inputs, arrays):
            set_tensor(index, array)
        self._invoke()
        get = self._get
        return [get(index) for index in self._outputs]


def _specs(interpreter: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    return (tuple(TensorSpec.from_detail(d) for d in interpreter.get_input_details()),
            tuple(TensorSpec.from_detail(d) for d in interpreter.get_output_details()))


def _node_count(interpreter: Any) -> int | None:
    try:
        return len(interpreter._get_ops_details())
    except Exception:  # noqa: BLE001 - a private API; counting is best effort
        return None


def _covered_nodes(interpreter: Any, original: int, first: int, last: int | None = None) -> int | None:
    """How many of the ``original`` nodes the delegate kernels at [first, last) replaced.

    Delegate kernels are appended after the model's own nodes; each one's region is found by
    walking producers back from its outputs until its inputs are reached.
    """
    try:
        ops = interpreter._get_ops_details()
    except Exception:  # noqa: BLE001 - a private API; counting is best effort
        return None
    if len(ops) < original:
        return None
    producers: dict[int, int] = {}
    for op in ops[:original]:
        for t in op["outputs"]:
            producers[int(t)] = int(op["index"])
    covered: set[int] = set()
    for op in ops[first:last]:
        stop = {int(t) for t in op["inputs"]}
        frontier = [int(t) for t in op["outputs"]]
        while frontier:
            t = frontier.pop()
            if t in stop:
                continue
            p = producers.get(t)
            if p is None or p in covered:
                continue
            covered.add(p)
            frontier.extend(int(x) for x in ops[p]["inputs"] if int(x) >= 0)
    return len(covered)


_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


def _log_once(library: str, outcome: str, reason: str) -> None:
    """Warn about a delegate failure once per process, not on every model load."""
    with _logged_lock:
        if (library, reason) in _logged:
            return
        _logged.add((library, reason))
    log.warning("delegate %s not used (%s): %s", library, outcome, reason)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class _Rejected(Exception):
    def __init__(self, outcome: str, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason
        self.details = details or {}


def _load_plugin(runtime: Runtime, step: Delegate, profile: Profile) -> Any:
    """load_delegate for one step; _Rejected("missing" | "no_device" | "failed") when it cannot."""
    try:
        ctypes.CDLL(step.library)   # probe first: tells "missing" apart without the wrapper's noise
    except OSError as exc:
        raise _Rejected("missing", f"{step.library} cannot be loaded ({_first_line(exc)}); install the "
                        f"{step.kind} runtime library or remove this delegate from profile {profile.name}") from None
    try:
        return runtime.load_delegate(step.library, {str(k): str(v) for k, v in step.options.items()})
    except OSError as exc:
        raise _Rejected("missing", f"{step.library} cannot be loaded ({_first_line(exc)})") from None
    except ValueError as exc:
        nodes = ", ".join(profile.hardware.get("device_nodes", [])) or "its device node"
        raise _Rejected("no_device", f"{step.library} loaded but found no {step.kind} device "
                        f"({_first_line(exc)}); check the accelerator is connected and {nodes} is "
                        f"accessible to the agent's user") from None
    except Exception as exc:  # noqa: BLE001 - any other refusal still falls back to the next step
        raise _Rejected("failed", f"{step.library} failed to create its delegate ({type(exc).__name__}: {_first_line(exc)})") from None


def _max_diffs(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> list[float]:
    return [float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0
            for g, w in zip(got, want)]


def _decode(td: dict[str, Any]) -> np.ndarray:
    data = TensorData.from_dict(td)
    return np.frombuffer(data.data, dtype=np.dtype(data.dtype)).reshape(data.shape)


def _reference_inputs(manifest: Manifest, specs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """The smoke test's sample input in the model's dtypes; zeros where it does not fit."""
    try:
        sample = [_decode(t) for t in manifest.doc["smoke_test"]["inputs"]]
    except Exception:  # noqa: BLE001 - a bad sample is smoke_test()'s to report
        sample = []
    out = []
    for i, spec in enumerate(specs):
        x = sample[i] if i < len(sample) else None
        if x is not None and x.shape == spec.shape and x.dtype == spec.dtype:
            out.append(x)
        elif x is not None and x.shape == spec.shape and spec.quantized and x.dtype.kind == "f":
            out.append(spec.quantize(x))
        else:
            out.append(np.zeros(spec.shape, spec.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# The loaded model


class LoadedModel:
    """A model ready to serve: a pool of interpreters with the chosen delegate applied."""

    def __init__(self, manifest: Manifest, report: EngineReport, workers: Sequence[_Worker],
                 inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
        self.manifest = manifest
        self.report = report
        self.name = manifest.name
        self.version = manifest.version
        self.sha256 = manifest.sha256
        self.input_specs = inputs
        self.output_specs = outputs
        self._pool: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for w in workers:
            self._pool.put(w)
        self._closed = False
        self._input_shapes = tuple(s.shape for s in inputs)
        self._input_dtypes = tuple(s.dtype for s in inputs)

    def __repr__(self) -> str:
        return f"<LoadedModel {self.name} v{self.version} on {self.report.delegate}>"

    def _check(self, inputs: Sequence[Any], real: bool) -> list[np.ndarray]:
        specs = self.input_specs
        if len(inputs) != len(specs):
            names = ", ".join(s.describe() for s in specs)
            raise InferenceError(400, f"model {self.name} takes {len(specs)} input(s) [{names}], got {len(inputs)}")
        arrays = []
        for i, (x, shape, dtype) in enumerate(zip(inputs, self._input_shapes, self._input_dtypes)):
            if type(x) is not np.ndarray:
                try:
                    x = np.asarray(x)
                except (ValueError, TypeError) as exc:
                    raise InferenceError(400, f"input {i} {specs[i].name!r}: not an array ({exc})") from None
            if x.shape != shape:
                raise InferenceError(400, f"input {i} {specs[i].name!r}: expected shape {list(shape)}, got {list(x.shape)}")
            if x.dtype != dtype:
                if not real:
                    raise InferenceError(400, f"input {i} {specs[i].name!r}: expected dtype {dtype.name}, got {x.dtype.name}")
                x = _to_model_input(specs[i], i, x)
            if not x.flags.c_contiguous:
                x = np.ascontiguousarray(x)
            arrays.append(x)
        return arrays

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self._closed:
            raise InferenceError(503, f"model {self.name} v{self.version} has been unloaded")
        worker = self._pool.get()
        if worker is None:             # close() left a sentinel: wake the next waiter too
            self._pool.put(None)
            raise InferenceError(503, f"model {self.name} v{self.version} has been unloaded")
        try:
            return worker.run(arrays)
        except (RuntimeError, ValueError) as exc:
            raise InferenceError(500, f"model {self.name} v{self.version} failed to run: {_first_line(exc)}") from None
        finally:
            if not self._closed:
                self._pool.put(worker)

    def predict_raw(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Model dtypes in and out, no (de)quantization; InferenceError(400) on a wrong shape/dtype."""
        return self._run(self._check(inputs, real=False))

    def predict(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Real values in and out: float inputs are quantized for integer models, outputs dequantized."""
        outputs = self._run(self._check(inputs, real=True))
        return [spec.dequantize(y) if spec.quantized else y for spec, y in zip(self.output_specs, outputs)]

    def close(self) -> None:
        """Drop the interpreters (in-flight calls finish on theirs); later calls get a 503."""
        self._closed = True
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break
        self._pool.put(None)


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Candidate:
    step: Delegate
    interpreter: Any
    delegated: int | None


def _graph(model: bytes) -> GraphInfo | None:
    try:
        return read_graph(model)
    except ModelFormatError:
        return None


class _Loader:
    """One load: tries the chain, keeps the attempts, builds the worker pool."""

    def __init__(self, model: bytes, manifest: Manifest, profile: Profile, runtime: Runtime,
                 workers: int, events: EventSink) -> None:
        self.model = model
        self.manifest = manifest
        self.profile = profile
        self.runtime = runtime
        self.workers = max(1, int(workers))
        self.threads = profile.threads
        self.events = events
        self.graph = _graph(model)
        self.total = self.graph.main_operators if self.graph else None
        self.attempts: list[DelegateAttempt] = []

    def new_interpreter(self, step: Delegate | None) -> Any:
        delegates = [self._plugin(step)] if step is not None else None
        return self.runtime.interpreter_class(model_content=self.model, experimental_delegates=delegates,
                                              num_threads=self.threads)

    def _plugin(self, step: Delegate) -> Any:
        return _load_plugin(self.runtime, step, self.profile)

    def reject(self, step: Delegate, outcome: str, reason: str, details: dict[str, Any]) -> None:
        self.attempts.append(DelegateAttempt(step.kind, step.library, outcome, reason))
        _log_once(step.library, outcome, reason)
        if outcome == "wrong_output":
            self.events(Event(ev.ACCELERATOR_MISMATCH, reason,
                              {"kind": step.kind, "library": step.library, "model": self.manifest.name,
                               "version": self.manifest.version, **details}))
        self.events(Event(ev.DELEGATE_FALLBACK, f"{step.kind} delegate not used: {reason}",
                          {"kind": step.kind, "library": step.library, "outcome": outcome,
                           "model": self.manifest.name, "version": self.manifest.version}))

    def cpu(self) -> tuple[Any | None, str]:
        try:
            interp = self.new_interpreter(None)
            interp.allocate_tensors()
            return interp, ""
        except Exception as exc:  # noqa: BLE001 - reported in ModelLoadError if nothing else works
            return None, f"{type(exc).__name__}: {_first_line(exc)}"

    def try_accelerator(self, step: Delegate, reference: list[np.ndarray] | None, reference_from: str) -> _Candidate:
        """Build, run and check one accelerator; raise _Rejected with the outcome when unusable."""
        if step.requires_compiled_model:
            compiled = self.graph.compiled_for_edgetpu if self.graph else EDGETPU_CUSTOM_OP.encode() in self.model
            if not compiled:
                raise _Rejected("not_compiled_for_it", f"model {self.manifest.name} v{self.manifest.version} holds no "
                                f"{EDGETPU_CUSTOM_OP}: it was not compiled for the {step.kind} "
                                f"(run {self.profile.accelerator.get('compiler') or 'its compiler'}); it runs on the CPU")
        plugin = self._plugin(step)
        try:
            interp = self.runtime.interpreter_class(model_content=self.model, experimental_delegates=[plugin],
                                                    num_threads=self.threads)
        except Exception as exc:  # noqa: BLE001
            raise _Rejected("failed", f"{step.library} could not take the graph (its Prepare failed: "
                            f"{_first_line(exc)})") from None
        nodes_after_delegate = _node_count(interp)
        delegated = None
        if self.total is not None and nodes_after_delegate is not None:
            delegated = _covered_nodes(interp, self.total, self.total, nodes_after_delegate)
        try:
            interp.allocate_tensors()
        except Exception as exc:  # noqa: BLE001
            raise _Rejected("invoke_failed", f"{step.library} failed to allocate tensors: {_first_line(exc)}") from None
        inputs, outputs = _specs(interp)
        sample = _reference_inputs(self.manifest, inputs)
        try:
            got = _Worker(interp, inputs, outputs).run(sample)
        except Exception as exc:  # noqa: BLE001
            raise _Rejected("invoke_failed", f"{step.library} failed at its first invoke: {_first_line(exc)}") from None
        if reference is not None:
            atol = float(self.manifest.doc["smoke_test"]["atol"])
            diffs = _max_diffs(got, reference)
            worst = int(np.argmax(diffs)) if diffs else 0
            if diffs and diffs[worst] > atol:
                raise _Rejected("wrong_output",
                                f"{step.kind} output {worst} ({outputs[worst].name!r}) differs from the "
                                f"{reference_from} by {diffs[worst]:g} (atol {atol:g}) on the smoke-test "
                                f"input; the accelerator gives wrong answers and is not used",
                                {"output": worst, "max_abs_diff": diffs[worst], "atol": atol})
        return _Candidate(step, interp, delegated)

    def run(self) -> LoadedModel:
        cpu, cpu_error = self.cpu()
        cpu_step = next((s for s in self.profile.delegates if s.kind == "xnnpack"), Delegate(kind="xnnpack"))
        reference: list[np.ndarray] | None = None
        reference_from = "CPU (XNNPACK) output"
        if cpu is not None:
            inputs, outputs = _specs(cpu)
            if any(s.kind in ACCELERATORS for s in self.profile.delegates):
                try:
                    reference = _Worker(cpu, inputs, outputs).run(_reference_inputs(self.manifest, inputs))
                except Exception as exc:  # noqa: BLE001
                    cpu, cpu_error = None, f"{type(exc).__name__}: {_first_line(exc)}"
        if cpu is None:   # e.g. an Edge TPU model whose custom op the CPU cannot run
            reference_from = "manifest's expected output"
            try:
                reference = [_decode(t) for t in self.manifest.doc["smoke_test"]["expected_outputs"]]
            except Exception:  # noqa: BLE001
                reference = None

        chosen: _Candidate | None = None
        for step in self.profile.delegates:
            if step.kind == "xnnpack":
                break
            try:
                chosen = self.try_accelerator(step, reference, reference_from)
            except _Rejected as rej:
                self.reject(step, rej.outcome, rej.reason, rej.details)
                continue
            self.attempts.append(DelegateAttempt(step.kind, step.library, "used",
                                                 self._used_reason(step.kind, chosen.delegated)))
            break

        if chosen is None:
            if cpu is None:
                raise ModelLoadError(f"model {self.manifest.name} v{self.manifest.version} cannot be loaded by "
                                     f"{self.runtime.name} {self.runtime.version} on the CPU: {cpu_error}"
                                     + self._tried())
            first = cpu
            delegated = None
            if self.total is not None:
                delegated = _covered_nodes(cpu, self.total, self.total)
            self.attempts.append(DelegateAttempt("xnnpack", cpu_step.library, "used",
                                                 self._used_reason("xnnpack", delegated)))
            kind, step = "xnnpack", None
        else:
            first, delegated, kind, step = chosen.interpreter, chosen.delegated, chosen.step.kind, chosen.step

        inputs, outputs = _specs(first)
        pool = [_Worker(first, inputs, outputs)]
        while len(pool) < self.workers:
            try:
                extra = self.new_interpreter(step)
                extra.allocate_tensors()
            except Exception as exc:  # noqa: BLE001 - fewer workers beat no model
                log.warning("model %s: only %d of %d workers could be created (%s)", self.manifest.name,
                            len(pool), self.workers, _first_line(exc))
                break
            pool.append(_Worker(extra, inputs, outputs))
        report = EngineReport(
            runtime=self.runtime.name, runtime_version=self.runtime.version, delegate=kind,
            threads=self.threads, workers=len(pool), delegated_nodes=delegated, total_nodes=self.total,
            full_graph=(delegated == self.total) if delegated is not None and self.total is not None else None,
            attempts=tuple(self.attempts))
        return LoadedModel(self.manifest, report, pool, inputs, outputs)

    def _used_reason(self, kind: str, delegated: int | None) -> str:
        where = "on the CPU" if kind == "xnnpack" else f"on the {kind}"
        if delegated is None or self.total is None:
            return f"running {where} with {self.runtime.name} {self.runtime.version}, {self.threads} thread(s)"
        rest = "" if delegated == self.total else "; the rest runs on the CPU"
        return (f"running {where} with {self.runtime.name} {self.runtime.version}, {self.threads} thread(s): "
                f"{kind} took {delegated} of {self.total} nodes{rest}")

    def _tried(self) -> str:
        if not self.attempts:
            return ""
        return "; delegates tried: " + "; ".join(f"{a.kind} ({a.outcome}: {a.reason})" for a in self.attempts)


def load_model(model: bytes, manifest: Manifest, profile: Profile, *, runtime: Runtime | None = None,
               workers: int = 1, events: EventSink = discard) -> LoadedModel:
    """Load ``model`` on the first delegate of the profile's chain that works, ending at XNNPACK.

    Raises ModelLoadError only if even the CPU path fails.
    """
    runtime = runtime or select_runtime(profile.runtime.get("allowed"))
    return _Loader(bytes(model), manifest, profile, runtime, workers, events).run()


# ---------------------------------------------------------------------------------------------
# Smoke test


def smoke_test(loaded: LoadedModel) -> float:
    """Run the manifest's sample input; return the largest abs difference from the expected output.

    Compares in the expected tensor's own units (quantized steps for integer outputs). Raises
    SmokeTestError naming the output and its difference against the manifest's atol.
    """
    doc = loaded.manifest.doc["smoke_test"]
    atol = float(doc["atol"])
    try:
        inputs = [_decode(t) for t in doc["inputs"]]
        expected = [_decode(t) for t in doc["expected_outputs"]]
    except Exception as exc:  # noqa: BLE001
        raise SmokeTestError(f"model {loaded.name} v{loaded.version}: the manifest's smoke_test tensors "
                             f"cannot be read ({exc})") from None
    if len(expected) != len(loaded.output_specs):
        raise SmokeTestError(f"model {loaded.name} v{loaded.version}: smoke_test.expected_outputs lists "
                             f"{len(expected)} tensor(s), the model has {len(loaded.output_specs)} output(s)")
    try:
        raw = all(x.dtype == s.dtype for x, s in zip(inputs, loaded.input_specs))
        outputs = loaded.predict_raw(inputs) if raw else loaded._run(loaded._check(inputs, real=True))
    except InferenceError as exc:
        raise SmokeTestError(f"model {loaded.name} v{loaded.version}: smoke_test input does not fit the "
                             f"model: {exc}") from None
    worst = 0.0
    for i, (spec, got, want) in enumerate(zip(loaded.output_specs, outputs, expected)):
        if got.shape != want.shape:
            raise SmokeTestError(f"model {loaded.name} v{loaded.version}: output {i} ({spec.name!r}) has shape "
                                 f"{list(got.shape)}, smoke_test expects {list(want.shape)}")
        if want.dtype != got.dtype and spec.quantized:
            got = spec.dequantize(got)
        diff = _max_diffs([got], [want])[0]
        if not diff <= atol:   # also catches NaN
            raise SmokeTestError(f"model {loaded.name} v{loaded.version}: smoke test failed on "
                                 f"{loaded.report.delegate}: output {i} ({spec.name!r}) differs from the "
                                 f"expected output by {diff:g}, more than atol {atol:g}")
        worst = max(worst, diff)
    return worst
