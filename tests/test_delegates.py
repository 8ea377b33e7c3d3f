"""The delegate chain: each way an accelerator can fail falls back to XNNPACK, told apart.

No Edge TPU, GPU or libedgetpu exists on this machine. Every test here points the accelerator
delegate of a copy of a real profile at the test delegate plugin (tests/plugins/test_delegate.c,
a real shared library loaded by the real interpreter), which stands in for the hardware, or at
a library path that does not exist.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from agent import events as ev
from agent.engine import load_model, smoke_test
from agent.events import EventLog
from agent.protocol.manifest import Manifest
from agent.tflite_graph import EDGETPU_CUSTOM_OP, compiled_for_edgetpu, read_graph
from tests.support.bundles import manifest_for
from tests.support.plugins import accelerator_profile


@pytest.fixture(scope="module")
def int8_manifest(digits_tflite_int8) -> Manifest:
    return Manifest.from_dict(manifest_for(digits_tflite_int8, profile="coral-usb-edgetpu", mode="int8"))


@pytest.fixture(scope="module")
def cpu_outputs(digits_tflite_int8, digits):
    """Raw int8 outputs of a plain interpreter for 8 test images, and those images quantized."""
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=digits_tflite_int8)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    scale, zero = inp["quantization"]
    images = np.clip(np.round(digits[2][:8] / scale + zero), -128, 127).astype(np.int8)
    outputs = []
    for image in images:
        interp.set_tensor(inp["index"], image[None])
        interp.invoke()
        outputs.append(interp.get_tensor(out["index"]))
    return images, outputs


def _check_cpu_answers(loaded, cpu_outputs) -> None:
    images, outputs = cpu_outputs
    for image, want in zip(images, outputs):
        np.testing.assert_array_equal(loaded.predict_raw([image[None]])[0], want)


def test_missing_library_is_missing_and_falls_back_to_xnnpack(tmp_path, digits_tflite_int8, int8_manifest, cpu_outputs):
    """A profile naming a delegate library that is not installed still loads, on XNNPACK."""
    missing = str(tmp_path / "libedgetpu.so.1")
    profile = accelerator_profile(tmp_path, library=missing, requires_compiled_model=False)
    log = EventLog()
    loaded = load_model(digits_tflite_int8, int8_manifest, profile, events=log)
    first = loaded.report.attempts[0]
    assert (first.kind, first.library, first.outcome) == ("edgetpu", missing, "missing")
    assert missing in first.reason and "install" in first.reason
    assert loaded.report.delegate == "xnnpack"
    assert loaded.report.attempts[-1].outcome == "used"
    fallback = log.of(ev.DELEGATE_FALLBACK)
    assert len(fallback) == 1 and fallback[0].details["outcome"] == "missing"
    _check_cpu_answers(loaded, cpu_outputs)


def test_create_returning_null_is_no_device(tmp_path, delegate_plugin, digits_tflite_int8, int8_manifest, cpu_outputs):
    """A library that loads but finds no device (create returns NULL) -> no_device, with its message."""
    profile = accelerator_profile(tmp_path, library=str(delegate_plugin), requires_compiled_model=False,
                                  options={"device": "usb", "mode": "null"})
    log = EventLog()
    loaded = load_model(digits_tflite_int8, int8_manifest, profile, events=log)
    first = loaded.report.attempts[0]
    assert first.outcome == "no_device"
    assert "no accelerator device found" in first.reason and "/dev/bus/usb" in first.reason
    assert loaded.report.delegate == "xnnpack"
    assert log.kinds() == [ev.DELEGATE_FALLBACK]
    _check_cpu_answers(loaded, cpu_outputs)


def test_null_by_compile_time_define(tmp_path, gcc, digits_tflite_int8, int8_manifest):
    """The plugin variant built with -DLF_DEFAULT_MODE="null" fails the same way without options."""
    from tests.support.plugins import build_plugin
    plugin = build_plugin(gcc, tmp_path, name="libnull.so", default_mode="null")
    profile = accelerator_profile(tmp_path, library=str(plugin), requires_compiled_model=False)
    loaded = load_model(digits_tflite_int8, int8_manifest, profile)
    assert [a.outcome for a in loaded.report.attempts] == ["no_device", "used"]


def test_options_reach_the_plugin_and_it_is_used(tmp_path, delegate_plugin, digits_tflite_int8, int8_manifest, cpu_outputs):
    """The profile's delegate options are passed as strings; a delegate that works is used."""
    record = tmp_path / "options.txt"
    profile = accelerator_profile(tmp_path, library=str(delegate_plugin), requires_compiled_model=False,
                                  options={"device": "usb", "record_to": str(record), "queue_depth": 3})
    log = EventLog()
    loaded = load_model(digits_tflite_int8, int8_manifest, profile, workers=2, events=log)
    lines = record.read_text().splitlines()
    # one delegate per interpreter: the checked one plus the second worker's
    assert lines.count("device=usb") == 2 and lines.count("queue_depth=3") == 2
    assert f"record_to={record}" in lines
    report = loaded.report
    assert report.delegate == "edgetpu" and report.workers == 2
    assert [a.outcome for a in report.attempts] == ["used"]
    # this plugin claims no node: the report says so instead of pretending the graph is accelerated
    assert (report.delegated_nodes, report.total_nodes, report.full_graph) == (0, 7, False)
    assert "took 0 of 7 nodes" in report.attempts[0].reason
    assert log.events == []
    _check_cpu_answers(loaded, cpu_outputs)


def test_prepare_error_is_failed(tmp_path, delegate_plugin, digits_tflite_int8, int8_manifest):
    """Prepare returning an error makes the interpreter raise RuntimeError while applying the delegate
    (before any allocate or invoke): reported as "failed" (the delegate refused the graph)."""
    profile = accelerator_profile(tmp_path, library=str(delegate_plugin), requires_compiled_model=False,
                                  options={"mode": "prepare_error"})
    loaded = load_model(digits_tflite_int8, int8_manifest, profile)
    first = loaded.report.attempts[0]
    assert first.outcome == "failed" and "Prepare failed" in first.reason
    assert loaded.report.delegate == "xnnpack"


def test_error_at_first_invoke_is_invoke_failed(tmp_path, delegate_plugin, digits_tflite_int8, int8_manifest, cpu_outputs):
    """A delegate that takes the graph but fails when run -> invoke_failed, and the CPU serves."""
    profile = accelerator_profile(tmp_path, library=str(delegate_plugin), requires_compiled_model=False,
                                  options={"mode": "invoke_error"})
    loaded = load_model(digits_tflite_int8, int8_manifest, profile)
    first = loaded.report.attempts[0]
    assert first.outcome == "invoke_failed" and "first invoke" in first.reason
    assert loaded.report.delegate == "xnnpack"
    _check_cpu_answers(loaded, cpu_outputs)


def test_accelerator_with_wrong_answers_is_not_used(tmp_path, delegate_plugin, digits_tflite_int8, int8_manifest, cpu_outputs):
    """The plugin's "wrong" mode claims every node and writes a constant instead of computing,
    like a broken accelerator: its smoke-test output differs from the CPU's, so it is not used."""
    profile = accelerator_profile(tmp_path, library=str(delegate_plugin), requires_compiled_model=False,
                                  options={"mode": "wrong"})
    log = EventLog()
    loaded = load_model(digits_tflite_int8, int8_manifest, profile, events=log)
    first = loaded.report.attempts[0]
    assert first.outcome == "wrong_output"
    assert "'Identity'" in first.reason and "atol 2" in first.reason
    assert log.kinds() == [ev.ACCELERATOR_MISMATCH, ev.DELEGATE_FALLBACK]
    mismatch = log.of(ev.ACCELERATOR_MISMATCH)[0]
    assert mismatch.details["max_abs_diff"] > mismatch.details["atol"] == 2.0
    assert loaded.report.delegate == "xnnpack"
    _check_cpu_answers(loaded, cpu_outputs)
    assert smoke_test(loaded) <= 2


def test_wrong_delegate_really_takes_the_graph_when_tolerance_allows(tmp_path, delegate_plugin, digits_tflite_int8, cpu_outputs):
    """Counter-check of the test above: with an absurd atol the same delegate is used, takes all 7
    nodes (the report counts them), and its answers are the plugin's constant pattern."""
    manifest = Manifest.from_dict(manifest_for(digits_tflite_int8, profile="coral-usb-edgetpu", mode="int8", atol=1000.0))
    profile = accelerator_profile(tmp_path, library=str(delegate_plugin), requires_compiled_model=False,
                                  options={"mode": "wrong"})
    loaded = load_model(digits_tflite_int8, manifest, profile)
    report = loaded.report
    assert report.delegate == "edgetpu"
    assert (report.delegated_nodes, report.total_nodes, report.full_graph) == (7, 7, True)
    images, _ = cpu_outputs
    assert (loaded.predict_raw([images[0][None]])[0] == 0x11).all()


def test_edgetpu_delegate_skipped_for_uncompiled_model(tmp_path, delegate_plugin, digits_tflite_int8, int8_manifest):
    """An Edge TPU delegate (requires_compiled_model) is not even loaded for a plain int8 model."""
    record = tmp_path / "options.txt"
    profile = accelerator_profile(tmp_path, library=str(delegate_plugin),
                                  options={"device": "usb", "record_to": str(record)})
    assert profile.delegates[0].requires_compiled_model
    log = EventLog()
    loaded = load_model(digits_tflite_int8, int8_manifest, profile, events=log)
    first = loaded.report.attempts[0]
    assert first.outcome == "not_compiled_for_it"
    assert EDGETPU_CUSTOM_OP in first.reason and "edgetpu_compiler" in first.reason
    assert not record.exists()       # the plugin was never loaded
    assert loaded.report.delegate == "xnnpack"
    assert log.kinds() == [ev.DELEGATE_FALLBACK]


def _with_custom_op(model: bytes, custom_code: str) -> bytes:
    """The model re-serialized with one more (unused) operator code naming a custom op."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    obj = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    code = schema.OperatorCodeT()
    code.builtinCode = schema.BuiltinOperator.CUSTOM
    code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = custom_code
    code.version = 1
    obj.operatorCodes.append(code)
    builder = flatbuffers.Builder(len(model) + 1024)
    builder.Finish(obj.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_graph_reader_agrees_with_the_schema_module(digits_tflite_float, digits_tflite_int8):
    """The hand-written flatbuffer reader (used on devices without tensorflow or flatbuffers) reads
    the same operator codes and counts as the generated schema module that ai-edge-litert ships."""
    from ai_edge_litert import schema_py_generated as schema
    for model in (digits_tflite_float, digits_tflite_int8, _with_custom_op(digits_tflite_int8, EDGETPU_CUSTOM_OP)):
        m = schema.Model.GetRootAsModel(model, 0)
        graph = read_graph(model)
        codes = [m.OperatorCodes(i) for i in range(m.OperatorCodesLength())]
        assert graph.builtin_codes == tuple(max(c.BuiltinCode(), c.DeprecatedBuiltinCode()) for c in codes)
        assert graph.custom_codes == tuple(c.CustomCode().decode() for c in codes if c.CustomCode())
        assert graph.operator_counts == tuple(m.Subgraphs(i).OperatorsLength() for i in range(m.SubgraphsLength()))
    assert not compiled_for_edgetpu(digits_tflite_int8)
    assert compiled_for_edgetpu(_with_custom_op(digits_tflite_int8, EDGETPU_CUSTOM_OP))
    assert not compiled_for_edgetpu(_with_custom_op(digits_tflite_int8, "some-other-op"))


def test_edgetpu_delegate_tried_for_compiled_model(tmp_path, delegate_plugin, digits_tflite_int8):
    """A model holding edgetpu-custom-op gets the Edge TPU delegate (here the plugin, options intact)."""
    model = _with_custom_op(digits_tflite_int8, EDGETPU_CUSTOM_OP)
    manifest = Manifest.from_dict(manifest_for(model, profile="coral-usb-edgetpu", mode="int8"))
    record = tmp_path / "options.txt"
    profile = accelerator_profile(tmp_path, library=str(delegate_plugin),
                                  options={"device": "usb", "record_to": str(record)})
    loaded = load_model(model, manifest, profile)
    assert "device=usb" in record.read_text().splitlines()
    assert loaded.report.delegate == "edgetpu"
    assert [a.outcome for a in loaded.report.attempts] == ["used"]


def test_gpu_profile_falls_back_too(tmp_path, digits_tflite_float):
    """The jetson-gpu profile with its GPU delegate library absent runs the float model on XNNPACK."""
    manifest = Manifest.from_dict(manifest_for(digits_tflite_float, profile="jetson-gpu", mode="float16"))
    profile = accelerator_profile(tmp_path, base="jetson-gpu", library=str(tmp_path / "libtensorflowlite_gpu_delegate.so"))
    loaded = load_model(digits_tflite_float, manifest, profile)
    assert [(a.kind, a.outcome) for a in loaded.report.attempts] == [("gpu", "missing"), ("xnnpack", "used")]
    assert smoke_test(loaded) <= 1e-4


def test_fallback_is_logged_once_but_evented_every_load(tmp_path, caplog, digits_tflite_int8, int8_manifest):
    """Loading twice with the same missing library warns once in the log, yet each load emits its event."""
    missing = str(tmp_path / "libnot-here.so")
    profile = accelerator_profile(tmp_path, library=missing, requires_compiled_model=False)
    log = EventLog()
    with caplog.at_level(logging.WARNING, logger="litefleet.engine"):
        for _ in range(3):
            load_model(digits_tflite_int8, int8_manifest, profile, events=log)
    warnings = [r for r in caplog.records if missing in r.getMessage()]
    assert len(warnings) == 1 and "missing" in warnings[0].getMessage()
    assert log.kinds() == [ev.DELEGATE_FALLBACK] * 3
