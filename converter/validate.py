"""Validation before signing: is the converted model accurate, loadable, small and fast enough?

Five checks, each a :class:`CheckResult`, run on the converted model with real interpreters:

- ``accuracy``: agreement with the source model on the eval data (top-1 agreement and max
  absolute error always; accuracy, the drop in points and per-class precision/recall/F1 when
  labels are given). Over the profile's budget, TensorFlow's quantization debugger names the
  layers with the largest quantization error so a person knows where to look.
- ``ops``: every op's version against the profile's oldest runtime, and the ops that would
  fall back from the profile's accelerator to the CPU. A fallback is a warning; a model with
  no op at all the accelerator can run fails on an accelerator profile, because such a
  bundle would leave the accelerator idle, which is never what a profile for it wants.
- ``runtimes``: the model is loaded and invoked in every runtime the profile allows, and
  their outputs must agree (one quantization step for integer outputs).
- ``budgets``: model size and estimated runtime memory against the profile's budgets.
- ``latency``: median host latency with ai-edge-litert and the profile's threads.

The checks never raise for a bad model: a failure is a finding, recorded in the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics, runtimes

Progress = Callable[[str], None]

CHECK_NAMES = ("accuracy", "ops", "runtimes", "budgets", "latency")
RUNTIME_SAMPLES = 16          # samples each runtime is invoked on
DEBUG_SAMPLES = 64            # samples the quantization debugger compares layers on
HOTSPOTS = 5                  # layers named when accuracy drops too far
LATENCY_WARMUP = 5
LATENCY_RUNS = 50
LATENCY_MAX_SECONDS = 5.0     # stop measuring early on slow models (at least MIN runs)
LATENCY_MIN_RUNS = 10


@dataclass
class CheckResult:
    """One check's verdict: ``summary`` is one line for a person, ``details`` the numbers."""

    name: str
    ok: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    forceable: bool = True  # False when a runtime the profile allows cannot load the model

    @property
    def warnings(self) -> list[str]:
        return list(self.details.get("warnings", []))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "summary": self.summary, "forceable": self.forceable,
                "details": self.details}


@dataclass
class ValidationReport:
    """All checks of one model against one profile."""

    checks: list[CheckResult]
    notes: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def summary(self) -> str:
        """One line: the verdict, then each check's own summary."""
        verdict = "all checks passed" if self.ok() else f"FAILED: {', '.join(self.failed())}"
        return f"{verdict} | " + " | ".join(f"{c.name}: {c.summary}" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({"ok": self.ok(), "failed": self.failed(), "summary": self.summary(),
                           "notes": list(self.notes), "checks": [c.to_dict() for c in self.checks]})


def _json_safe(value: Any) -> Any:
    """Plain JSON types only (the manifest is signed as strict JSON: no NaN, no numpy)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _noop(_: str) -> None:
    pass


# The whole validation --------------------------------------------------------------------

def validate(source, conversion, profile, eval_data, *, progress: Progress = _noop,
             calibration=None, eval_label: str = "eval data",
             model: bytes | None = None) -> ValidationReport:
    """Run every check on ``conversion.tflite`` (or ``model``) for ``profile``.

    ``eval_data`` is a :class:`converter.data.Dataset` or None; ``eval_label`` says what it
    is in the report (the pipeline passes the calibration data, labelled so, when no eval
    data was given). ``calibration`` feeds the quantization debugger.
    """
    model = conversion.tflite if model is None else model
    notes: list[str] = []
    samples = _runtime_samples(model, eval_data, notes)
    checks = [
        check_accuracy(source, conversion, profile, model, eval_data, eval_label=eval_label,
                       calibration=calibration, progress=progress),
        check_ops(conversion, profile, progress=progress),
        check_runtimes(model, profile, samples, progress=progress),
        check_budgets(model, profile, progress=progress),
        check_latency(model, profile, samples, progress=progress),
    ]
    return ValidationReport(checks, notes)


def _runtime_samples(model: bytes, data, notes: list[str]) -> np.ndarray | None:
    """A few real samples in the model's input dtype (random ones when there is no data)."""
    try:
        detail = runtimes.litert_interpreter(model).get_input_details()[0]
    except Exception:  # noqa: BLE001
        return None
    if data is not None and len(data.x):
        x = data.x[:RUNTIME_SAMPLES]
    else:
        notes.append("no data given: runtimes and latency were checked on random inputs in [0, 1)")
        x = np.random.default_rng(0).random((4, *detail["shape"][1:]), dtype=np.float32)
    return runtimes.quantize_input(x, detail)


# accuracy --------------------------------------------------------------------------------

def converted_predict(model: bytes, x: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """The converted model's outputs in real units (dequantized), one array per output."""
    interp = runtimes.litert_interpreter(model, threads)
    detail = interp.get_input_details()[0]
    raw = runtimes.invoke_each(interp, runtimes.quantize_input(x, detail))
    return [runtimes.dequantize(r, d) for r, d in zip(raw, interp.get_output_details())]


def check_accuracy(source, conversion, profile, model: bytes, data, *, eval_label: str = "eval data",
                   calibration=None, progress: Progress = _noop) -> CheckResult:
    budget = float(profile.budgets["max_accuracy_drop"])
    if data is None or not len(data.x):
        return CheckResult("accuracy", True, "not measured: no --eval or --calibration data given",
                           {"measured": False, "max_accuracy_drop": budget})
    progress(f"measuring accuracy on {len(data.x)} samples of {eval_label}")
    try:
        converted = converted_predict(model, data.x, profile.threads)
    except Exception as exc:  # noqa: BLE001
        return CheckResult("accuracy", False, f"the converted model cannot run: {runtimes._one_line(exc)}",
                           {"measured": False, "max_accuracy_drop": budget})
    reference = np.asarray(source.reference_predict(data.x), dtype=np.float32)
    out = converted[0].reshape(reference.shape) if converted[0].size == reference.size else converted[0]
    details: dict[str, Any] = {
        "measured": True, "data": eval_label, "data_source": getattr(data, "source", ""), "samples": int(len(data.x)),
        "top1_agreement": metrics.agreement(reference, out),
        "max_abs_error": metrics.max_abs_error(reference, out) if reference.shape == out.shape else None,
        "max_accuracy_drop": budget,
    }
    on = f" on {eval_label}" if eval_label != "eval data" else ""
    agree = f"top-1 agreement {details['top1_agreement']:.1%}, max abs error {details['max_abs_error']:.4g}"
    if data.y is None:
        details["labels"] = False
        return CheckResult("accuracy", True, f"no labels, drop not measured{on}; {agree}", details)
    y = np.asarray(data.y)
    pred_src, pred_conv = metrics.top1(reference), metrics.top1(out)
    acc_src, acc_conv = metrics.accuracy(y, pred_src), metrics.accuracy(y, pred_conv)
    drop = round((acc_src - acc_conv) * 100.0, 6)
    labels = np.union1d(y, np.union1d(pred_src, pred_conv))
    conv_report = metrics.class_report(y, pred_conv, labels)
    src_report = metrics.class_report(y, pred_src, labels)
    details.update({
        "labels": True, "source_accuracy": acc_src, "converted_accuracy": acc_conv, "drop_points": drop,
        "macro": {"converted": conv_report.macro, "source": src_report.macro},
        "per_class": conv_report.to_dict()["per_class"],
    })
    ok = drop <= budget + 1e-9
    summary = (f"{acc_src:.2%} -> {acc_conv:.2%} (drop {drop:.2f} pt, budget {budget:g} pt){on}; "
               f"macro F1 {conv_report.macro['f1']:.3f}; {agree}")
    if not ok:
        progress("accuracy dropped over budget: running the quantization debugger")
        hotspots, note = quantization_hotspots(source, conversion, calibration, data)
        details["worst_layers"] = hotspots
        if note:
            details["debugger_note"] = note
        if hotspots:
            summary += "; largest quantization error in " + ", ".join(f"{h['layer']} ({h['op']})" for h in hotspots)
    return CheckResult("accuracy", ok, summary, details)


def _debug_converter(source, conversion, calibration):
    """A TFLiteConverter set up like the conversion, for the quantization debugger.

    The debugger calibrates and quantizes itself (float I/O, NumericVerify ops added), so what
    must match the conversion is the calibration data, the op set and the quantization flags
    recorded in ``conversion.settings`` (per-channel switches).
    """
    import tensorflow as tf
    converter = tf.lite.TFLiteConverter.from_concrete_functions([source.concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if conversion.mode == "int16x8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    for key, value in (conversion.settings or {}).items():
        if key.startswith("_experimental") and hasattr(converter, key) and isinstance(value, (bool, int, str)):
            setattr(converter, key, value)
    xs = calibration.x
    converter.representative_dataset = lambda: ([x[None].astype(np.float32)] for x in xs)
    return converter


def quantization_hotspots(source, conversion, calibration, data) -> tuple[list[dict[str, Any]], str]:
    """The layers with the largest quantization error (rmse / scale), by TF's quantization debugger.

    Uses the same converter settings and calibration data as the conversion; compares each
    quantized layer with its float counterpart on up to DEBUG_SAMPLES eval samples. Returns
    (top layers, note); the note says why there are none when the debugger cannot run.
    """
    if conversion.mode not in ("int8", "int16x8"):
        return [], f"the quantization debugger needs a calibrated model (int8 or int16x8), not {conversion.mode}"
    if getattr(source, "kind", "") == "tflite":
        return [], "the quantization debugger needs the source model, not a .tflite file"
    if calibration is None or not len(calibration.x):
        return [], "the quantization debugger needs the calibration data"
    try:
        import tensorflow as tf
        converter = _debug_converter(source, conversion, calibration)
        xs = data.x[:DEBUG_SAMPLES]
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: ([x[None].astype(np.float32)] for x in xs))
        debugger.run()
        import io
        import csv
        buf = io.StringIO()
        debugger.layer_statistics_dump(buf)
        rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    except Exception as exc:  # noqa: BLE001 - the debugger is a hint, never a reason to crash
        return [], f"the quantization debugger failed: {runtimes._one_line(exc)}"
    layers = []
    for row in rows:
        try:
            scale = float(row["scale"])
            rmse = math.sqrt(float(row["mean_squared_error"]))
        except (KeyError, ValueError):
            continue
        if not scale or not math.isfinite(rmse):
            continue
        tensor = row.get("tensor_name", "")
        # Fused tensors are named "a/Relu;a/BiasAdd;a/conv": the first part names the layer.
        layers.append({"layer": tensor.split(";")[0], "tensor": tensor, "op": row.get("op_name", ""),
                       "rmse_over_scale": rmse / scale, "rmse": rmse, "scale": scale,
                       "max_abs_error": float(row.get("max_abs_error") or 0.0)})
    layers.sort(key=lambda layer: layer["rmse_over_scale"], reverse=True)
    return layers[:HOTSPOTS], ""


# ops -------------------------------------------------------------------------------------

def check_ops(conversion, profile, *, progress: Progress = _noop) -> CheckResult:
    from . import ops as ops_mod
    progress("checking op versions against the profile's runtime")
    op_list = conversion.ops
    min_version = profile.runtime["min_version"]
    problems = ops_mod.runtime_problems(op_list, min_version)
    details: dict[str, Any] = {
        "runtime_min_version": min_version,
        "ops": [{"name": o.name, "version": o.version, "count": o.count,
                 "min_runtime": ops_mod.min_runtime_for(o), **({"custom_code": o.custom_code} if o.custom_code else {})}
                for o in op_list],
        "runtime_problems": problems, "warnings": [],
    }
    total = sum(o.count for o in op_list)
    proven = ops_mod.blocking(problems)
    unknown = [p for p in problems if p not in proven]
    ok = not proven
    parts = [f"{len(op_list)} op kinds, {total} ops"]
    parts.append(f"too new for runtime {min_version}: {'; '.join(proven)}" if proven
                 else f"all loadable by runtime {min_version}")
    if unknown:
        # Not proven too new: the runtimes check loads the model for real and decides.
        details["warnings"].extend(unknown)
        parts.append(f"warning: {'; '.join(unknown)}")
    kind = profile.accelerator["kind"]
    details["accelerator"] = kind
    if kind != "none":
        fallbacks = ops_mod.accelerator_fallbacks(op_list, profile.accelerator["supported_ops"])
        fallback_names = {f.split()[0] for f in fallbacks}
        mapped = sum(o.count for o in op_list if o.name not in fallback_names)
        details.update({"accelerator_fallbacks": fallbacks, "ops_mapped": mapped, "ops_total": total})
        if op_list and mapped == 0:
            ok = False
            parts.append(f"no op can run on the {kind}: every op would fall back to the CPU")
        elif fallbacks:
            warning = f"{len(fallbacks)} op kind(s) would fall back from the {kind} to the CPU: {', '.join(fallbacks)}"
            details["warnings"].append(warning)
            parts.append(f"warning: {warning}")
        else:
            parts.append(f"every op is supported by the {kind}")
    return CheckResult("ops", ok, "; ".join(parts), details, forceable=not proven)


# runtimes --------------------------------------------------------------------------------

def check_runtimes(model: bytes, profile, samples: np.ndarray | None, *, progress: Progress = _noop) -> CheckResult:
    allowed = list(profile.runtime["allowed"])
    progress(f"loading and running the model in {', '.join(allowed)}")
    if samples is None:
        run = runtimes.run_litert(model, np.zeros((0,), np.float32), profile.threads)
        return CheckResult("runtimes", False, f"ai-edge-litert cannot load the model: {run.error}",
                           {"allowed": allowed, "runs": [run.to_dict()]}, forceable=False)
    runs = runtimes.run_all(model, samples, allowed, profile.threads)
    details: dict[str, Any] = {"allowed": allowed, "samples": int(len(samples)), "runs": [r.to_dict() for r in runs]}
    failures = [f"{r.runtime} {r.version} cannot run it: {r.error}".replace("  ", " ") for r in runs if not r.ok]
    good = [r for r in runs if r.ok]
    disagreements = []
    if len(good) > 1:
        reference = good[0]
        steps = runtimes.output_steps(model)
        for other in good[1:]:
            agree, worst, unit = runtimes.outputs_agree(reference.outputs, other.outputs, steps)
            details.setdefault("agreement", []).append(
                {"reference": reference.runtime, "runtime": other.runtime, "agree": agree,
                 "max_difference": worst, "unit": unit})
            if not agree:
                disagreements.append(f"{other.runtime} differs from {reference.runtime} by {worst:.4g} {unit}")
    if failures or disagreements:
        return CheckResult("runtimes", False, "; ".join(failures + disagreements), details, forceable=not failures)
    versions = ", ".join(f"{r.runtime} {r.version}" for r in runs)
    agreement = " and agree" if len(runs) > 1 else ""
    return CheckResult("runtimes", True, f"loaded and ran in {versions}{agreement}", details)


# budgets ---------------------------------------------------------------------------------

def check_budgets(model: bytes, profile, *, progress: Progress = _noop) -> CheckResult:
    progress("estimating model size and memory")
    max_model, max_memory = int(profile.budgets["max_model_bytes"]), int(profile.budgets["max_memory_bytes"])
    details: dict[str, Any] = {"model_bytes": len(model), "max_model_bytes": max_model,
                               "max_memory_bytes": max_memory}
    try:
        details.update(runtimes.memory_estimate(model, profile.threads))
    except Exception as exc:  # noqa: BLE001
        return CheckResult("budgets", False, f"cannot estimate memory, the model does not load: "
                                             f"{runtimes._one_line(exc)}", details)
    problems = []
    if len(model) > max_model:
        problems.append(f"model is {_size(len(model))}, over the {_size(max_model)} budget")
    if details["peak_memory_bytes"] > max_memory:
        problems.append(f"estimated memory {_size(details['peak_memory_bytes'])} is over the {_size(max_memory)} budget")
    text = (f"model {_size(len(model))} of {_size(max_model)}; memory ~{_size(details['peak_memory_bytes'])} "
            f"(arena {_size(details['arena_bytes'])}) of {_size(max_memory)}")
    return CheckResult("budgets", not problems, "; ".join(problems) if problems else text, details)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


# latency ---------------------------------------------------------------------------------

def measure_latency(model: bytes, threads: int, sample: np.ndarray, *, runs: int = LATENCY_RUNS,
                    warmup: int = LATENCY_WARMUP, max_seconds: float = LATENCY_MAX_SECONDS) -> dict[str, Any]:
    """Median and p90 of ``invoke`` in ms with ai-edge-litert, after warm-up runs."""
    interp = runtimes.litert_interpreter(model, threads)
    index = interp.get_input_details()[0]["index"]
    interp.set_tensor(index, sample[None])
    for _ in range(warmup):
        interp.invoke()
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < runs and (len(times) < LATENCY_MIN_RUNS or time.perf_counter() < deadline):
        start = time.perf_counter()
        interp.invoke()
        times.append((time.perf_counter() - start) * 1000.0)
    arr = np.asarray(times)
    return {"median_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90)),
            "min_ms": float(arr.min()), "runs": len(times), "warmup": warmup, "threads": threads,
            "runtime": "ai-edge-litert"}


def check_latency(model: bytes, profile, samples: np.ndarray | None, *, progress: Progress = _noop) -> CheckResult:
    bound = float(profile.budgets.get("max_latency_ms", 0.0) or 0.0)
    if samples is None:
        return CheckResult("latency", False, "not measured: the model does not load in ai-edge-litert",
                           {"max_latency_ms": bound})
    progress(f"measuring latency with ai-edge-litert, {profile.threads} threads")
    details = measure_latency(model, profile.threads, samples[0])
    details["max_latency_ms"] = bound
    text = (f"median {details['median_ms']:.3f} ms (p90 {details['p90_ms']:.3f}) over {details['runs']} runs, "
            f"{profile.threads} threads, ai-edge-litert on this host")
    if bound <= 0:
        return CheckResult("latency", True, f"{text}; no bound set", details)
    ok = details["median_ms"] <= bound
    verb = "within" if ok else "OVER"
    return CheckResult("latency", ok, f"{text}; {verb} the {bound:g} ms bound", details)
