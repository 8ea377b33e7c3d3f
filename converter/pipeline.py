"""From a trained model to a signed bundle: profile, key, convert, validate, manifest, sign, write.

Order matters: everything cheap that can be wrong (profile, name, version, output folder,
signing key and its passphrase) is checked before the slow conversion, so a typo fails in a
second. Nothing is written to the output folder unless every check passed (or ``force`` was
given for the checks that may be forced); the bundle and its report are written atomically.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__ as AGENT_VERSION
from agent.protocol import bundle as bundle_mod
from agent.protocol import encryption, keys, profiles
from agent.protocol.manifest import DEFAULT_CHUNK_SIZE, FORMAT, FORMAT_VERSION, TensorData, model_section

from . import report as report_mod
from . import runtimes
from .errors import ConverterError, DataError, ValidationFailed
from .sparse import transfer_sizes

Progress = Callable[[str], None]
EVAL_LIMIT = 2000                 # eval samples drawn at most (a bounded random sample, stated in the report)
SMOKE_INT_ATOL = 2.0              # quantization steps an integer output may differ by on a device
SMOKE_FLOAT_RTOL = 1e-3           # relative bound for float outputs on the CPU
SMOKE_FLOAT_RTOL_GPU = 1e-2       # the GPU delegate computes in fp16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VALIDATION_EXIT_CODE = 3


@dataclass
class BundleResult:
    """What the conversion produced: the bundle, its report, and the signed manifest."""

    bundle_path: Path
    report_path: Path
    manifest: dict[str, Any]
    report: dict[str, Any]
    validation: Any


def bundle_filename(name: str, version: int, profile: str) -> str:
    return f"{name}-v{version}-{profile}{bundle_mod.BUNDLE_SUFFIX}"


def report_filename(name: str, version: int, profile: str) -> str:
    return f"{name}-v{version}-{profile}.report.json"


def _noop(_: str) -> None:
    pass


# Cheap checks first ----------------------------------------------------------------------

def check_name_version(name: str, version: int) -> None:
    if not _NAME.match(name or ""):
        raise ConverterError(f"--name {name!r}: must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConverterError(f"--version {version!r}: must be a positive integer")


def check_version_increases(out_dir: Path, name: str, profile: str, version: int) -> None:
    """Refuse to make a version that is not newer than a bundle already in the output folder."""
    if not out_dir.is_dir():
        return
    pattern = re.compile(rf"^{re.escape(name)}-v(\d+)-{re.escape(profile)}{re.escape(bundle_mod.BUNDLE_SUFFIX)}$")
    existing = sorted(int(m.group(1)) for p in out_dir.iterdir() if (m := pattern.match(p.name)))
    if existing and existing[-1] >= version:
        newest = out_dir / bundle_filename(name, existing[-1], profile)
        raise ConverterError(f"--version {version}: {newest} already exists; versions must increase "
                             f"(use --version {existing[-1] + 1} or higher)")


def choose_mode(profile, mode_override: str | None) -> tuple[str, str, str]:
    """(mode, input_type, output_type): the profile's, or the override with I/O types that suit it.

    An override keeps the profile's I/O types when the mode can take them, otherwise uses
    float32 I/O, which every mode accepts.
    """
    q = profile.quantization
    if not mode_override or mode_override == q["mode"]:
        return q["mode"], q["input_type"], q["output_type"]
    io = (q["input_type"], q["output_type"])
    fits = {"float32": {"float32"}, "float16": {"float32"}, "dynamic": {"float32"},
            "int8": {"int8", "uint8", "float32"}, "int16x8": {"int16", "float32"}}[mode_override]
    if set(io) <= fits:
        return mode_override, *io
    return mode_override, "float32", "float32"


# Manifest parts --------------------------------------------------------------------------

def tensor_spec(detail: dict[str, Any]) -> dict[str, Any]:
    """A manifest tensor entry from an interpreter's tensor details."""
    q = detail["quantization_parameters"]
    quant = None
    if len(q["scales"]):
        quant = {"scale": [float(s) for s in q["scales"]], "zero_point": [int(z) for z in q["zero_points"]],
                 "quantized_dimension": int(q["quantized_dimension"])}
    return {"name": detail["name"], "shape": [int(d) for d in detail["shape"]],
            "dtype": np.dtype(detail["dtype"]).name, "quantization": quant}


def smoke_test(model: bytes, sample: np.ndarray, *, threads: int, gpu: bool = False) -> dict[str, Any]:
    """A real sample in the model's input dtype and ai-edge-litert's output for it, with a tolerance.

    ``atol`` is in the output's own units: SMOKE_INT_ATOL quantization steps for integer
    outputs (and for float outputs behind a DEQUANTIZE, in steps of its scale), a small bound
    relative to the largest output for float models.
    """
    interp = runtimes.litert_interpreter(model, threads)
    inp = interp.get_input_details()[0]
    x = runtimes.quantize_input(sample[None], inp)
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    outputs = [interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()]
    steps = runtimes.output_steps(model)
    bounds = []
    for out, step in zip(outputs, steps):
        if np.issubdtype(out.dtype, np.integer):
            bounds.append(SMOKE_INT_ATOL)
            continue
        biggest = float(np.max(np.abs(out))) if out.size else 0.0
        relative = (SMOKE_FLOAT_RTOL_GPU if gpu else SMOKE_FLOAT_RTOL) * max(1.0, biggest)
        # Float output of a quantized model: the runtimes differ in whole steps of its scale.
        bounds.append(max(relative, SMOKE_INT_ATOL * step) if step else relative)
    atol = max(bounds) if bounds else SMOKE_INT_ATOL
    return {"inputs": [_tensor(x)], "expected_outputs": [_tensor(o) for o in outputs], "atol": float(atol)}


def _tensor(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return TensorData(array.dtype.name, tuple(int(d) for d in array.shape), array.astype(array.dtype.newbyteorder("<"))
                      .tobytes()).to_dict()


def accelerator_section(profile, conversion, edgetpu) -> dict[str, Any]:
    """Where the model will run: the compiled Edge TPU, the GPU delegate, or the CPU."""
    from . import ops as ops_mod
    kind = profile.accelerator["kind"]
    total = sum(o.count for o in conversion.ops)
    if kind == "edgetpu":
        if edgetpu is not None and edgetpu.compiled:
            return {"target": "edgetpu", "compiled": True, "ops_mapped": edgetpu.ops_mapped,
                    "ops_total": edgetpu.ops_total, "note": edgetpu.note}
        note = (edgetpu.note if edgetpu is not None and edgetpu.note
                else "not compiled for the Edge TPU: the model will run on the CPU (XNNPACK)")
        return {"target": "cpu", "compiled": False, "ops_mapped": 0, "ops_total": total, "note": note}
    if kind == "gpu":
        fallbacks = ops_mod.accelerator_fallbacks(conversion.ops, profile.accelerator["supported_ops"])
        mapped = sum(o.count for o in conversion.ops if o.name not in fallbacks)
        note = "GPU delegate at load time" + (f"; on the CPU: {', '.join(fallbacks)}" if fallbacks else "")
        return {"target": "gpu", "compiled": False, "ops_mapped": mapped, "ops_total": total, "note": note}
    return {"target": "cpu", "compiled": False, "ops_mapped": None, "ops_total": None, "note": "XNNPACK on the CPU"}


def producer() -> dict[str, Any]:
    from importlib import metadata
    versions = {"tool": "litefleet", "litefleet": AGENT_VERSION}
    for dist, key in (("tensorflow-cpu", "tensorflow"), ("tensorflow", "tensorflow"), ("ai-edge-litert", "ai_edge_litert")):
        if key in versions:
            continue
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def build_manifest(*, name: str, version: int, profile, model: bytes, conversion, validation_doc: dict[str, Any],
                   accelerator: dict[str, Any], estimates: dict[str, int], smoke: dict[str, Any],
                   forced: list[str], chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
    # An Edge TPU-compiled model needs the Edge TPU delegate to load; its I/O tensors are the
    # CPU model's, so read them there.
    interp = runtimes.litert_interpreter(conversion.tflite if accelerator.get("compiled") else model)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "name": name, "version": version, "profile": profile.name,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "min_agent_version": AGENT_VERSION,
        "producer": producer(),
        "model": model_section(model, chunk_size),
        "inputs": [tensor_spec(d) for d in interp.get_input_details()],
        "outputs": [tensor_spec(d) for d in interp.get_output_details()],
        "quantization": {"mode": conversion.mode, "input_type": conversion.input_type,
                         "output_type": conversion.output_type,
                         "calibration_samples": int(conversion.calibration_samples),
                         "settings": _plain(conversion.settings or {})},
        "accelerator": accelerator,
        "estimates": estimates,
        "validation": validation_doc,
        "smoke_test": smoke,
        "forced": forced,
    }


def _plain(value: Any) -> Any:
    """Settings as strict JSON (enums and dtypes become their names)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else str(value)
    return getattr(value, "name", None) or str(value)


# The pipeline ----------------------------------------------------------------------------

def convert_to_bundle(model_path: str | os.PathLike[str], profile_name: str, *,
                      calibration: str | os.PathLike[str] | None = None,
                      eval: str | os.PathLike[str] | None = None,  # noqa: A002 - the CLI's --eval
                      name: str, version: int, sign_key: str | os.PathLike[str], passphrase: bytes | None = None,
                      out_dir: str | os.PathLike[str], mode_override: str | None = None, force: bool = False,
                      skip_edgetpu_compile: bool = False, progress: Progress = _noop,
                      profiles_dir: str | os.PathLike[str] | None = None,
                      encrypt_for: list[keys.Recipient] | None = None,
                      prune: float | None = None, prune_structured: bool = False,
                      finetune: str | os.PathLike[str] | None = None, epochs: int = 2,
                      pruned: tuple[Any, Any] | None = None, search: dict[str, Any] | None = None) -> BundleResult:
    """Convert, validate, sign and write ``{out_dir}/{name}-v{version}-{profile}.lfb`` and its report.

    Raises a :class:`~agent.protocol.errors.LitefleetError` naming the problem, and writes
    nothing, when an input is bad or a check fails (``ValidationFailed`` carries the report
    document as ``.document``). ``force`` signs past failed checks that may be forced and
    records them in the manifest's ``forced``; never past a runtime that cannot load the model.
    ``encrypt_for``: seal the model for these X25519 recipients (agent/protocol/encryption.py).
    ``prune``: prune to this sparsity before quantizing (converter/prune.py), fine-tuning on
    ``finetune`` for ``epochs``; ``pruned`` is a (SourceModel, PruneResult) made earlier by
    ``--search``, and ``search`` its table of candidates for the report.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow's converter logs deprecation chatter through absl at WARNING; our own progress
    # lines say what is happening, and real failures arrive as exceptions.
    logging.getLogger("absl").setLevel(logging.ERROR)
    from .data import load_dataset
    from .models import load_source
    from .validate import validate

    profile = profiles.load_profile(profile_name, profiles_dir)
    check_name_version(name, version)
    out_dir = Path(out_dir)
    check_version_increases(out_dir, name, profile.name, version)
    progress(f"loading the signing key {sign_key}")
    release_key = keys.load_private(sign_key, passphrase)
    mode, input_type, output_type = choose_mode(profile, mode_override)
    if prune is not None:
        from .prune import check_sparsity, check_training
        check_sparsity(prune)
        check_training(epochs, 32)

    progress(f"loading the model {model_path}")
    source = load_source(model_path)
    if prune is not None:
        from .prune import check_source
        check_source(source, prune_structured)
    if source.kind != "tflite" and mode in ("int8", "int16x8") and calibration is None:
        raise DataError(f"mode {mode} (profile {profile.name}) needs calibration data: give --calibration "
                        "FILE (.npz with x, .npy, or a folder of images)")
    limit = int(profile.quantization.get("calibration_samples", 200))
    cal = load_dataset(calibration, source.input_shape, purpose="calibration", limit=limit) if calibration else None
    ev = load_dataset(eval, source.input_shape, purpose="eval", limit=EVAL_LIMIT) if eval else None
    conv_source, pruning = _prune_step(source, prune, prune_structured, finetune, epochs, pruned, ev, progress)

    progress(f"converting to {mode} ({input_type} in, {output_type} out)"
             + (f", calibrating with {len(cal.x)} samples" if cal is not None and mode in ("int8", "int16x8") else ""))
    conversion, sparse_weights, sparse_note = convert_model(conv_source, pruning, profile, mode, input_type,
                                                            output_type, cal, progress)
    pruning_doc = None
    if pruning is not None:
        from .prune import manifest_summary, report_section
        pruning_doc = report_section(pruning, conversion.tflite, sparse_weights=sparse_weights,
                                     sparse_note=sparse_note, original=source, pruned=conv_source,
                                     data=ev if ev is not None else cal)
        conversion.settings["pruning"] = manifest_summary(pruning_doc)
        progress(f"pruned: {pruning_doc['tflite_sparsity']:.1%} of the converted model's weights are zero")

    edgetpu = None
    model = conversion.tflite
    if profile.accelerator["kind"] == "edgetpu":
        from .edgetpu import compile_for_edgetpu
        edgetpu = compile_for_edgetpu(conversion.tflite, skip=skip_edgetpu_compile, progress=progress)
        model = edgetpu.tflite

    eval_data, eval_label = (ev, "eval data") if ev is not None else (
        (cal, "calibration data (no --eval given)") if cal is not None else (None, ""))
    reference = source
    if pruning is not None:
        from .prune import MeasuredAgainst
        reference = MeasuredAgainst(conv_source, source)
    validation = validate(reference, conversion, profile, eval_data, progress=progress, calibration=cal,
                          eval_label=eval_label)
    if edgetpu is not None and edgetpu.compiled:
        validation.notes.append("checks ran on the CPU model; the Edge TPU-compiled model needs the Edge TPU "
                                "delegate, which this host does not have")
    validation_doc = validation.to_dict()
    data_doc = {k: v for k, v in (("calibration", _describe(cal)), ("eval", _describe(ev) if ev is not None else
                ("none: measured on the calibration data" if cal is not None else "none"))) if v}
    accelerator = accelerator_section(profile, conversion, edgetpu)
    budgets = validation.check("budgets").details
    estimates = {"arena_bytes": int(budgets.get("arena_bytes", 0)),
                 "peak_memory_bytes": int(budgets.get("peak_memory_bytes", 0))}
    quant_doc = {"mode": conversion.mode, "input_type": conversion.input_type, "output_type": conversion.output_type,
                 "calibration_samples": int(conversion.calibration_samples), "settings": _plain(conversion.settings or {})}
    bundle_path = out_dir / bundle_filename(name, version, profile.name)
    report_path = out_dir / report_filename(name, version, profile.name)

    def doc(ok: bool, error: str | None = None, forced: list[str] | None = None,
            transfer: dict[str, Any] | None = None) -> dict[str, Any]:
        return report_mod.document(
            ok=ok, name=name, version=version, profile=profile.name,
            source={"path": str(model_path), "kind": source.kind}, data=data_doc, quantization=quant_doc,
            validation=validation_doc, accelerator=accelerator, estimates=estimates, forced=forced,
            bundle=str(bundle_path) if ok else None, report=str(report_path) if ok else None, error=error,
            pruning=pruning_doc, transfer=transfer or transfer_sizes(model), search=search)

    failed = validation.failed()
    unforceable = [c.name for c in validation.checks if not c.ok and not c.forceable]
    if failed and (not force or unforceable):
        why = (f"failed checks {', '.join(unforceable)} cannot be forced: a runtime the profile allows cannot load "
               "this model" if force else f"validation failed ({', '.join(failed)}); nothing was signed "
               "(--force signs anyway and records it)")
        detail = "; ".join(f"{c.name}: {c.summary}" for c in validation.checks if not c.ok)
        message = f"{why}: {detail}"
        exc = ValidationFailed(message, validation)
        exc.document = doc(False, message)  # type: ignore[attr-defined]
        exc.exit_code = VALIDATION_EXIT_CODE  # type: ignore[attr-defined]
        raise exc
    forced = list(failed)
    if forced:
        progress(f"--force: signing past failed checks {', '.join(forced)}")

    progress("building the manifest and smoke test")
    sample = eval_data.x[0] if eval_data is not None and len(eval_data.x) else \
        np.random.default_rng(0).random(source.input_shape[1:], dtype=np.float32)
    smoke_model = model if not accelerator.get("compiled") else conversion.tflite
    smoke = smoke_test(smoke_model, sample, threads=profile.threads, gpu=profile.accelerator["kind"] == "gpu")
    manifest = build_manifest(name=name, version=version, profile=profile, model=model, conversion=conversion,
                              validation_doc=validation_doc, accelerator=accelerator, estimates=estimates,
                              smoke=smoke, forced=forced)
    profile_data = cal if cal is not None else ev
    if profile_data is not None and len(profile_data.x) >= 2:
        # Drift reference for the device: the data it was calibrated on and the converted model's outputs.
        from .datastats import profile as data_profile
        progress(f"profiling the {'calibration' if cal is not None else 'eval'} data and the model's outputs for drift")
        manifest["data_profile"] = data_profile(smoke_model, profile_data.x, threads=profile.threads).to_dict()
    payload = model
    if encrypt_for:
        progress(f"encrypting the model for {len(encrypt_for)} recipient(s): "
                 + ", ".join(r.label for r in encrypt_for))
        manifest, payload = encryption.encrypt(manifest, model, encrypt_for)
    progress("signing")
    data = bundle_mod.build(manifest, payload, release_key)
    parts = bundle_mod.parse_bundle(data)
    final = doc(True, forced=forced, transfer=transfer_sizes(payload, data, parts.manifest_bytes,
                                                             parts.signature_bytes))
    out_dir.mkdir(parents=True, exist_ok=True)
    report_mod.write(report_path, final)
    try:
        bundle_mod.write_bundle(bundle_path, data)
    except BaseException:
        report_path.unlink(missing_ok=True)
        raise
    progress(f"wrote {bundle_path}")
    return BundleResult(bundle_path, report_path, manifest, final, validation)


def convert_model(source, pruning, profile, mode: str, input_type: str, output_type: str, calibration,
                  progress: Progress = _noop):
    """(Conversion, sparse_weights, note): convert ``source``, storing a pruned model's weights sparse
    where the profile's runtime takes that (converter/prune.py ``sparse_encoding_fits``)."""
    from .quantize import convert
    sparse_weights, note = False, ""
    if pruning is not None:
        from .prune import sparse_encoding_fits
        sparse_weights, note = sparse_encoding_fits(mode, profile.accelerator["kind"], pruning.structured)
    kwargs = dict(mode=mode, input_type=input_type, output_type=output_type, calibration=calibration,
                  runtime_min_version=profile.runtime["min_version"], progress=progress)
    conversion = convert(source, sparse_weights=sparse_weights, **kwargs)
    if sparse_weights and not _loads(conversion.tflite):
        sparse_weights, note = False, "the sparse encoding did not load in ai-edge-litert; weights stored dense"
        progress(note)
        conversion = convert(source, **kwargs)
    return conversion, sparse_weights, note


def _loads(model: bytes) -> bool:
    try:
        runtimes.litert_interpreter(model)
    except Exception:  # noqa: BLE001 - any load failure means: do not ship this encoding
        return False
    return True


def _prune_step(source, prune: float | None, structured: bool, finetune, epochs: int, pruned, ev, progress):
    """(the source to convert, PruneResult or None): prune ``source`` when asked, or take ``pruned``."""
    if pruned is not None:
        return pruned
    if prune is None:
        return source, None
    from .data import load_dataset
    from .prune import check_labels, prune_source
    tuning = load_dataset(finetune, source.input_shape, purpose="fine-tuning") if finetune else None
    check_labels(tuning)
    if tuning is None:
        progress("warning: no --finetune data: pruning at once without fine-tuning (accuracy may drop)")
    progress(f"pruning to {prune:.0%}" + (" (structured: whole filters and units)" if structured else "")
             + (f", fine-tuning {epochs} epoch(s) on {tuning.describe()}" if tuning is not None else ""))
    validation = ev if ev is not None and ev.y is not None else None
    return prune_source(source, prune, tuning, structured=structured, epochs=epochs, validation=validation,
                        progress=progress)


def _describe(data) -> str:
    if data is None:
        return ""
    labels = "with labels" if data.y is not None else "no labels"
    text = data.describe() if hasattr(data, "describe") else f"{len(data.x)} samples from {data.source}"
    return f"{text} ({labels})"
