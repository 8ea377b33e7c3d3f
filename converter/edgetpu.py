"""Compile a full-int8 model for the Edge TPU with Google's ``edgetpu_compiler``.

The compiler only exists for x86-64 Linux hosts and may simply not be installed. Without it
the operator can still ship the int8 model (``--skip-edgetpu-compile``): the device's delegate
chain then runs it on the CPU with XNNPACK, and the manifest says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError

COMPILER = "edgetpu_compiler"
NOT_COMPILED_NOTE = "not compiled for the Edge TPU: will run on the CPU (XNNPACK)"
_ON_TPU = re.compile(r"Number of operations that will run on Edge TPU:\s*(\d+)")
_ON_CPU = re.compile(r"Number of operations that will run on CPU:\s*(\d+)")
_TOTAL = re.compile(r"Total number of operations:\s*(\d+)")


@dataclass
class EdgeTpuResult:
    """The model to bundle and what the compiler did with it."""

    tflite: bytes
    compiled: bool
    ops_mapped: int | None
    ops_total: int | None
    note: str


def parse_summary(text: str) -> tuple[int | None, int | None]:
    """(ops mapped to the Edge TPU, total ops) from the compiler's summary or operation log.

    The compiler prints "Number of operations that will run on Edge TPU: N" and "... on CPU: M"
    (with -s), and "Total number of operations: T"; the total is T, else N + M.
    """
    tpu, cpu, total = _ON_TPU.search(text), _ON_CPU.search(text), _TOTAL.search(text)
    mapped = int(tpu.group(1)) if tpu else None
    if total:
        return mapped, int(total.group(1))
    if tpu and cpu:
        return mapped, int(tpu.group(1)) + int(cpu.group(1))
    return mapped, None


def compile_for_edgetpu(tflite: bytes, *, skip: bool, progress: Callable[[str], None],
                        compiler: str = COMPILER, timeout: float = 600) -> EdgeTpuResult:
    """Run ``edgetpu_compiler -s -o DIR model.tflite`` when it is on PATH.

    ``skip`` ships the model uncompiled (CPU). Not on PATH and not ``skip`` -> ConversionError.
    """
    if skip:
        progress(f"skipping Edge TPU compilation: {NOT_COMPILED_NOTE}")
        return EdgeTpuResult(tflite=tflite, compiled=False, ops_mapped=None, ops_total=None, note=NOT_COMPILED_NOTE)
    exe = shutil.which(compiler)
    if exe is None:
        raise ConversionError(f"{compiler} is not on PATH: install the Edge TPU compiler "
                              "(https://coral.ai/docs/edgetpu/compiler/, x86-64 Linux only) or pass "
                              "--skip-edgetpu-compile to bundle the model for the CPU")
    with tempfile.TemporaryDirectory(prefix="litefleet-edgetpu-") as tmp:
        work = Path(tmp)
        model = work / "model.tflite"
        out_dir = work / "out"
        out_dir.mkdir()
        model.write_bytes(tflite)
        progress(f"compiling for the Edge TPU with {exe}")
        try:
            proc = subprocess.run([exe, "-s", "-o", str(out_dir), str(model)], capture_output=True, text=True,
                                  timeout=timeout, cwd=work)
        except subprocess.TimeoutExpired:
            raise ConversionError(f"{compiler} did not finish within {timeout:.0f} s") from None
        except OSError as exc:
            raise ConversionError(f"{compiler} ({exe}) could not be run: {exc.strerror or exc}") from None
        output = (proc.stdout or "") + "\n" + (proc.stderr or "")
        if proc.returncode != 0:
            tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
            raise ConversionError(f"{compiler} failed with exit status {proc.returncode}: {tail or 'no output'}")
        compiled = out_dir / "model_edgetpu.tflite"
        if not compiled.is_file():
            raise ConversionError(f"{compiler} reported success but wrote no {compiled.name} in its output directory")
        log = out_dir / "model_edgetpu.log"
        if log.is_file():
            output += "\n" + log.read_text(errors="replace")
        mapped, total = parse_summary(output)
        data = compiled.read_bytes()
    if mapped is None:
        note = "compiled for the Edge TPU; the compiler did not say how many ops it mapped"
    elif mapped == 0:
        note = "compiled, but no op maps to the Edge TPU: the whole model will run on the CPU"
    elif total is not None and mapped < total:
        note = f"{mapped} of {total} ops run on the Edge TPU, {total - mapped} on the CPU"
    else:
        note = f"all {mapped} ops run on the Edge TPU"
    progress(f"Edge TPU compilation: {note}")
    return EdgeTpuResult(tflite=data, compiled=True, ops_mapped=mapped, ops_total=total, note=note)
