"""``litefleet convert --search``: try the conversions that fit a profile, ship the best that is accurate enough.

Candidates are every quantization mode the profile's hardware can run, each on the model as
given and pruned to each of the requested sparsities (50% and 80% by default). Each is
converted and measured on this host the way validation does it (accuracy on the eval data
against the model as given, size, deflate-compressed size, estimated memory, median latency
with ai-edge-litert and the profile's threads) and kept only when it fits the profile's
budgets and accuracy tolerance. The smallest (``size``) or fastest (``latency``) fitting
candidate then goes through the whole conversion pipeline (every check, every runtime); if
that fails, the next one is tried. Only that one is signed and written; the table of every
candidate goes into its report, so the choice can be checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol.manifest import QUANT_MODES

from .errors import ConverterError, DataError, ValidationFailed

Progress = Callable[[str], None]
GOALS = ("size", "latency")
DEFAULT_SPARSITIES = (0.5, 0.8)
# The modes each kind of hardware runs well: the Edge TPU only full int8; the GPU delegate float
# models; XNNPACK on the CPU float, float16 weights, dynamic range and full int8 (int16x8 runs on
# reference kernels only, so it is tried only when asked for with --search-modes).
MODES_FOR_ACCELERATOR = {"edgetpu": ("int8",), "gpu": ("float16", "float32"),
                         "none": ("float32", "float16", "dynamic", "int8")}
LATENCY_RUNS = 50
LATENCY_SECONDS = 1.0
SEARCH_EXIT_CODE = 3


class SearchFailed(ConverterError):
    """No candidate fits the profile; ``document`` holds the table of candidates."""

    exit_code = SEARCH_EXIT_CODE

    def __init__(self, message: str, document: dict[str, Any]) -> None:
        self.document = document
        super().__init__(message)


@dataclass
class Candidate:
    """One conversion tried: how it was made, what was measured, and whether it fits the profile."""

    mode: str
    prune: float | None
    structured: bool = False
    input_type: str = ""
    output_type: str = ""
    model_bytes: int | None = None
    deflate_bytes: int | None = None
    latency_ms: float | None = None
    memory_bytes: int | None = None
    accuracy: float | None = None
    drop_points: float | None = None
    drop_measure: str = ""                  # "accuracy" or "disagreement" (no labels: an upper bound)
    sparsity: float | None = None           # zero weights read back from the converted model
    sparse_weights: bool = False
    tried: bool = False
    why_not: list[str] = field(default_factory=list)
    chosen: bool = False

    @property
    def fits(self) -> bool:
        return self.tried and not self.why_not

    @property
    def label(self) -> str:
        if self.prune is None:
            return self.mode
        return f"{self.mode} + {'structured ' if self.structured else ''}prune {self.prune:.0%}"

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "mode": self.mode, "prune": self.prune, "structured": self.structured,
                "input_type": self.input_type, "output_type": self.output_type, "model_bytes": self.model_bytes,
                "deflate_bytes": self.deflate_bytes, "latency_ms": self.latency_ms, "memory_bytes": self.memory_bytes,
                "accuracy": self.accuracy, "drop_points": self.drop_points, "drop_measure": self.drop_measure,
                "sparsity": self.sparsity, "sparse_weights": self.sparse_weights, "tried": self.tried,
                "fits": self.fits, "why_not": list(self.why_not), "chosen": self.chosen}


def candidate_modes(profile, requested: list[str] | None = None) -> list[str]:
    """The modes to try for ``profile``: its own first, then the others its hardware runs."""
    kind = profile.accelerator["kind"]
    allowed = MODES_FOR_ACCELERATOR.get(kind, QUANT_MODES)
    if requested:
        unknown = [m for m in requested if m not in QUANT_MODES]
        if unknown:
            raise ConverterError(f"--search-modes: unknown mode(s) {', '.join(unknown)}; "
                                 f"expected some of {', '.join(QUANT_MODES)}")
        if kind == "edgetpu" and set(requested) != {"int8"}:
            raise ConverterError(f"--search-modes: profile {profile.name} targets the Edge TPU, which runs only int8")
        return list(dict.fromkeys(requested))
    return list(dict.fromkeys([profile.mode, *allowed]))


def rank(candidates: list[Candidate], goal: str) -> list[Candidate]:
    """The fitting candidates, best first: smallest file (then smallest compressed), or lowest latency."""
    fitting = [c for c in candidates if c.fits]
    if goal == "latency":
        return sorted(fitting, key=lambda c: (c.latency_ms, c.model_bytes, c.drop_points))
    return sorted(fitting, key=lambda c: (c.model_bytes, c.deflate_bytes, c.drop_points))


def _noop(_: str) -> None:
    pass


def search(model_path: str | os.PathLike[str], profile_name: str, *, calibration=None, eval=None,  # noqa: A002
           finetune=None, epochs: int = 2, goal: str = "size", modes: list[str] | None = None,
           sparsities: tuple[float, ...] | list[float] = DEFAULT_SPARSITIES, structured: bool = False,
           name: str, version: int, sign_key, passphrase: bytes | None = None, out_dir, force: bool = False,
           skip_edgetpu_compile: bool = False, progress: Progress = _noop, profiles_dir=None, encrypt_for=None):
    """Try every candidate, bundle the best one; returns the pipeline's BundleResult.

    Raises SearchFailed (with the table) when no candidate fits, or a LitefleetError naming
    bad input before any slow work. Nothing is written unless a bundle is signed.
    """
    from agent.protocol import keys, profiles

    from . import pipeline
    from .data import load_dataset
    from .models import load_source
    from .prune import check_labels, check_sparsity, check_training, prune_source

    if goal not in GOALS:
        raise ConverterError(f"--search-goal {goal!r}: expected one of {', '.join(GOALS)}")
    profile = profiles.load_profile(profile_name, profiles_dir)
    pipeline.check_name_version(name, version)
    pipeline.check_version_increases(Path(out_dir), name, profile.name, version)
    keys.load_private(sign_key, passphrase)          # a wrong passphrase fails now, not after the search
    levels = [check_sparsity(s, "--search-prune") for s in sparsities]
    check_training(epochs, 32)
    mode_list = candidate_modes(profile, modes)

    progress(f"loading the model {model_path}")
    source = load_source(model_path)
    if source.kind == "tflite":
        raise ConverterError(f"{model_path}: --search converts the model in several ways and needs the Keras model "
                             "or SavedModel; a .tflite file is used as it is")
    limit = int(profile.quantization.get("calibration_samples", 200))
    cal = load_dataset(calibration, source.input_shape, purpose="calibration", limit=limit) if calibration else None
    ev = load_dataset(eval, source.input_shape, purpose="eval", limit=pipeline.EVAL_LIMIT) if eval else None
    tuning = load_dataset(finetune, source.input_shape, purpose="fine-tuning") if finetune else None
    check_labels(tuning)
    data, data_label = (ev, "eval data") if ev is not None else (cal, "calibration data (no --eval given)")
    if data is None:
        raise DataError("--search compares candidates on data: give --eval DATA (labelled, best) or --calibration")

    progress(f"reference outputs of the model as given on {len(data)} samples of {data_label}")
    reference = np.asarray(source.reference_predict(data.x))
    from . import metrics
    source_accuracy = metrics.accuracy(data.y, metrics.top1(reference)) if data.y is not None else None

    variants: list[tuple[float | None, Any, Any]] = [(None, source, None)]
    candidates: list[Candidate] = []
    for level in levels:
        if tuning is None:
            for mode in mode_list:
                candidates.append(Candidate(mode, level, structured, why_not=[
                    "not tried: pruning needs --finetune DATA (labelled) to recover accuracy"]))
            continue
        progress(f"pruning to {level:.0%}, fine-tuning {epochs} epoch(s) on {tuning.describe()}")
        validation = ev if ev is not None and ev.y is not None else None
        try:
            pruned_source, result = prune_source(source, level, tuning, structured=structured, epochs=epochs,
                                                 validation=validation, progress=progress)
        except ConverterError as exc:
            raise ConverterError(f"--search: pruning to {level:.0%} failed: {exc}") from None
        variants.append((level, pruned_source, result))

    budget = float(profile.budgets["max_accuracy_drop"])
    tried: list[Candidate] = []
    for level, variant_source, result in variants:
        for mode in mode_list:
            candidate = Candidate(mode, level, structured if level is not None else False)
            progress(f"candidate {candidate.label}: converting and measuring")
            _measure(candidate, variant_source, result, profile, cal, data, reference, source_accuracy, budget,
                     progress)
            tried.append(candidate)
    candidates = tried + candidates

    def table() -> dict[str, Any]:
        return {"goal": goal, "profile": profile.name, "max_accuracy_drop": budget, "data": data.describe(),
                "data_label": data_label, "source_accuracy": source_accuracy, "modes": mode_list,
                "sparsities": levels, "structured": structured,
                "candidates": [c.to_dict() for c in candidates],
                "chosen": next((c.label for c in candidates if c.chosen), None),
                "latency": f"median of up to {LATENCY_RUNS} runs, ai-edge-litert, {profile.threads} threads, this host"}

    by_level = {level: (variant_source, result) for level, variant_source, result in variants}
    for best in rank(candidates, goal):
        progress(f"chosen: {best.label}; running every check before signing")
        best.chosen = True
        variant_source, result = by_level[best.prune]
        try:
            return pipeline.convert_to_bundle(
                model_path, profile_name, calibration=calibration, eval=eval, name=name, version=version,
                sign_key=sign_key, passphrase=passphrase, out_dir=out_dir, mode_override=best.mode, force=force,
                skip_edgetpu_compile=skip_edgetpu_compile, progress=progress, profiles_dir=profiles_dir,
                encrypt_for=encrypt_for, prune=best.prune, prune_structured=best.structured, finetune=finetune,
                epochs=epochs, pruned=(variant_source, result) if result is not None else None, search=table())
        except ValidationFailed as exc:
            best.chosen = False
            best.why_not.append(f"full validation failed: {', '.join(exc.report.failed()) if exc.report else exc}")
            progress(f"{best.label} failed the full validation; trying the next candidate")
    doc = table()
    message = (f"no candidate fits profile {profile.name} (accuracy drop within {budget:g} pt, size, memory and "
               f"latency budgets): nothing was signed; see the table of {len(candidates)} candidate(s)")
    raise SearchFailed(message, {"ok": False, "signed": False, "error": message, "search": doc})


def _measure(candidate: Candidate, source, pruning, profile, calibration, data, reference: np.ndarray,
             source_accuracy: float | None, budget: float, progress: Progress) -> None:
    """Convert and measure one candidate in place; problems go to ``why_not``, never raised."""
    from . import metrics, runtimes
    from .pipeline import choose_mode, convert_model
    from .sparse import deflate_size, overall_sparsity, weight_tensors
    from .validate import converted_predict, measure_latency
    mode, input_type, output_type = choose_mode(profile, candidate.mode)
    candidate.input_type, candidate.output_type = input_type, output_type
    if mode in ("int8", "int16x8") and calibration is None:
        candidate.why_not.append(f"not tried: {mode} needs --calibration data")
        return
    try:
        conversion, sparse_weights, _ = convert_model(source, pruning, profile, mode, input_type, output_type,
                                                      calibration)
    except ConverterError as exc:
        candidate.why_not.append(f"conversion failed: {exc}")
        return
    candidate.tried = True
    model = conversion.tflite
    candidate.sparse_weights = sparse_weights
    candidate.model_bytes, candidate.deflate_bytes = len(model), deflate_size(model)
    candidate.sparsity = round(overall_sparsity(weight_tensors(model)), 6)
    try:
        out = converted_predict(model, data.x, profile.threads)[0]
        detail = runtimes.litert_interpreter(model).get_input_details()[0]
        sample = runtimes.quantize_input(data.x[:1], detail)[0]
        candidate.latency_ms = measure_latency(model, profile.threads, sample, runs=LATENCY_RUNS,
                                               max_seconds=LATENCY_SECONDS)["median_ms"]
        candidate.memory_bytes = runtimes.memory_estimate(model, profile.threads)["peak_memory_bytes"]
    except Exception as exc:  # noqa: BLE001 - a model that does not run is a finding, not a crash
        candidate.why_not.append(f"does not run in ai-edge-litert: {runtimes._one_line(exc)}")
        return
    out = out.reshape(reference.shape) if out.size == reference.size else out
    if data.y is not None:
        candidate.accuracy = metrics.accuracy(data.y, metrics.top1(out))
        candidate.drop_points = round((source_accuracy - candidate.accuracy) * 100.0, 6)
        candidate.drop_measure = "accuracy"
    else:
        # Without labels the accuracy cannot move by more than the share of changed predictions.
        candidate.drop_points = round((1.0 - metrics.agreement(reference, out)) * 100.0, 6)
        candidate.drop_measure = "disagreement"
    budgets = profile.budgets
    if candidate.drop_points > budget + 1e-9:
        what = "accuracy drop" if candidate.drop_measure == "accuracy" else "disagreement with the source"
        candidate.why_not.append(f"{what} {candidate.drop_points:.2f} pt > {budget:g} pt")
    if candidate.model_bytes > int(budgets["max_model_bytes"]):
        candidate.why_not.append(f"model {candidate.model_bytes:,} B > {int(budgets['max_model_bytes']):,} B budget")
    if candidate.memory_bytes > int(budgets["max_memory_bytes"]):
        candidate.why_not.append(f"memory ~{candidate.memory_bytes:,} B > {int(budgets['max_memory_bytes']):,} B")
    bound = float(budgets.get("max_latency_ms", 0.0) or 0.0)
    if bound > 0 and candidate.latency_ms > bound:
        candidate.why_not.append(f"latency {candidate.latency_ms:.3f} ms > {bound:g} ms")
    verdict = "fits" if candidate.fits else "; ".join(candidate.why_not)
    progress(f"candidate {candidate.label}: {candidate.model_bytes:,} B, {candidate.latency_ms:.3f} ms, "
             f"drop {candidate.drop_points:.2f} pt: {verdict}")


# Showing the table -----------------------------------------------------------------------

TABLE_WIDTH = 160
COLUMNS = ("candidate", "I/O", "size", "deflated", "latency", "accuracy", "drop", "zeros", "fits?")


def rows(search_doc: dict[str, Any]) -> list[tuple[str, ...]]:
    """The table as text cells, one row per candidate (pure, for tests and any console)."""
    out = []
    for c in search_doc.get("candidates", []):
        def num(value, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)
        accuracy = "-" if c["accuracy"] is None else f"{c['accuracy']:.2%}"
        drop = "-" if c["drop_points"] is None else (f"{c['drop_points']:.2f} pt"
                                                     + (" (disagree)" if c["drop_measure"] == "disagreement" else ""))
        fits = ("CHOSEN" if c["chosen"] else "yes") if c["fits"] else "no: " + "; ".join(c["why_not"])
        sparsity = "-" if c["sparsity"] is None else f"{c['sparsity']:.0%}" + (" sparse" if c["sparse_weights"] else "")
        io = c["input_type"] if c["input_type"] == c["output_type"] else f"{c['input_type']}/{c['output_type']}"
        out.append((c["label"], io or "-",
                    num(c["model_bytes"], ","), num(c["deflate_bytes"], ","),
                    "-" if c["latency_ms"] is None else f"{c['latency_ms']:.3f} ms", accuracy, drop, sparsity, fits))
    return out


def render(search_doc: dict[str, Any], console) -> None:
    """The table of candidates on a rich console."""
    from rich.table import Table
    goal = "smallest" if search_doc["goal"] == "size" else "fastest"
    reference = search_doc.get("source_accuracy")
    title = (f"--search for {search_doc['profile']}: {goal} candidate within {search_doc['max_accuracy_drop']:g} pt "
             f"of the source" + (f" ({reference:.2%})" if reference is not None else "")
             + f" on {search_doc['data']}")
    table = Table(title=title, title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("size", "deflated", "latency", "accuracy", "drop",
                                                                "zeros") else "left",
                         overflow="fold")
    for row in rows(search_doc):
        style = "bold green" if row[-1] == "CHOSEN" else ("" if row[-1] == "yes" else "dim")
        table.add_row(*row, style=style)
    if not console.is_terminal and console.width < TABLE_WIDTH:
        # A pipe gets rich's 80 columns, which folds every cell; a terminal keeps its own width.
        from rich.console import Console
        console = Console(file=console.file, width=TABLE_WIDTH, highlight=False)
    console.print(table)
    console.print(f"sizes in bytes; deflated = zlib level 9; latency: {search_doc['latency']}", style="dim")
