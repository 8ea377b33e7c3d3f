"""Benchmark: the digits CNN through litefleet's converter in four modes, against the Keras model itself.

For each mode: accuracy on the test split run in ai-edge-litert (outputs dequantized), file
size, size relative to float32 and host latency (2 threads, median of raw invokes). The
baseline is the Keras model's own accuracy, measured in the same run. Acceptance: full int8
within 1.0 point of float32 and its file at most 30% of the float32 file.

    .venv/bin/python -m bench.converter_digits [--quick] [--json]
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import (CACHE, MODES, RUNTIME_MIN_VERSION, THREADS, Report, fmt_ratio, litert_interpreter, log,
                          parse_args, raw_invoke, summary, tf_version, time_calls)

MAX_INT8_DROP_POINTS = 1.0
MAX_INT8_SIZE_FRACTION = 0.30


def trained_model() -> Path:
    """The digits CNN trained by converter.examples (15 epochs), cached per TF version."""
    from converter.examples import train_digits_cnn
    path = CACHE / f"digits-cnn-tf{tf_version()}.keras"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        log("training the digits CNN (once; cached in bench/.cache/)")
        tmp = path.with_name(f"tmp-{os.getpid()}-{path.name}")
        train_digits_cnn(tmp)
        os.replace(tmp, path)
    return path


def litert_accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (%) in ai-edge-litert, one sample per invoke, inputs quantized and outputs dequantized."""
    from converter.runtimes import dequantize, invoke_each, quantize_input
    interp = litert_interpreter(model, THREADS)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    raw = invoke_each(interp, quantize_input(x, inp))[0]
    probs = dequantize(raw, out)
    return 100.0 * float(np.mean(np.argmax(probs, axis=1) == y))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    repeats = 300 if args.quick else 3000

    from converter.data import load_dataset
    from converter.examples import write_digits_npz
    from converter.models import load_source
    from converter.quantize import convert

    keras_path = trained_model()
    with tempfile.TemporaryDirectory(prefix="bench-digits-") as tmp:
        calibration_file, eval_file = write_digits_npz(Path(tmp))
        source = load_source(keras_path)
        calibration = load_dataset(calibration_file, source.input_shape, purpose="calibration")
        evaluation = load_dataset(eval_file, source.input_shape, purpose="evaluation")

    # Baseline: the Keras model's own accuracy, same run, same test split.
    keras_probs = source.reference_predict(evaluation.x)
    keras_acc = 100.0 * float(np.mean(np.argmax(keras_probs, axis=1) == evaluation.y))

    report = Report(f"digits CNN: litefleet converter vs the Keras model ({len(evaluation)} test samples)",
                    ["model", "accuracy %", "Δ vs Keras pts", "file bytes", "size vs float32",
                     "median ms", "p90 ms", "convert s"])
    report.add("Keras (baseline)", keras_acc, 0.0, keras_path.stat().st_size, None, None, None, None)
    results: dict[str, dict] = {}
    for mode in MODES:
        log(f"converting ({mode})")
        io = "int8" if mode == "int8" else "float32"
        start = time.perf_counter()
        conversion = convert(source, mode=mode, input_type=io, output_type=io,
                             calibration=calibration if mode == "int8" else None,
                             runtime_min_version=RUNTIME_MIN_VERSION, progress=lambda _: None)
        seconds = time.perf_counter() - start
        acc = litert_accuracy(conversion.tflite, evaluation.x, evaluation.y)
        interp = litert_interpreter(conversion.tflite, THREADS)
        x = evaluation.x[:1]
        if mode == "int8":
            from converter.runtimes import quantize_input
            x = quantize_input(x, interp.get_input_details()[0])
        lat = summary(time_calls(raw_invoke(interp, x), repeats, 20))
        results[mode] = {"accuracy": acc, "bytes": len(conversion.tflite), "latency": lat, "convert_s": seconds,
                         "settings": conversion.settings}
    base = results["float32"]["bytes"]
    for mode in MODES:
        r = results[mode]
        report.add(f"{mode} (litefleet)", r["accuracy"], r["accuracy"] - keras_acc, r["bytes"],
                   fmt_ratio(r["bytes"] / base), r["latency"]["median_ms"], r["latency"]["p90_ms"], r["convert_s"])

    drop = results["float32"]["accuracy"] - results["int8"]["accuracy"]
    fraction = results["int8"]["bytes"] / base
    report.verdict("int8 accuracy", drop <= MAX_INT8_DROP_POINTS,
                   f"int8 {results['int8']['accuracy']:.2f}% vs float32 {results['float32']['accuracy']:.2f}% "
                   f"({drop:+.2f} points drop; limit {MAX_INT8_DROP_POINTS})")
    report.verdict("int8 size", fraction <= MAX_INT8_SIZE_FRACTION,
                   f"int8 file is {100 * fraction:.1f}% of float32 ({results['int8']['bytes']} / {base} bytes; "
                   f"limit {100 * MAX_INT8_SIZE_FRACTION:.0f}%)")
    report.notes.append(f"latency: raw set_tensor/invoke/get_tensor in ai-edge-litert, {THREADS} threads, "
                        f"batch 1, {repeats} invokes")
    report.notes.append("Keras file size is the .keras archive (weights plus optimizer state), for reference only")
    report.notes.append("int8 = full integer (int8 input and output); accuracy computed on dequantized outputs")
    report.data["results"] = results
    report.data["keras"] = {"accuracy": keras_acc}
    report.print(args.json)
    return 0 if all(p for _, p, _ in report.verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
