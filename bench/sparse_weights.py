"""Benchmark: what 80% pruning buys the digits CNN on the wire and on the CPU, against the dense model.

The digits CNN (converter.examples, cached by bench.converter_digits) is pruned to 80% with
litefleet's Keras 3 pruning (2 epochs of real fine-tuning on the training split) and converted
side by side: dense float32 (the baseline), the pruned model with dense weights, with TFLite's
sparse weight encoding (EXPERIMENTAL_SPARSITY, what ``litefleet convert --prune`` ships for
float models on CPU profiles), float16 sparse, and full int8 dense and pruned. For each:
accuracy on the test split in ai-edge-litert, file bytes, zlib-9 bytes, the bytes the MQTT pull
sends for the model (raw chunks with their 13-byte headers; the signed head comes on top),
and host latency (ai-edge-litert, 2 threads, rounds interleaved across the models so a busy
machine slows them all alike).

    .venv/bin/python -m bench.sparse_weights [--quick] [--json]
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.common import (RUNTIME_MIN_VERSION, THREADS, Report, fmt_ratio, litert_interpreter, log, parse_args,
                          raw_invoke, summary, time_calls)
from bench.converter_digits import litert_accuracy, trained_model

SPARSITY = 0.8
MAX_SPARSE_FRACTION = 0.40   # the sparse float32 file at most 40% of the dense one


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    rounds, per_round = (10, 50) if args.quick else (30, 200)

    from converter.data import load_dataset
    from converter.examples import write_digits_npz
    from converter.models import load_source
    from converter.prune import prune_model, tflite_sparsity
    from converter.quantize import convert
    from converter.runtimes import quantize_input
    from converter.sparse import transfer_sizes

    source = load_source(trained_model())
    with tempfile.TemporaryDirectory(prefix="bench-sparse-") as tmp:
        train_file, eval_file = write_digits_npz(Path(tmp))
        train = load_dataset(train_file, source.input_shape, purpose="fine-tuning")
        evaluation = load_dataset(eval_file, source.input_shape, purpose="evaluation")
    log(f"pruning to {SPARSITY:.0%} with 2 epochs of fine-tuning")
    pruned = dataclasses.replace(source, _model=prune_model(source._model, SPARSITY, train, epochs=2).model)
    calibration = dataclasses.replace(train, x=train.x[:200], y=train.y[:200])

    variants = [("float32 dense (baseline)", source, "float32", False),
                ("float32 pruned, dense weights", pruned, "float32", False),
                ("float32 pruned, sparse weights", pruned, "float32", True),
                ("float16 pruned, sparse weights", pruned, "float16", True),
                ("int8 dense", source, "int8", False),
                ("int8 pruned (dense weights)", pruned, "int8", False)]
    models: dict[str, bytes] = {}
    for label, model_source, mode, sparse in variants:
        log(f"converting {label}")
        io = "int8" if mode == "int8" else "float32"
        models[label] = convert(model_source, mode=mode, input_type=io, output_type=io,
                                calibration=calibration if mode == "int8" else None,
                                runtime_min_version=RUNTIME_MIN_VERSION, progress=lambda _: None,
                                sparse_weights=sparse).tflite

    calls = {}
    for label, model in models.items():
        interp = litert_interpreter(model, THREADS)
        calls[label] = (interp, raw_invoke(interp, quantize_input(evaluation.x[:1], interp.get_input_details()[0])))
    samples: dict[str, list[float]] = {label: [] for label in models}
    log(f"timing: {rounds} interleaved rounds of {per_round} invokes per model")
    for _ in range(rounds):
        for label, (_, call) in calls.items():
            samples[label].extend(time_calls(call, per_round, warmup=5))

    base_label = variants[0][0]
    base = models[base_label]
    base_latency = summary(samples[base_label])["median_ms"]
    report = Report(f"digits CNN pruned to {SPARSITY:.0%}: sizes on the wire and latency vs the dense float32 model",
                    ["model", "accuracy %", "zeros %", "file bytes", "zlib-9 bytes", "MQTT chunk bytes",
                     "size vs baseline", "median ms", "latency vs baseline"])
    results = {}
    for label, model in models.items():
        sizes = transfer_sizes(model)
        latency = summary(samples[label])
        weights = tflite_sparsity(model)
        zeros = 100.0 * sum(w.sparsity * w.params for w in weights) / max(1, sum(w.params for w in weights))
        accuracy = litert_accuracy(model, evaluation.x, evaluation.y)
        results[label] = {"accuracy": accuracy, "zeros_percent": zeros, **sizes, "latency": latency}
        report.add(label, accuracy, zeros, len(model), sizes["model_deflate_bytes"], sizes["mqtt_pull_bytes"],
                   fmt_ratio(len(model) / len(base)), latency["median_ms"],
                   fmt_ratio(latency["median_ms"] / base_latency))
    sparse, dense = models[variants[2][0]], models[variants[1][0]]
    fraction = len(sparse) / len(base)
    report.verdict("sparse float32 size", fraction <= MAX_SPARSE_FRACTION,
                   f"{len(sparse)} bytes, {100 * fraction:.1f}% of the dense float32 file (limit "
                   f"{100 * MAX_SPARSE_FRACTION:.0f}%); same pruned weights stored dense: {len(dense)} bytes")
    speed = summary(samples[variants[2][0]])["median_ms"] / summary(samples[variants[1][0]])["median_ms"]
    report.notes.append(f"sparse vs dense encoding of the same pruned weights: latency {fmt_ratio(speed)}; "
                        "XNNPACK densifies the weights when it loads the model, and its sparse kernels apply only "
                        "to MobileNet-style subgraphs (3x3 stride-2 first conv on 3 channels, 1x1 convs, MEAN), "
                        "which this CNN is not: the gain is in transfer size")
    report.notes.append("int8 and dynamic-range models with sparse weights fail to load in XNNPACK "
                        "(ai-edge-litert 2.3), so int8 keeps dense weights; its zeros show in the zlib-9 column")
    report.notes.append(f"latency: raw set_tensor/invoke/get_tensor in ai-edge-litert, {THREADS} threads, batch 1, "
                        f"{rounds} x {per_round} invokes per model, interleaved")
    report.data["results"] = results
    report.print(args.json)
    return 0 if all(p for _, p, _ in report.verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
