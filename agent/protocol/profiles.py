"""Device profiles: one TOML file per kind of device, validated strictly.

A profile tells the converter how to quantize and what to check, and tells the agent which
runtime, delegates and threads to use. Errors name the file and the field; an unknown key
is an error (with the closest known key), never a silent default.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ProfileError, SchemaError
from .schema import Field, non_empty, one_of_each, positive, validate

SCHEMA_VERSION = 1
RUNTIMES = ("ai-edge-litert", "tflite-runtime", "tensorflow")
DELEGATE_KINDS = ("edgetpu", "gpu", "external", "xnnpack")
ARCHITECTURES = ("aarch64", "armv7l", "x86_64")
IO_TYPES = ("float32", "int8", "uint8", "int16")
_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")
_PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def _version(value: str) -> str | None:
    return None if _VERSION.match(value) else f"must look like 2.14 or 2.14.0, got {value!r}"


def _op_names(value: list[str]) -> str | None:
    bad = [op for op in value if not re.match(r"^[A-Z0-9_]+$", op)]
    return f"op names are TFLite builtin names in capitals (CONV_2D), got {bad[0]!r}" if bad else None


DELEGATE_SCHEMA = {
    "kind": Field(str, choices=DELEGATE_KINDS),
    "library": Field(str, required=False, default=""),
    "options": Field(dict, required=False, default={}, open_table=True),
    "requires_compiled_model": Field(bool, required=False, default=False,
                                     doc="only use this delegate for a model compiled for it (Edge TPU)"),
}

SCHEMA: dict[str, Field] = {
    "schema_version": Field(int, choices=(SCHEMA_VERSION,)),
    "name": Field(str),
    "description": Field(str),
    "hardware": Field(dict, table={
        "architecture": Field(str, choices=ARCHITECTURES),
        "cores": Field(int, check=positive),
        "ram_mb": Field(int, check=positive),
        "device_nodes": Field(list, required=False, default=[], items=Field(str)),
        "max_temperature_c": Field(float, required=False, default=85.0, check=positive),
    }),
    "runtime": Field(dict, table={
        "allowed": Field(list, items=Field(str, choices=RUNTIMES), check=lambda v: non_empty(v) or one_of_each(v)),
        "min_version": Field(str, check=_version),
        "threads": Field(int, check=positive),
    }),
    "quantization": Field(dict, table={
        "mode": Field(str, choices=("float32", "float16", "dynamic", "int8", "int16x8")),
        "input_type": Field(str, choices=IO_TYPES),
        "output_type": Field(str, choices=IO_TYPES),
        "calibration_samples": Field(int, required=False, default=200, check=positive),
    }),
    "delegates": Field(list, items=Field(dict, table=DELEGATE_SCHEMA), check=non_empty),
    "accelerator": Field(dict, table={
        "kind": Field(str, choices=("none", "edgetpu", "gpu")),
        "supported_ops": Field(list, required=False, default=[], items=Field(str), check=_op_names),
        "compiler": Field(str, required=False, default=""),
    }),
    "budgets": Field(dict, table={
        "max_model_bytes": Field(int, check=positive),
        "max_memory_bytes": Field(int, check=positive),
        "max_accuracy_drop": Field(float, check=lambda v: None if 0 <= v <= 100 else "must be between 0 and 100 points"),
        "max_latency_ms": Field(float, required=False, default=0.0,
                                doc="host-measured latency bound; 0 means not checked"),
    }),
}


@dataclass(frozen=True)
class Delegate:
    """One step of the delegate chain."""

    kind: str
    library: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    requires_compiled_model: bool = False


@dataclass(frozen=True)
class Profile:
    """A validated device profile."""

    name: str
    description: str
    path: str
    hardware: dict[str, Any]
    runtime: dict[str, Any]
    quantization: dict[str, Any]
    delegates: tuple[Delegate, ...]
    accelerator: dict[str, Any]
    budgets: dict[str, Any]
    doc: dict[str, Any]

    @property
    def threads(self) -> int:
        return int(self.runtime["threads"])

    @property
    def mode(self) -> str:
        return self.quantization["mode"]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.doc)


def parse_profile(text: str, source: str, expected_name: str | None = None) -> Profile:
    """Validate one profile's TOML text; ``source`` names it in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: not valid TOML ({exc})") from None
    try:
        doc = validate(raw, SCHEMA, source)
        _check_consistency(doc, source, expected_name)
    except SchemaError as exc:
        raise ProfileError(str(exc)) from None
    return Profile(
        name=doc["name"], description=doc["description"], path=source,
        hardware=doc["hardware"], runtime=doc["runtime"], quantization=doc["quantization"],
        delegates=tuple(Delegate(**d) for d in doc["delegates"]),
        accelerator=doc["accelerator"], budgets=doc["budgets"], doc=doc,
    )


def _check_consistency(doc: dict[str, Any], source: str, expected_name: str | None) -> None:
    name = doc["name"]
    if not _PROFILE_NAME.match(name):
        raise SchemaError(source, "name", "must be lowercase letters, digits and '-'")
    if expected_name is not None and name != expected_name:
        raise SchemaError(source, "name", f"is {name!r} but the file is named {expected_name}.toml")
    delegates = doc["delegates"]
    kinds = [d["kind"] for d in delegates]
    if kinds[-1] != "xnnpack":
        raise SchemaError(source, "delegates", "the chain must end with kind = \"xnnpack\" so the device always has a CPU path")
    if kinds.count("xnnpack") > 1:
        raise SchemaError(source, "delegates", "lists xnnpack more than once")
    for i, d in enumerate(delegates):
        if d["kind"] in ("edgetpu", "gpu", "external") and not d["library"]:
            raise SchemaError(source, f"delegates[{i}].library", f"a {d['kind']} delegate needs the library to load")
    quant = doc["quantization"]
    mode = quant["mode"]
    integer_io = {"int8", "uint8"}
    if mode in ("float32", "float16", "dynamic") and (quant["input_type"], quant["output_type"]) != ("float32", "float32"):
        raise SchemaError(source, "quantization.input_type", f"mode {mode!r} takes float32 input and output")
    if mode == "int8" and not {quant["input_type"], quant["output_type"]} <= integer_io | {"float32"}:
        raise SchemaError(source, "quantization.input_type", "full int8 takes int8, uint8 or float32 input and output")
    if mode == "int16x8" and not {quant["input_type"], quant["output_type"]} <= {"int16", "float32"}:
        raise SchemaError(source, "quantization.input_type", "int16x8 takes int16 or float32 input and output")
    accel = doc["accelerator"]["kind"]
    if accel == "edgetpu":
        if mode != "int8":
            raise SchemaError(source, "quantization.mode", "the Edge TPU runs only full int8 models")
        if "edgetpu" not in kinds:
            raise SchemaError(source, "delegates", "an Edge TPU profile needs an edgetpu delegate")
    if accel != "none" and not doc["accelerator"]["supported_ops"]:
        raise SchemaError(source, "accelerator.supported_ops", f"list the ops the {accel} can run")


def default_profiles_dir() -> Path:
    """Where profiles live: $LITEFLEET_PROFILES_DIR, the source checkout, or the installed copy."""
    env = os.environ.get("LITEFLEET_PROFILES_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "firmware_profiles"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "litefleet" / "firmware_profiles"


def load_profile_file(path: str | os.PathLike[str]) -> Profile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{path}: profile file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read profile ({exc})") from None
    return parse_profile(text, str(path), expected_name=path.stem)


def available(directory: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the profiles in a directory."""
    directory = Path(directory) if directory else default_profiles_dir()
    return sorted(p.stem for p in directory.glob("*.toml"))


def load_profile(name: str, directory: str | os.PathLike[str] | None = None) -> Profile:
    """Load a profile by name (or by path, when ``name`` ends in .toml)."""
    if name.endswith(".toml"):
        return load_profile_file(name)
    directory = Path(directory) if directory else default_profiles_dir()
    path = directory / f"{name}.toml"
    if not path.is_file():
        import difflib
        names = available(directory)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ProfileError(f"unknown profile {name!r}: {hint}known profiles: {', '.join(names) or 'none'} (in {directory})")
    return load_profile_file(path)


def load_all(directory: str | os.PathLike[str] | None = None) -> list[Profile]:
    directory = Path(directory) if directory else default_profiles_dir()
    return [load_profile_file(directory / f"{n}.toml") for n in available(directory)]
