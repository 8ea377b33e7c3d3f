"""The data profile: what a model saw at conversion, so a device can tell when its data drifts.

The converter records, in the signed manifest, compact statistics of the calibration data
(per input channel: mean, std and a 10-bin histogram whose edges are the data's deciles) and
of the model's outputs on it (class shares or a score histogram). The agent bins the inputs
and outputs it really sees with the *same* edges and compares the two distributions with the
population stability index. Both sides share the binning and the PSI here, so a device and
the host can never disagree on what a bin is. Standard library only: this runs on devices.

Values are in real (dequantized, float) space, as the inference API's caller sends and
receives them. docs/quality.md explains the measure and how to read it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SchemaError
from .schema import Field, non_negative, positive, validate

VERSION = 1
BINS = 10
MAX_CHANNELS = 32          # a last axis longer than this is not channels (it is features or pixels)
PSI_FLOOR = 1e-4           # both shares are floored at this so an empty bin does not give infinity
SUM_TOLERANCE = 1e-3       # a profile's fractions must sum to 1 within this
# A class row in [0, 1] summing to 1 within this is already probabilities: a quantized softmax
# (uint8/int8 steps of 1/256) misses 1 by up to about C/512, far more than float rounding.
PROBABILITY_TOLERANCE = 0.05

# Conventional reading of the population stability index.
PSI_STABLE = 0.1
PSI_MAJOR = 0.25

KINDS = ("classes", "scores")
_NONE = type(None)


def _finite(value: float) -> str | None:
    return None if math.isfinite(value) else f"must be a finite number, got {value}"


def _top1(value: float | None) -> str | None:
    if value is None or 0.0 <= value <= 1.0:
        return None
    return f"must be between 0 and 1, got {value}"


def _finite_list(values: list[float] | None) -> str | None:
    if values is None:
        return None
    bad = [v for v in values if not math.isfinite(v)]
    return f"must hold finite numbers, got {bad[0]}" if bad else None


CHANNEL = {
    "mean": Field(float, check=_finite),
    "std": Field(float, check=non_negative),
    "edges": Field(list, items=Field(float), check=_finite_list,
                   doc="11 edges: min, the 9 inner deciles, max; the first and last bins are open-ended"),
    "fractions": Field(list, items=Field(float, check=non_negative), doc="10 shares summing to 1"),
}

INPUT = {
    "name": Field(str),
    "channels": Field(list, items=Field(dict, table=CHANNEL)),
}

OUTPUT = {
    "name": Field(str),
    "kind": Field(str, choices=KINDS),
    "fractions": Field(list, items=Field(float, check=non_negative)),
    "mean_top1": Field((float, _NONE), required=False, check=_top1, doc="classes only"),
    "edges": Field((list, _NONE), required=False, items=Field(float), check=_finite_list, doc="scores only"),
}

SCHEMA: dict[str, Field] = {
    "version": Field(int, choices=(VERSION,)),
    "samples": Field(int, check=positive),
    "inputs": Field(list, items=Field(dict, table=INPUT)),
    "outputs": Field(list, items=Field(dict, table=OUTPUT)),
}


# Pure helpers shared by the converter and the agent ---------------------------------------

def channel_count(shape: Sequence[int]) -> int:
    """How many channels a tensor of ``shape`` is profiled as: its last axis if short, else 1."""
    if len(shape) >= 2 and 1 <= shape[-1] <= MAX_CHANNELS:
        return int(shape[-1])
    return 1


def is_classes(shape: Sequence[int]) -> bool:
    """An output of shape [1, C] with C >= 2 is a class vector; anything else is scores."""
    return len(shape) == 2 and shape[0] == 1 and shape[1] >= 2


def bin_index(edges: Sequence[float], value: float) -> int:
    """The bin of ``value``: below edges[1] is bin 0, at or above edges[9] is bin 9.

    Only the inner edges decide, so values outside the calibration range still land in the
    first or last bin. NaN lands in the last bin.
    """
    return bisect.bisect_right(edges, value, 1, len(edges) - 1) - 1


def bin_counts(edges: Sequence[float], values: Iterable[float]) -> list[int]:
    """Counts per bin of ``values`` binned with ``edges`` (see :func:`bin_index`)."""
    counts = [0] * (len(edges) - 1)
    inner = list(edges[1:-1])
    for value in values:
        counts[bisect.bisect_right(inner, value)] += 1
    return counts


def fractions(counts: Sequence[int]) -> list[float]:
    """Counts as shares of their total."""
    total = sum(counts)
    if total <= 0:
        raise ValueError("cannot turn counts into fractions: no samples were counted")
    return [c / total for c in counts]


def psi(expected: Sequence[float], observed_counts: Sequence[int]) -> float:
    """Population stability index of observed counts against expected shares.

    sum((o - e) * ln(o / e)) over the bins, with both shares floored at :data:`PSI_FLOOR`.
    Reading: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift.
    """
    if len(expected) != len(observed_counts):
        raise ValueError(f"psi needs as many observed bins as expected ones: "
                         f"got {len(observed_counts)} observed and {len(expected)} expected")
    observed = fractions(observed_counts)
    total = 0.0
    for e, o in zip(expected, observed):
        e, o = max(e, PSI_FLOOR), max(o, PSI_FLOOR)
        total += (o - e) * math.log(o / e)
    return total


def softmax(row: Sequence[float]) -> list[float]:
    """Softmax of a row, stable for large logits."""
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [v / total for v in exps]


def top1(row: Sequence[float]) -> tuple[int, float]:
    """(argmax, confidence) of a class row; the row is soft-maxed unless it is already probabilities.

    A row is probabilities when every value is in [0, 1] and they sum to 1 within
    :data:`PROBABILITY_TOLERANCE` (a dequantized int8 softmax does not sum to exactly 1).
    """
    index = max(range(len(row)), key=row.__getitem__)
    if min(row) >= 0.0 and max(row) <= 1.0 and abs(sum(row) - 1.0) <= PROBABILITY_TOLERANCE:
        return index, float(row[index])
    return index, float(softmax(row)[index])


def drift_score(input_psis: Sequence[float], output_psi: float | None) -> float:
    """The drift score a device reports: max(mean PSI over input channels, output PSI)."""
    mean_in = sum(input_psis) / len(input_psis) if input_psis else 0.0
    return max(mean_in, output_psi if output_psi is not None else 0.0)


def reading(score: float) -> str:
    """The conventional reading of a PSI value: 'stable', 'moderate' or 'major'."""
    if score < PSI_STABLE:
        return "stable"
    return "moderate" if score <= PSI_MAJOR else "major"


# The profile -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ChannelProfile:
    """One input channel: its mean and std and its decile histogram."""

    mean: float
    std: float
    edges: tuple[float, ...]
    fractions: tuple[float, ...]

    def counts(self, values: Iterable[float]) -> list[int]:
        return bin_counts(self.edges, values)

    def psi(self, counts: Sequence[int]) -> float:
        return psi(self.fractions, counts)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "edges": list(self.edges), "fractions": list(self.fractions)}


@dataclass(frozen=True)
class InputProfile:
    name: str
    channels: tuple[ChannelProfile, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "channels": [c.to_dict() for c in self.channels]}


@dataclass(frozen=True)
class OutputProfile:
    """One output: class shares (kind 'classes') or a score histogram (kind 'scores')."""

    name: str
    kind: str
    fractions: tuple[float, ...]
    mean_top1: float | None = None
    edges: tuple[float, ...] | None = None

    def psi(self, counts: Sequence[int]) -> float:
        return psi(self.fractions, counts)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "kind": self.kind, "fractions": list(self.fractions)}
        if self.kind == "classes":
            doc["mean_top1"] = self.mean_top1
        else:
            doc["edges"] = list(self.edges or ())
        return doc


@dataclass(frozen=True)
class DataProfile:
    """The manifest's ``data_profile``: calibration inputs and the model's outputs on them."""

    samples: int
    inputs: tuple[InputProfile, ...]
    outputs: tuple[OutputProfile, ...]
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "samples": self.samples,
                "inputs": [i.to_dict() for i in self.inputs], "outputs": [o.to_dict() for o in self.outputs]}

    @classmethod
    def from_dict(cls, doc: Any, source: str = "data_profile") -> "DataProfile":
        """Validate ``doc`` strictly; raise :class:`SchemaError` naming the field that is wrong."""
        checked = validate(doc, SCHEMA, source)
        found = _problem(checked)
        if found:
            raise SchemaError(source, *found)
        inputs = tuple(
            InputProfile(i["name"], tuple(ChannelProfile(c["mean"], c["std"], tuple(c["edges"]), tuple(c["fractions"]))
                                          for c in i["channels"]))
            for i in checked["inputs"])
        outputs = tuple(
            OutputProfile(o["name"], o["kind"], tuple(o["fractions"]), o.get("mean_top1"),
                          tuple(o["edges"]) if o.get("edges") is not None else None)
            for o in checked["outputs"])
        return cls(samples=checked["samples"], inputs=inputs, outputs=outputs, version=checked["version"])


def check(doc: dict[str, Any]) -> str | None:
    """Schema ``check`` for a data profile table already validated against :data:`SCHEMA`."""
    if doc is None:
        return None
    found = _problem(doc)
    return f"{found[0]}: {found[1]}" if found else None


def _problem(doc: dict[str, Any]) -> tuple[str, str] | None:
    """(field path, problem) of the first inconsistency the type schema cannot see."""
    for i, inp in enumerate(doc["inputs"]):
        if not inp["channels"]:
            return f"inputs[{i}].channels", "must list at least one channel"
        if len(inp["channels"]) > MAX_CHANNELS:
            return f"inputs[{i}].channels", f"lists {len(inp['channels'])} channels, at most {MAX_CHANNELS} are profiled"
        for j, ch in enumerate(inp["channels"]):
            found = _histogram(ch.get("edges"), ch["fractions"])
            if found:
                return f"inputs[{i}].channels[{j}].{found[0]}", found[1]
    for i, out in enumerate(doc["outputs"]):
        where = f"outputs[{i}]"
        if out["kind"] == "classes":
            if out.get("edges") is not None:
                return f"{where}.edges", "a 'classes' output has class fractions, not edges"
            if out.get("mean_top1") is None:
                return f"{where}.mean_top1", "required for a 'classes' output"
            if len(out["fractions"]) < 2:
                return f"{where}.fractions", "a 'classes' output needs at least 2 classes"
            found = _sums_to_one(out["fractions"])
            if found:
                return f"{where}.fractions", found
        else:
            if out.get("mean_top1") is not None:
                return f"{where}.mean_top1", "only a 'classes' output has a top-1 confidence"
            if out.get("edges") is None:
                return f"{where}.edges", "required for a 'scores' output"
            found = _histogram(out["edges"], out["fractions"])
            if found:
                return f"{where}.{found[0]}", found[1]
    return None


def _histogram(edges: list[float] | None, shares: list[float]) -> tuple[str, str] | None:
    if edges is None or len(edges) != BINS + 1:
        return "edges", f"must list {BINS + 1} edges (min, 9 deciles, max), got {0 if edges is None else len(edges)}"
    if any(b < a for a, b in zip(edges, edges[1:])):
        return "edges", "must not decrease"
    if len(shares) != BINS:
        return "fractions", f"must list {BINS} shares, got {len(shares)}"
    found = _sums_to_one(shares)
    return ("fractions", found) if found else None


def _sums_to_one(shares: list[float]) -> str | None:
    total = sum(shares)
    return None if abs(total - 1.0) <= SUM_TOLERANCE else f"must sum to 1, got {total:.6f}"


__all__ = ["VERSION", "BINS", "MAX_CHANNELS", "PSI_FLOOR", "SCHEMA", "ChannelProfile", "InputProfile",
           "OutputProfile", "DataProfile", "channel_count", "is_classes", "bin_index", "bin_counts",
           "fractions", "psi", "softmax", "top1", "drift_score", "reading", "check"]
