"""Edge TPU compilation.

The real ``edgetpu_compiler`` cannot be installed here (no Coral apt repository, and it is a
closed x86-64 binary), so the PATH-present branch runs a small fake ``edgetpu_compiler`` shell
script placed on PATH by the test. It behaves like the real one where litefleet depends on it:
takes ``-s -o DIR model.tflite``, writes ``DIR/model_edgetpu.tflite`` and a ``.log``, and prints
the compiler's summary lines. Everything else (skip, not on PATH, failures) is the real code path.
"""

from __future__ import annotations

import os
import stat

import pytest

from converter.edgetpu import NOT_COMPILED_NOTE, compile_for_edgetpu, parse_summary
from converter.errors import ConversionError

SUMMARY = """Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 23 ms.

Input model: {model}
Input size: 31.02KiB
Output model: {out}/model_edgetpu.tflite
Output size: 64.28KiB
On-chip memory used for caching model parameters: 30.25KiB
On-chip memory remaining for caching model parameters: 7.73MiB
Off-chip memory used for streaming uncached model parameters: 0.00B
Number of Edge TPU subgraphs: 1
Total number of operations: 6
Operation log: {out}/model_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of the model \
will instead run on the CPU, which is slower. If possible, consider updating your model to use only operations \
supported by the Edge TPU. For details, visit g.co/coral/model-reqs.
Number of operations that will run on Edge TPU: 5
Number of operations that will run on CPU: 1
"""

FAKE = """#!/bin/sh
# Fake edgetpu_compiler for tests: edgetpu_compiler -s -o OUT MODEL
[ "$1" = "-s" ] && [ "$2" = "-o" ] || {{ echo "usage: edgetpu_compiler -s -o DIR model" >&2; exit 2; }}
out="$3"; model="$4"
{body}
"""

GOOD_BODY = """cp "$model" "$out/model_edgetpu.tflite"
printf 'Operator Count Status\\nCONV_2D 2 Mapped to Edge TPU\\n' > "$out/model_edgetpu.log"
cat <<SUMMARY_END
{summary}
SUMMARY_END
""".format(summary=SUMMARY.format(model="$model", out="$out"))


def _install_fake(tmp_path, monkeypatch, body: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "edgetpu_compiler"
    script.write_text(FAKE.format(body=body))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_compiler_on_path_is_run_and_its_summary_parsed(digits_tflite_int8, tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch, GOOD_BODY)
    messages: list[str] = []
    result = compile_for_edgetpu(digits_tflite_int8, skip=False, progress=messages.append)
    assert result.compiled is True
    assert result.tflite == digits_tflite_int8          # the fake copies the model through
    assert (result.ops_mapped, result.ops_total) == (5, 6)
    assert result.note == "5 of 6 ops run on the Edge TPU, 1 on the CPU"
    assert any("5 of 6" in m for m in messages)


def test_summary_without_total_adds_tpu_and_cpu_counts():
    text = "Number of operations that will run on Edge TPU: 7\nNumber of operations that will run on CPU: 2\n"
    assert parse_summary(text) == (7, 9)
    assert parse_summary("Compilation succeeded!") == (None, None)


def test_compiler_missing_from_path_names_the_skip_flag(digits_tflite_int8, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConversionError) as exc:
        compile_for_edgetpu(digits_tflite_int8, skip=False, progress=lambda _: None)
    assert "edgetpu_compiler is not on PATH" in str(exc.value)
    assert "--skip-edgetpu-compile" in str(exc.value)


def test_skip_bundles_for_the_cpu(digits_tflite_int8, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = compile_for_edgetpu(digits_tflite_int8, skip=True, progress=lambda _: None)
    assert result.compiled is False and result.tflite == digits_tflite_int8
    assert result.note == NOT_COMPILED_NOTE == "not compiled for the Edge TPU: will run on the CPU (XNNPACK)"


def test_compiler_failure_is_reported_with_its_output(digits_tflite_int8, tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch, 'echo "ERROR: Attempting to use a delegate that only supports '
                                         'static-sized tensors" >&2; exit 1')
    with pytest.raises(ConversionError, match="exit status 1: .*static-sized tensors"):
        compile_for_edgetpu(digits_tflite_int8, skip=False, progress=lambda _: None)
