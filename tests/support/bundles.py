"""Build signed bundles for device-side tests without the converter.

The manifest is filled from the model itself (signature details read with a real interpreter,
the smoke test's expected output computed by running it), so what the agent sees is what the
converter would produce.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol import bundle as bundle_mod
from agent.protocol.manifest import DEFAULT_CHUNK_SIZE, FORMAT, FORMAT_VERSION, TensorData, model_section
from converter.pipeline import tensor_spec


def _interpreter(model: bytes):
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=model)
    interp.allocate_tensors()
    return interp


def tensor(array: np.ndarray) -> dict[str, Any]:
    return TensorData(array.dtype.name, tuple(array.shape), np.ascontiguousarray(array).tobytes()).to_dict()


def manifest_for(model: bytes, *, name: str = "digits", version: int = 1, profile: str = "x86-cpu",
                 sample: np.ndarray | None = None, expected: np.ndarray | None = None,
                 mode: str = "float32", chunk_size: int = DEFAULT_CHUNK_SIZE, atol: float | None = None,
                 accelerator: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    interp = _interpreter(model)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    if sample is None:
        rng = np.random.default_rng(version)
        if np.issubdtype(inp["dtype"], np.integer):
            info = np.iinfo(inp["dtype"])
            sample = rng.integers(info.min, info.max, size=inp["shape"], dtype=inp["dtype"])
        else:
            sample = rng.random(inp["shape"], dtype=np.float32).astype(inp["dtype"])
    if expected is None:
        interp.set_tensor(inp["index"], sample)
        interp.invoke()
        expected = interp.get_tensor(out["index"])
    is_int = np.issubdtype(out["dtype"], np.integer)
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "name": name, "version": version, "profile": profile,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "min_agent_version": "0.1.0",
        "producer": {"tool": "tests"},
        "model": model_section(model, chunk_size),
        "inputs": [tensor_spec(d) for d in interp.get_input_details()],
        "outputs": [tensor_spec(d) for d in interp.get_output_details()],
        "quantization": {"mode": mode, "input_type": np.dtype(inp["dtype"]).name,
                         "output_type": np.dtype(out["dtype"]).name, "calibration_samples": 0},
        "accelerator": accelerator or {"target": "cpu", "compiled": False},
        "estimates": {"arena_bytes": 1 << 20, "peak_memory_bytes": len(model) + (1 << 20)},
        "validation": {},
        "smoke_test": {"inputs": [tensor(sample)], "expected_outputs": [tensor(expected)],
                       "atol": float(atol if atol is not None else (2 if is_int else 1e-4))},
    }
    doc.update(extra)
    return doc


def make_bundle(path: Path, model: bytes, release_key, **manifest_args: Any) -> Path:
    """Write a signed bundle for ``model`` to ``path``."""
    doc = manifest_for(model, **manifest_args)
    return bundle_mod.write_bundle(path, bundle_mod.build(doc, model, release_key))
