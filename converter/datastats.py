"""The data profile a bundle carries: what the model saw at conversion, for drift on devices.

Inputs are profiled from the calibration data as the caller of the inference API sends it
(real, float values); outputs are the *converted* model's, run with ai-edge-litert on that
data and dequantized, because that is the model the device runs and whose outputs it bins.
The binning and the PSI are agent.protocol.datastats's, so the device bins exactly as this
module does. docs/quality.md explains the measure.
"""

from __future__ import annotations

import numpy as np

from agent.protocol import datastats
from agent.protocol.datastats import BINS, ChannelProfile, DataProfile, InputProfile, OutputProfile

from . import runtimes
from .errors import DataError

DECILES = np.linspace(0.0, 1.0, BINS + 1)


def histogram(values: np.ndarray) -> tuple[list[float], list[float]]:
    """(edges, fractions) of ``values``: the deciles as edges, shares binned as a device bins them."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    edges = [float(e) for e in np.quantile(flat, DECILES)]
    counts = np.bincount(np.searchsorted(np.asarray(edges[1:-1]), flat, side="right"), minlength=BINS)
    return edges, [float(c) / flat.size for c in counts]


def channels(x: np.ndarray) -> list[np.ndarray]:
    """The samples' values per profiled channel (see :func:`agent.protocol.datastats.channel_count`)."""
    count = datastats.channel_count((1, *x.shape[1:]))
    if count == 1:
        return [x.ravel()]
    return [x[..., c].ravel() for c in range(count)]


def input_profile(name: str, x: np.ndarray) -> InputProfile:
    """Mean, std and decile histogram of each channel of the samples ``x`` (batch first)."""
    found = []
    for values in channels(np.asarray(x, dtype=np.float64)):
        edges, shares = histogram(values)
        found.append(ChannelProfile(mean=float(values.mean()), std=float(values.std()),
                                    edges=tuple(edges), fractions=tuple(shares)))
    return InputProfile(name, tuple(found))


def output_profile(name: str, shape: list[int], y: np.ndarray) -> OutputProfile:
    """Class shares and mean top-1 confidence of a [1, C] output; a score histogram otherwise."""
    y = np.asarray(y, dtype=np.float64)
    if datastats.is_classes(shape):
        rows = y.reshape(len(y), -1)
        classes = rows.shape[1]
        winners = rows.argmax(axis=1)
        shares = np.bincount(winners, minlength=classes) / len(rows)
        confidence = [datastats.top1(list(row))[1] for row in rows]
        return OutputProfile(name, "classes", tuple(float(s) for s in shares),
                             mean_top1=float(np.mean(confidence)))
    edges, shares = histogram(y)
    return OutputProfile(name, "scores", tuple(shares), edges=tuple(edges))


def model_outputs(model: bytes, x: np.ndarray, threads: int = 1) -> tuple[list[dict], list[np.ndarray]]:
    """(output details, dequantized outputs per sample) of a .tflite model on float samples."""
    interp = runtimes.litert_interpreter(model, threads)
    detail = interp.get_input_details()[0]
    raw = runtimes.invoke_each(interp, runtimes.quantize_input(x, detail))
    outputs = interp.get_output_details()
    return outputs, [runtimes.dequantize(r, d) for r, d in zip(raw, outputs)]


def profile(model: bytes, x: np.ndarray, *, threads: int = 1) -> DataProfile:
    """The data profile of ``model`` on the float samples ``x`` (its first input, batch first).

    ``model`` must run on the CPU (for the Edge TPU, profile the CPU model it was compiled from).
    """
    x = np.asarray(x, dtype=np.float32)
    if len(x) < 2:
        raise DataError(f"a data profile needs at least 2 samples, got {len(x)}")
    if not np.all(np.isfinite(x)):
        raise DataError("the data holds NaN or infinite values; a data profile needs finite inputs")
    interp = runtimes.litert_interpreter(model, threads)
    input_name = interp.get_input_details()[0]["name"]
    details, outputs = model_outputs(model, x, threads)
    return DataProfile(
        samples=len(x),
        inputs=(input_profile(input_name, x),),
        outputs=tuple(output_profile(d["name"], [int(s) for s in d["shape"]], y) for d, y in zip(details, outputs)),
    )


def input_psi(reference: DataProfile, x: np.ndarray) -> float:
    """Mean PSI over the first input's channels of samples ``x`` against ``reference``."""
    found = reference.inputs[0].channels
    values = channels(np.asarray(x, dtype=np.float64))
    return float(np.mean([c.psi(datastats.bin_counts(c.edges, v.tolist())) for c, v in zip(found, values)]))


def output_psi(reference: DataProfile, outputs: list[np.ndarray]) -> float:
    """Largest PSI over the outputs of a batch against ``reference`` (class shares or scores)."""
    psis = []
    for ref, y in zip(reference.outputs, outputs):
        if ref.kind == "classes":
            winners = np.asarray(y).reshape(len(y), -1).argmax(axis=1)
            psis.append(ref.psi(np.bincount(winners, minlength=len(ref.fractions)).tolist()))
        else:
            psis.append(ref.psi(datastats.bin_counts(ref.edges or (), np.asarray(y).ravel().tolist())))
    return max(psis) if psis else 0.0


def drift(reference: DataProfile, model: bytes, x: np.ndarray) -> dict[str, float]:
    """The drift score of a batch as a device computes it: inputs, outputs and their max."""
    _, outputs = model_outputs(model, np.asarray(x, dtype=np.float32))
    inputs = input_psi(reference, x)
    out = output_psi(reference, outputs)
    return {"inputs": inputs, "outputs": out, "score": datastats.drift_score([inputs], out)}
