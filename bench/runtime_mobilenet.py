"""Benchmark: MobileNetV2 converted by litefleet in four modes, ai-edge-litert vs tflite-runtime 2.14.

Each mode's model file is timed with a raw set_tensor/invoke/get_tensor loop, 2 threads, in
ai-edge-litert (this process) and in tflite-runtime 2.14 (its own numpy<2 environment, the
same loop in a subprocess kept running on the same file). The two alternate in rounds, so a
machine that gets busier mid-run hits both alike.
Models are converted with runtime_min_version "2.14" (the converter's runtime-compat retry),
so that both runtimes can load every mode; in the full run the dynamic model converted for
2.21 (no retry) is added to show why that matters.

    .venv/bin/python -m bench.runtime_mobilenet [--quick] [--json]
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.common import (FULL, MODES, SMALL, THREADS, Report, Tflite214Rounds, fmt_ratio, litert_interpreter, log,
                          mobilenet, parse_args, raw_invoke, ratio, sample_input, summary, time_calls)

QUICK_MODES = ("dynamic", "int8")


def measure(spec, mode: str, rounds: int, per_round: int, per_round_214: int,
            runtime_min_version: str | None = None) -> dict:
    """Alternate rounds of ``per_round`` litert invokes and ``per_round_214`` 2.14 invokes."""
    kwargs = {"runtime_min_version": runtime_min_version} if runtime_min_version else {}
    path, info = mobilenet(spec, mode, progress=log, **kwargs)
    log(f"timing {path.name}")
    interp = litert_interpreter(path.read_bytes(), THREADS)
    call = raw_invoke(interp, sample_input(interp.get_input_details()[0]))
    time_calls(call, 0, 5)
    old = Tflite214Rounds(path)
    new_samples: list[float] = []
    old_samples: list[float] = []
    try:
        for r in range(rounds):
            if r % 2 == 0:
                new_samples += time_calls(call, per_round, 0)
            if old.ok:
                old_samples += old.round(per_round_214)
            if r % 2 == 1:
                new_samples += time_calls(call, per_round, 0)
    finally:
        old.close()
    old_doc = ({"ok": True, "version": old.version, **summary(old_samples)} if old_samples
               else {"ok": False, "version": old.version, "error": old.error})
    return {"mode": mode, "file": path.name, "bytes": path.stat().st_size, "conversion": info,
            "litert": summary(new_samples), "tflite214": old_doc}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    spec, modes = (SMALL, QUICK_MODES) if args.quick else (FULL, MODES)
    rounds, per_round, per_round_214 = (2, 20, 5) if args.quick else (10, 40, 10)

    results = [measure(spec, mode, rounds, per_round, per_round_214) for mode in modes]
    if not args.quick:
        results.append(measure(spec, "dynamic", rounds, per_round, per_round_214, runtime_min_version="2.21"))

    report = Report(f"{spec.label}: ai-edge-litert (ours) vs tflite-runtime 2.14 (raw baseline), {THREADS} threads",
                    ["mode", "file MB", "litert median ms", "litert p90 ms", "2.14 median ms", "2.14 p90 ms",
                     "ratio 2.14/litert", "2.14 loads it"])
    for r in results:
        label = r["mode"] + ("" if r["conversion"].get("runtime_min_version", "2.14") == "2.14"
                             else f" (for runtime {r['conversion']['runtime_min_version']})")
        old = r["tflite214"]
        old_median = old.get("median_ms") if old.get("ok") else None
        loads = "yes" if old.get("ok") else "NO (see note)"
        if not old.get("ok"):
            report.notes.append(f"{label}: tflite-runtime 2.14 refuses it: {old.get('error', '')}")
        report.add(label, r["bytes"] / 1e6, r["litert"]["median_ms"], r["litert"]["p90_ms"], old_median,
                   old.get("p90_ms") if old.get("ok") else None,
                   fmt_ratio(ratio(old_median, r["litert"]["median_ms"])), loads)
        retry = r["conversion"].get("settings", {}).get("runtime_retry")
        if retry:
            report.notes.append(f"{label}: converter retried with the dense per-channel switch because {retry}")
    report.notes.append(f"raw set_tensor/invoke/get_tensor loop, batch 1, random input; {rounds} alternating "
                        f"rounds of {per_round} ai-edge-litert invokes and {per_round_214} tflite-runtime 2.14 "
                        "invokes (in .venv-tflite214, a process kept running)")
    report.notes.append("random weights: latency does not depend on them; int8 calibrated on "
                        f"{spec.calibration_samples} random images")
    unloadable = [r for r in results if not r["tflite214"].get("ok")
                  and r["conversion"].get("runtime_min_version", "2.14") == "2.14"]
    report.verdict("every mode converted for 2.14 loads in tflite-runtime 2.14", not unloadable,
                   "all load" if not unloadable else
                   "; ".join(f"{r['mode']}: {r['tflite214'].get('error')}" for r in unloadable))
    report.data["results"] = results
    report.print(args.json)
    return 0 if not unloadable else 1


if __name__ == "__main__":
    raise SystemExit(main())
