"""The TFLite runtime shim: one place that knows which interpreter package is installed.

Preference order: ai-edge-litert (the maintained one, fastest here), tflite-runtime (older
devices), then ``tensorflow.lite`` as a last resort. tensorflow is imported lazily through
importlib, never at module level, because a device installs ``litefleet[device]`` without it.
A profile's ``runtime.allowed`` list restricts the choice.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import RuntimeUnavailableError

# name -> (module to test for, module holding Interpreter and load_delegate, distribution names)
_CANDIDATES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ai-edge-litert": ("ai_edge_litert", "ai_edge_litert.interpreter", ("ai-edge-litert", "ai-edge-litert-nightly")),
    "tflite-runtime": ("tflite_runtime", "tflite_runtime.interpreter", ("tflite-runtime", "tflite-runtime-nightly")),
    "tensorflow": ("tensorflow", "tensorflow.lite.python.interpreter", ("tensorflow", "tensorflow-cpu", "tf-nightly")),
}
PREFERENCE = tuple(_CANDIDATES)
_INSTALL_HINT = "install one with: pip install 'litefleet[device]' (ai-edge-litert) or pip install tflite-runtime"


@dataclass(frozen=True)
class Runtime:
    """An importable TFLite runtime: its name, version, Interpreter class and load_delegate."""

    name: str                 # "ai-edge-litert" | "tflite-runtime" | "tensorflow"
    version: str
    interpreter_class: type
    load_delegate: Callable[..., Any]


_cache: dict[str, Runtime] = {}
_failures: dict[str, str] = {}
_lock = threading.Lock()


def available_runtimes() -> list[str]:
    """The runtimes whose package is installed, in preference order (nothing is imported)."""
    found = []
    for name, (probe, _, _) in _CANDIDATES.items():
        try:
            if importlib.util.find_spec(probe) is not None:
                found.append(name)
        except (ImportError, ValueError):
            continue
    return found


def _version(name: str, module: Any) -> str:
    for dist in _CANDIDATES[name][2]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    top = importlib.import_module(_CANDIDATES[name][0])
    return str(getattr(top, "__version__", getattr(module, "__version__", "unknown")))


def _import(name: str) -> Runtime:
    """Import one runtime (cached); raise ImportError with the reason when it will not load."""
    with _lock:
        if name in _cache:
            return _cache[name]
        module = importlib.import_module(_CANDIDATES[name][1])
        runtime = Runtime(name=name, version=_version(name, module),
                          interpreter_class=module.Interpreter, load_delegate=module.load_delegate)
        _cache[name] = runtime
        return runtime


def select_runtime(allowed: Sequence[str] | None = None) -> Runtime:
    """The most preferred runtime that imports and is in ``allowed`` (all when None).

    Raises RuntimeUnavailableError naming each candidate and why it could not be used.
    """
    if allowed is not None:
        unknown = [a for a in allowed if a not in _CANDIDATES]
        if unknown:
            raise RuntimeUnavailableError(f"unknown runtime {unknown[0]!r} in runtime.allowed; "
                                          f"known runtimes: {', '.join(PREFERENCE)}")
    order = [n for n in PREFERENCE if allowed is None or n in allowed]
    reasons = []
    for name in order:
        try:
            return _import(name)
        except Exception as exc:  # noqa: BLE001 - a broken install (e.g. numpy ABI) must not stop the search
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _failures[name] = reason
            reasons.append(f"{name} ({reason})")
    skipped = [n for n in PREFERENCE if n not in order]
    detail = "; ".join(reasons) if reasons else "none allowed"
    extra = f"; not allowed by the profile: {', '.join(skipped)}" if skipped else ""
    raise RuntimeUnavailableError(f"no TFLite runtime can be imported: {detail}{extra}; {_INSTALL_HINT}")
