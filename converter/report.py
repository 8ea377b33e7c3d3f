"""The conversion report: one dict with every fact, rendered for a person or written as JSON.

The same document is printed with ``--json``, written beside the bundle as
``{name}-v{version}-{profile}.report.json`` and (its validation part) signed into the
manifest, so what a person reads is what the device was promised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.protocol.keys import atomic_write

REPORT_FORMAT = "litefleet.convert-report"
REPORT_VERSION = 1


def document(*, ok: bool, name: str, version: int, profile: str, source: dict[str, Any],
             quantization: dict[str, Any] | None, validation: dict[str, Any] | None,
             accelerator: dict[str, Any] | None = None, estimates: dict[str, Any] | None = None,
             forced: list[str] | None = None, bundle: str | None = None, report: str | None = None,
             error: str | None = None, data: dict[str, Any] | None = None, pruning: dict[str, Any] | None = None,
             transfer: dict[str, Any] | None = None, search: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report document; ``ok`` means a signed bundle was written.

    ``pruning`` (converter/prune.py ``report_section``), ``transfer`` (converter/sparse.py
    ``transfer_sizes``) and ``search`` (converter/search.py) appear only when there is one.
    """
    doc = {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION,
        "ok": ok, "signed": bundle is not None, "bundle": bundle, "report": report, "error": error,
        "name": name, "version": version, "profile": profile,
        "source": source, "data": data or {}, "quantization": quantization or {},
        "accelerator": accelerator or {}, "estimates": estimates or {},
        "validation": validation or {}, "forced": list(forced or []),
    }
    doc.update({k: v for k, v in (("pruning", pruning), ("transfer", transfer), ("search", search)) if v is not None})
    return doc


def write(path: Path, doc: dict[str, Any]) -> Path:
    """Write the report atomically (the output folder never holds a partial file)."""
    atomic_write(Path(path), (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode(), mode=0o644)
    return Path(path)


def lines(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """The human report as (style, text) lines; pure, so it can be tested and printed anywhere."""
    out: list[tuple[str, str]] = []
    src = doc.get("source", {})
    quant = doc.get("quantization", {})
    out.append(("bold", f"{doc['name']} v{doc['version']} for profile {doc['profile']}"))
    out.append(("", f"  source: {src.get('path', '?')} ({src.get('kind', '?')})"))
    if quant:
        settings = quant.get("settings") or {}
        shown = ", ".join(f"{k}={v}" for k, v in sorted(settings.items()) if not isinstance(v, (dict, list)))
        out.append(("", f"  quantization: {quant.get('mode')} ({quant.get('input_type')} in, "
                        f"{quant.get('output_type')} out), {quant.get('calibration_samples', 0)} calibration samples"
                        + (f"; {shown}" if shown else "")))
    for purpose, what in (doc.get("data") or {}).items():
        out.append(("", f"  {purpose} data: {what}"))
    out.extend(_pruning_lines(doc.get("pruning")))
    transfer = doc.get("transfer") or {}
    if transfer:
        text = f"  transfer: model {_kb(transfer['model_bytes'])} ({_kb(transfer['model_deflate_bytes'])} deflated)"
        if "bundle_bytes" in transfer:
            text += (f", bundle {_kb(transfer['bundle_bytes'])} ({_kb(transfer['bundle_deflate_bytes'])} deflated), "
                     f"MQTT pull {_kb(transfer['mqtt_pull_bytes'])} in {transfer['mqtt_pull_chunks']} chunk(s)")
        out.append(("", text))
    accel = doc.get("accelerator") or {}
    if accel:
        mapped = (f", {accel['ops_mapped']}/{accel['ops_total']} ops mapped"
                  if accel.get("ops_mapped") is not None and accel.get("ops_total") else "")
        out.append(("", f"  accelerator: {accel.get('target')} (compiled: {accel.get('compiled')}){mapped}"
                        + (f"; {accel['note']}" if accel.get("note") else "")))
    validation = doc.get("validation") or {}
    checks = validation.get("checks", [])
    if checks:
        out.append(("bold", "checks:"))
    for check in checks:
        verdict = "PASS" if check["ok"] else "FAIL"
        if check["ok"] and check.get("details", {}).get("warnings"):
            verdict = "WARN"
        style = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}[verdict]
        out.append((style, f"  {verdict}  {check['name']:<9} {check['summary']}"))
        details = check.get("details", {})
        for layer in details.get("worst_layers", []) or []:
            out.append(("", f"          {layer['layer']} ({layer['op']}): rmse/scale {layer['rmse_over_scale']:.3g}"))
        if details.get("debugger_note"):
            out.append(("", f"          {details['debugger_note']}"))
        macro = (details.get("macro") or {}).get("converted")
        if macro:
            out.append(("", f"          macro precision {macro['precision']:.3f}, recall {macro['recall']:.3f}, "
                            f"F1 {macro['f1']:.3f} over {len(details.get('per_class', {}))} classes"))
    for note in validation.get("notes", []):
        out.append(("dim", f"  note: {note}"))
    if doc.get("forced"):
        out.append(("bold yellow", f"FORCED past failed checks: {', '.join(doc['forced'])}"))
    if doc.get("bundle"):
        out.append(("bold green", f"signed bundle: {doc['bundle']}"))
        out.append(("", f"report: {doc['report']}"))
    elif validation and not validation.get("ok", True):
        out.append(("bold red", f"NOT signed: failed checks {', '.join(validation.get('failed', []))}; "
                                "nothing was written"))
    return out


MAX_LAYER_LINES = 12


def _kb(n: int) -> str:
    return f"{n / 1000:.1f} KB" if n < 1_000_000 else f"{n / 1e6:.2f} MB"


def _pruning_lines(pruning: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not pruning:
        return []
    out = []
    tuning = pruning.get("fine_tuning") or {}
    how = (f"fine-tuned {tuning['epochs']} epoch(s) on {tuning['data']}" if tuning.get("data")
           else "no fine-tuning (one-shot)")
    kind = "structured" if pruning.get("structured") else "magnitude"
    out.append(("", f"  pruning: {kind}, target {pruning['target']:.0%}; {how}; params {pruning['params_before']:,} "
                    f"-> {pruning['params_after']:,}"))
    accuracy = pruning.get("float_accuracy")
    if accuracy:
        out.append(("", f"    float accuracy {accuracy['source']:.2%} -> {accuracy['pruned']:.2%} after pruning "
                        f"(drop {accuracy['drop_points']:.2f} pt, before quantization)"))
    for change in pruning.get("channels") or []:
        out.append(("", f"    {change['name']} ({change['kind']}): {change['channels_before']} -> "
                        f"{change['channels_after']} channels"))
    out.append(("", f"    read back from the converted model: {pruning['tflite_sparsity']:.1%} of the weights are "
                    f"zero; {pruning.get('sparse_note') or 'weights stored dense'}"))
    layers = pruning.get("tflite_layers") or []
    for layer in layers[:MAX_LAYER_LINES]:
        name = layer.get("layer") or layer["name"].split(";")[0]
        out.append(("", f"      {name} ({layer['op']}, {layer['dtype']}): {layer['sparsity']:.1%} zero of "
                        f"{layer['params']:,}"))
    if len(layers) > MAX_LAYER_LINES:
        out.append(("dim", f"      ... and {len(layers) - MAX_LAYER_LINES} more weight tensors (see --json)"))
    return out


def render(doc: dict[str, Any], console) -> None:
    """Print the human report on a rich console (plain text when it is not a terminal)."""
    from rich.markup import escape
    for style, text in lines(doc):
        console.print(f"[{style}]{escape(text)}[/]" if style else escape(text), soft_wrap=True)
