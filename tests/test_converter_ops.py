"""Reading op versions from real converted models and judging them against the runtime table."""

from __future__ import annotations

import pytest

from agent.protocol.profiles import load_profile
from converter.errors import ModelInputError
from converter.ops import (OpUse, accelerator_fallbacks, has_edgetpu_op, min_runtime_for, model_ops,
                           parse_version, runtime_problems)


def test_model_ops_reads_names_versions_and_node_counts(digits_tflite_float):
    ops = {op.name: op for op in model_ops(digits_tflite_float)}
    assert {"CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX"} <= set(ops)
    assert ops["CONV_2D"].count == 2            # two Conv2D layers share one operator code
    assert ops["FULLY_CONNECTED"].count == 2
    assert all(op.version >= 1 and op.custom_code == "" for op in ops.values())


def test_table_matches_the_runtime_version_source():
    assert min_runtime_for(OpUse("FULLY_CONNECTED", 12, 1)) == "2.17.0"
    assert min_runtime_for(OpUse("FULLY_CONNECTED", 9, 1)) == "2.3.0"
    assert min_runtime_for(OpUse("CONV_2D", 5, 1)) == "2.4.0"
    assert min_runtime_for(OpUse("HARD_SWISH", 1, 1)) == "1.15.0"
    assert min_runtime_for(OpUse("DEPTHWISE_CONV_2D", 99, 1)) is None
    for name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "SUB", "MEAN", "SOFTMAX",
                 "RESHAPE", "AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION", "PAD", "QUANTIZE", "DEQUANTIZE",
                 "LOGISTIC", "TANH", "RELU", "RELU6", "HARD_SWISH", "STRIDED_SLICE", "TRANSPOSE", "BATCH_MATMUL",
                 "SHAPE", "PACK", "GATHER", "SQUEEZE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"):
        assert min_runtime_for(OpUse(name, 1, 1)) is not None, name


def test_runtime_problems_name_op_version_and_runtimes():
    ops = [OpUse("FULLY_CONNECTED", 12, 2), OpUse("CONV_2D", 3, 2), OpUse("CONV_2D", 42, 1),
           OpUse("CUSTOM", 1, 1, "my-op"), OpUse("CUSTOM", 1, 1, "edgetpu-custom-op")]
    problems = runtime_problems(ops, "2.14")
    assert problems[0] == "FULLY_CONNECTED v12 needs runtime 2.17.0, profile allows 2.14"
    assert "CONV_2D v42: unknown version, cannot prove the runtime loads it" in problems
    assert any("my-op" in p for p in problems)
    assert len(problems) == 3                       # CONV_2D v3 is fine; the Edge TPU op comes with its delegate
    assert runtime_problems([OpUse("FULLY_CONNECTED", 12, 1)], "2.17") == []


def test_versions_compare_numerically():
    assert parse_version("2.14") == (2, 14, 0)
    assert parse_version("2.9.0") < parse_version("2.14")
    assert runtime_problems([OpUse("TRANSPOSE", 7, 1)], "2.14") == [
        "TRANSPOSE v7 needs runtime 2.14.4, profile allows 2.14"]


def test_accelerator_fallbacks_against_the_coral_profile():
    supported = load_profile("coral-usb-edgetpu").accelerator["supported_ops"]
    ops = [OpUse("CONV_2D", 3, 2), OpUse("BATCH_MATMUL", 1, 1), OpUse("CUSTOM", 1, 1, "edgetpu-custom-op"),
           OpUse("GELU", 1, 1)]
    assert accelerator_fallbacks(ops, supported) == ["BATCH_MATMUL", "GELU"]
    assert has_edgetpu_op(ops) and not has_edgetpu_op(ops[:2])


def test_damaged_flatbuffer(digits_tflite_float):
    with pytest.raises(ModelInputError, match="TFL3"):
        model_ops(b"not a model at all")
    with pytest.raises(ModelInputError, match="damaged"):
        model_ops(digits_tflite_float[:200])
