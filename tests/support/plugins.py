"""Build the test delegate plugin (tests/plugins/test_delegate.c) and profiles that point at it.

The plugin stands in for accelerator hardware (Edge TPU, GPU) that cannot exist on the test
machine: it is a real shared library that the real interpreter loads through the external
delegate interface. See the C file for its modes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from agent.protocol.profiles import Profile, load_profile_file

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "plugins" / "test_delegate.c"
PROFILES = ROOT / "firmware_profiles"


def build_plugin(gcc: str, out_dir: Path, name: str = "libtestdelegate.so", default_mode: str | None = None) -> Path:
    """Compile the plugin into ``out_dir``; ``default_mode`` is baked in with -DLF_DEFAULT_MODE."""
    out = Path(out_dir) / name
    cmd = [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(out), str(SOURCE)]
    if default_mode:
        cmd.insert(1, f'-DLF_DEFAULT_MODE="{default_mode}"')
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building {SOURCE.name} failed:\n{result.stderr}")
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def accelerator_profile(tmp_dir: Path, *, base: str = "coral-usb-edgetpu", library: str,
                        options: dict[str, Any] | None = None, requires_compiled_model: bool | None = None,
                        threads: int | None = None, allowed: list[str] | None = None) -> Profile:
    """A copy of a real profile whose first (accelerator) delegate loads ``library``.

    The rest of the profile is the real one; the file is written to ``tmp_dir`` and loaded with
    the normal profile loader, so it is validated like any other.
    """
    text = (PROFILES / f"{base}.toml").read_text()
    lines = text.splitlines()
    out: list[str] = []
    in_first_delegate = False
    seen_delegate = False
    for line in lines:
        stripped = line.strip()
        if stripped == "[[delegates]]":
            in_first_delegate = not seen_delegate
            seen_delegate = True
        elif stripped.startswith("["):
            in_first_delegate = False
        if in_first_delegate:
            key = stripped.split("=", 1)[0].strip()
            if key == "library":
                line = f"library = {_toml_value(library)}"
            elif key == "options" and options is not None:
                line = "options = { " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in options.items()) + " }"
            elif key == "requires_compiled_model" and requires_compiled_model is not None:
                line = f"requires_compiled_model = {_toml_value(requires_compiled_model)}"
        if threads is not None and stripped.startswith("threads ="):
            line = f"threads = {threads}"
        if allowed is not None and stripped.startswith("allowed ="):
            line = "allowed = [" + ", ".join(_toml_value(a) for a in allowed) + "]"
        out.append(line)
    path = Path(tmp_dir) / f"{base}.toml"
    path.write_text("\n".join(out) + "\n")
    return load_profile_file(path)
