"""Which TFLite ops (and op versions) a model uses, and which runtimes can load them.

A TFLite runtime refuses a model whose op versions are newer than its kernels (tflite-runtime
2.14 rejects the FULLY_CONNECTED v12 that TF 2.21's dynamic-range conversion emits), so the
converter reads every op code of its output and compares it with the table below before it
ships anything. The table is a copy of ``FindMinimumRuntimeVersionForOp`` in LiteRT's
``tflite/converter/tools/versioning/runtime_version.cc`` (google-ai-edge/LiteRT commit
f67457790c9c, August 2026), the converter's own record of the first runtime that has each
op version. An op version not in the table is *unknown*: we say so rather than guess.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .errors import ModelInputError

EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
TABLE_SOURCE = "google-ai-edge/LiteRT tflite/converter/tools/versioning/runtime_version.cc @ f67457790c9c"

# op name -> {op version: first TFLite runtime version that can load it}
MIN_RUNTIME: dict[str, dict[int, str]] = {
    "ABS": {1: "1.13.0", 2: "2.4.0", 3: "2.5.0", 4: "2.6.0", 5: "2.12.0"},
    "ADD": {1: "1.5.0", 2: "1.14.0", 3: "2.4.0", 4: "2.6.0", 5: "2.13.0", 6: "2.23.0"},
    "ADD_N": {1: "1.14.0"},
    "ARG_MAX": {1: "1.9.0", 2: "1.14.0", 3: "2.9.0"},
    "ARG_MIN": {1: "1.9.0", 2: "1.14.0", 3: "2.9.0"},
    "ASSIGN_VARIABLE": {1: "2.6.0"},
    "ATAN2": {1: "2.10.0"},
    "AVERAGE_POOL_2D": {1: "1.5.0", 2: "1.14.0", 3: "2.3.0"},
    "BATCH_MATMUL": {1: "2.3.0", 2: "2.3.0", 3: "2.4.0", 4: "2.5.0"},
    "BATCH_TO_SPACE_ND": {1: "1.6.0", 2: "1.14.0", 3: "2.3.0", 4: "2.12.0"},
    "BIDIRECTIONAL_SEQUENCE_LSTM": {1: "1.14.0", 2: "1.14.0", 3: "1.14.0"},
    "BIDIRECTIONAL_SEQUENCE_RNN": {1: "1.14.0", 2: "1.14.0", 3: "2.3.0"},
    "BITCAST": {1: "2.13.0"},
    "BITWISE_XOR": {1: "2.13.0"},
    "BROADCAST_ARGS": {1: "2.6.0"},
    "BROADCAST_TO": {2: "2.5.0", 3: "2.5.0", 4: "2.23.0"},
    "BUCKETIZE": {1: "2.8.0"},
    "CALL_ONCE": {1: "2.5.0"},
    "CAST": {1: "1.5.0", 2: "2.7.0", 3: "2.8.0", 4: "2.9.0", 5: "2.12.0", 6: "2.15.0", 7: "2.17.0", 8: "2.21.0", 9: "2.23.0"},
    "CEIL": {1: "1.14.0"},
    "COMPLEX_ABS": {1: "2.5.0"},
    "CONCATENATION": {1: "1.5.0", 2: "1.14.0", 3: "2.3.0", 4: "2.14.0", 5: "2.21.0", 6: "2.23.0", 7: "2.23.0"},
    "CONV_2D": {1: "1.5.0", 2: "1.14.0", 3: "1.14.0", 4: "2.3.0", 5: "2.4.0", 6: "2.9.0", 7: "2.11.0", 8: "2.15.0"},
    "CONV_3D": {1: "2.5.0"},
    "CONV_3D_TRANSPOSE": {1: "2.6.0"},
    "COS": {1: "1.14.0", 2: "2.23.0"},
    "CUMSUM": {1: "2.4.0"},
    "DENSIFY": {1: "2.2.0"},
    "DEPTHWISE_CONV_2D": {1: "1.5.0", 2: "1.12.0", 3: "1.14.0", 4: "2.2.0", 5: "2.3.0", 6: "2.3.0", 7: "2.11.0"},
    "DEPTH_TO_SPACE": {1: "2.1.0", 2: "2.5.0"},
    "DEQUANTIZE": {1: "1.13.1", 2: "1.14.0", 3: "1.15.0", 4: "2.2.0", 5: "2.7.0", 6: "2.18.0", 7: "2.21.0", 8: "2.22.0", 9: "2.23.0"},
    "DILATE": {1: "2.15.0"},
    "DIV": {1: "1.6.0", 2: "2.3.0"},
    "DYNAMIC_UPDATE_SLICE": {1: "2.9.0", 2: "2.17.0", 3: "2.19.0", 4: "2.20.0", 5: "2.21.0", 6: "2.22.0"},
    "ELU": {1: "1.14.0"},
    "EMBEDDING_LOOKUP": {1: "1.13.0", 2: "1.14.0", 3: "1.14.0", 4: "2.18.0", 5: "2.21.0"},
    "EMBEDDING_LOOKUP_SPARSE": {1: "1.5.0"},
    "EQUAL": {1: "1.14.0", 2: "1.14.0", 3: "2.3.0", 4: "2.13.0", 5: "2.21.0"},
    "EXP": {1: "1.7.0", 2: "2.12.0"},
    "EXPAND_DIMS": {1: "1.10.0"},
    "FAKE_QUANT": {1: "1.5.0", 2: "1.10.0"},
    "FILL": {1: "1.13.0", 2: "2.3.0", 3: "2.5.0", 4: "2.12.0", 5: "2.23.0"},
    "FLOOR": {1: "1.9.0"},
    "FLOOR_DIV": {1: "1.14.0", 2: "1.14.0", 3: "2.13.0"},
    "FLOOR_MOD": {1: "1.13.0", 2: "2.13.0"},
    "FULLY_CONNECTED": {1: "1.5.0", 2: "1.10.0", 3: "1.14.0", 4: "1.14.0", 5: "2.0.0", 6: "2.1.0", 7: "2.3.0", 8: "2.3.0", 9: "2.3.0", 10: "2.11.0", 11: "2.15.0", 12: "2.17.0", 13: "2.18.0", 14: "2.21.0"},
    "GATHER": {1: "1.6.0", 2: "1.14.0", 3: "1.15.0", 4: "2.4.0", 5: "2.5.0", 6: "2.13.0", 7: "2.15.0", 8: "2.23.0"},
    "GATHER_ND": {1: "1.14.0", 2: "2.3.0", 3: "2.5.0", 4: "2.13.0", 5: "2.16.0", 6: "2.23.0"},
    "GELU": {1: "2.9.0", 2: "2.9.0", 3: "2.23.0"},
    "GREATER": {1: "1.14.0", 2: "1.14.0"},
    "GREATER_EQUAL": {1: "1.14.0", 2: "1.14.0", 3: "2.13.0"},
    "HARD_SWISH": {1: "1.15.0"},
    "HASHTABLE": {1: "2.5.0"},
    "HASHTABLE_FIND": {1: "2.5.0"},
    "HASHTABLE_IMPORT": {1: "2.5.0"},
    "HASHTABLE_LOOKUP": {1: "1.5.0"},
    "HASHTABLE_SIZE": {1: "2.5.0"},
    "IF": {1: "1.15.0"},
    "IMAG": {1: "2.5.0"},
    "L2_NORMALIZATION": {1: "1.5.0", 2: "1.14.0"},
    "L2_POOL_2D": {1: "1.5.0"},
    "LEAKY_RELU": {1: "1.13.1", 2: "2.3.0"},
    "LESS": {1: "1.14.0", 2: "1.14.0", 3: "2.13.0"},
    "LESS_EQUAL": {1: "1.14.0", 2: "1.14.0"},
    "LOCAL_RESPONSE_NORMALIZATION": {1: "1.5.0"},
    "LOG": {1: "1.14.0", 2: "2.15.0"},
    "LOGICAL_AND": {1: "1.11.0"},
    "LOGICAL_NOT": {1: "1.11.0"},
    "LOGICAL_OR": {1: "1.11.0"},
    "LOGISTIC": {1: "1.14.0", 2: "1.14.0", 3: "2.3.0"},
    "LOG_SOFTMAX": {1: "1.14.0", 2: "1.14.0"},
    "LSH_PROJECTION": {1: "1.5.0"},
    "LSTM": {1: "1.7.0", 2: "1.10.0", 3: "1.14.0", 4: "2.3.0"},
    "MATRIX_DIAG": {1: "1.14.0"},
    "MATRIX_SET_DIAG": {1: "1.14.0"},
    "MAXIMUM": {1: "1.14.0", 2: "1.14.0", 3: "2.3.0", 4: "2.3.0"},
    "MAX_POOL_2D": {1: "1.5.0", 2: "1.14.0", 3: "2.3.0"},
    "MEAN": {1: "1.6.0", 2: "1.14.0", 3: "2.4.0"},
    "MINIMUM": {1: "1.14.0", 2: "1.14.0", 3: "2.3.0", 4: "2.3.0"},
    "MIRROR_PAD": {1: "1.13.1", 2: "2.3.0", 3: "2.12.0"},
    "MUL": {1: "1.5.0", 2: "1.14.0", 3: "1.15.0", 4: "2.3.0", 5: "2.6.0", 6: "2.11.0", 7: "2.13.0", 8: "2.23.0"},
    "MULTINOMIAL": {1: "2.8.0"},
    "NEG": {1: "1.9.0"},
    "NON_MAX_SUPPRESSION_V4": {1: "2.1.0"},
    "NON_MAX_SUPPRESSION_V5": {1: "2.1.0"},
    "NOT_EQUAL": {1: "1.14.0", 2: "1.14.0", 3: "2.3.0", 4: "2.21.0"},
    "ONE_HOT": {1: "1.11.0"},
    "PACK": {1: "1.11.0", 2: "1.14.0", 3: "2.3.0", 4: "2.13.0", 5: "2.23.0"},
    "PAD": {1: "1.5.0", 2: "1.14.0", 3: "2.4.0", 4: "2.6.0", 5: "2.20.0", 6: "2.23.0"},
    "PADV2": {1: "1.9.0", 2: "1.14.0", 3: "2.4.0", 4: "2.6.0", 5: "2.20.0", 6: "2.23.0"},
    "POW": {1: "1.10.0"},
    "PRELU": {1: "1.8.0"},
    "QUANTIZE": {1: "1.14.0", 2: "1.15.0", 3: "2.7.0", 4: "2.21.0", 5: "2.21.0", 6: "2.21.0"},
    "RANDOM_STANDARD_NORMAL": {1: "2.8.0"},
    "RANDOM_UNIFORM": {1: "2.8.0"},
    "RANGE": {1: "1.13.0", 2: "2.14.0"},
    "RANK": {1: "1.14.0"},
    "READ_VARIABLE": {1: "2.6.0"},
    "REAL": {1: "2.5.0"},
    "REDUCE_ALL": {1: "2.6.0"},
    "REDUCE_ANY": {1: "1.11.0"},
    "REDUCE_MAX": {1: "1.11.0", 2: "1.14.0", 3: "2.5.0"},
    "REDUCE_MIN": {1: "1.11.0", 2: "1.14.0", 3: "2.5.0"},
    "REDUCE_PROD": {1: "1.11.0", 2: "2.6.0"},
    "REDUCE_WINDOW": {1: "2.15.0"},
    "RELU": {1: "1.5.0", 2: "2.1.0", 3: "2.5.0"},
    "RELU6": {1: "1.5.0", 2: "1.14.0", 3: "2.5.0"},
    "RELU_0_TO_1": {1: "2.10.0"},
    "RELU_N1_TO_1": {1: "1.5.0"},
    "RESHAPE": {1: "1.5.0"},
    "RESIZE_BILINEAR": {1: "1.7.0", 2: "1.14.0", 3: "2.2.0", 4: "2.5.0"},
    "RESIZE_NEAREST_NEIGHBOR": {1: "1.13.1", 2: "1.14.0", 3: "2.3.0", 4: "2.4.0"},
    "REVERSE_SEQUENCE": {1: "1.14.0"},
    "REVERSE_V2": {1: "1.14.0", 2: "2.2.0", 3: "2.5.0", 4: "2.23.0"},
    "RFFT2D": {1: "2.5.0"},
    "RIGHT_SHIFT": {1: "2.13.0"},
    "RNN": {1: "1.5.0", 2: "1.14.0", 3: "2.3.0"},
    "ROUND": {1: "1.14.0"},
    "RSQRT": {1: "1.10.0", 2: "2.5.0", 3: "2.15.0"},
    "SCATTER_ND": {1: "2.1.0"},
    "SEGMENT_SUM": {1: "2.2.0"},
    "SELECT": {1: "1.14.0", 2: "1.14.0", 3: "2.12.0", 4: "2.12.0"},
    "SELECT_V2": {1: "2.2.0", 2: "2.12.0"},
    "SHAPE": {1: "1.10.0"},
    "SIGN": {1: "2.11.0", 2: "2.12.0"},
    "SIN": {1: "1.9.0", 2: "2.23.0"},
    "SKIP_GRAM": {1: "1.5.0"},
    "SLICE": {1: "1.14.0", 2: "1.14.0", 3: "1.14.0", 4: "2.4.0", 5: "2.5.0", 6: "2.14.0", 7: "2.21.0", 8: "2.23.0"},
    "SOFTMAX": {1: "1.5.0", 2: "1.14.0", 3: "2.3.0", 4: "2.23.0"},
    "SPACE_TO_BATCH_ND": {1: "1.6.0", 2: "1.14.0", 3: "2.3.0", 4: "2.12.0"},
    "SPACE_TO_DEPTH": {1: "1.5.0", 2: "1.14.0"},
    "SPARSE_TO_DENSE": {1: "1.9.0", 2: "1.14.0", 3: "1.15.0"},
    "SPLIT": {1: "1.5.0", 2: "1.14.0", 3: "1.14.0", 4: "2.3.0", 5: "2.23.0"},
    "SPLIT_V": {1: "1.13.1", 2: "2.3.0", 3: "2.23.0"},
    "SQRT": {1: "1.10.0", 2: "2.21.0"},
    "SQUARE": {1: "1.12.0"},
    "SQUARED_DIFFERENCE": {1: "1.13.1", 2: "2.5.0"},
    "SQUEEZE": {1: "1.6.0", 2: "2.5.0"},
    "STABLEHLO_ADD": {1: "2.16.0"},
    "STABLEHLO_AND": {1: "2.17.0"},
    "STABLEHLO_CASE": {1: "2.17.0"},
    "STABLEHLO_CBRT": {1: "2.17.0"},
    "STABLEHLO_COMPOSITE": {1: "2.17.0"},
    "STABLEHLO_GATHER": {1: "2.16.0"},
    "STABLEHLO_MAXIMUM": {1: "2.16.0"},
    "STABLEHLO_MINIMUM": {1: "2.16.0"},
    "STABLEHLO_MULTIPLY": {1: "2.16.0"},
    "STABLEHLO_PAD": {1: "2.16.0"},
    "STABLEHLO_REDUCE_WINDOW": {1: "2.16.0"},
    "STABLEHLO_RNG_BIT_GENERATOR": {1: "2.15.0"},
    "STABLEHLO_SCATTER": {1: "2.15.0"},
    "STABLEHLO_SHIFT_LEFT": {1: "2.17.0"},
    "STRIDED_SLICE": {1: "1.6.0", 2: "1.14.0", 3: "2.1.0", 4: "2.2.0", 5: "2.5.0", 6: "2.6.0", 7: "2.14.0", 8: "2.14.0"},
    "SUB": {1: "1.6.0", 2: "1.14.0", 3: "2.3.0", 4: "2.4.0", 5: "2.4.0"},
    "SUM": {1: "1.10.0", 2: "1.15.0"},
    "SVDF": {1: "1.5.0", 2: "1.14.0", 3: "2.2.0", 4: "2.3.0"},
    "TANH": {1: "1.14.0", 2: "1.14.0", 3: "2.3.0"},
    "TILE": {1: "1.10.1", 2: "2.2.0", 3: "2.8.0"},
    "TOPK_V2": {1: "1.7.0", 2: "1.14.0", 3: "2.13.0"},
    "TRANSPOSE": {1: "1.6.0", 2: "1.14.0", 3: "1.15.0", 4: "2.3.0", 5: "2.4.0", 6: "2.12.0", 7: "2.14.4", 8: "2.22.0", 9: "2.23.0"},
    "TRANSPOSE_CONV": {1: "1.9.0", 2: "2.2.0", 3: "2.3.0", 4: "2.13.0", 5: "2.15.0"},
    "UNIDIRECTIONAL_SEQUENCE_LSTM": {1: "1.13.1", 2: "1.14.0", 3: "2.3.0", 4: "2.12.0"},
    "UNIDIRECTIONAL_SEQUENCE_RNN": {1: "1.14.0", 2: "1.14.0", 3: "2.3.0"},
    "UNIQUE": {1: "1.14.0"},
    "UNPACK": {1: "1.11.0", 2: "1.14.0", 3: "2.2.0", 4: "2.3.0", 5: "2.22.0", 6: "2.23.0"},
    "UNSORTED_SEGMENT_MAX": {1: "2.10.0"},
    "UNSORTED_SEGMENT_MIN": {1: "2.11.0"},
    "UNSORTED_SEGMENT_PROD": {1: "2.10.0"},
    "UNSORTED_SEGMENT_SUM": {1: "2.10.0"},
    "VAR_HANDLE": {1: "2.6.0"},
    "WHERE": {1: "1.14.0", 2: "2.8.0"},
    "WHILE": {1: "1.15.0"},
    "ZEROS_LIKE": {1: "1.12.0"},
}


@dataclass(frozen=True)
class OpUse:
    """One operator code of a model: builtin name (or CUSTOM), its version, how many nodes use it."""

    name: str
    version: int
    count: int
    custom_code: str = ""

    def __str__(self) -> str:
        label = f"{self.name}({self.custom_code})" if self.custom_code else self.name
        return f"{label} v{self.version}"


def _schema():
    # Lazy: importing tensorflow takes seconds and `litefleet --help` must stay fast.
    from tensorflow.lite.python import schema_py_generated
    return schema_py_generated


def builtin_names() -> dict[int, str]:
    """Builtin operator code -> name, from the schema TF ships (so new ops get their real name)."""
    schema = _schema()
    return {v: k for k, v in vars(schema.BuiltinOperator).items()
            if not k.startswith("_") and isinstance(v, int)}


def parse_model(tflite: bytes):
    """The flatbuffer root of a .tflite model; ModelInputError when the bytes are not one."""
    if len(tflite) < 8 or tflite[4:8] != b"TFL3":
        raise ModelInputError("not a TFLite flatbuffer (the file identifier 'TFL3' is missing)")
    schema = _schema()
    try:
        model = schema.Model.GetRootAsModel(tflite, 0)
        model.SubgraphsLength()
        model.OperatorCodesLength()
    except Exception as exc:  # flatbuffers raises struct/index errors on truncated data
        raise ModelInputError(f"TFLite flatbuffer is damaged ({type(exc).__name__}: {exc})") from None
    return model


def model_ops(tflite: bytes) -> list[OpUse]:
    """Every operator code the model declares, with the number of nodes (all subgraphs) using it.

    The builtin code is the larger of ``BuiltinCode`` and ``DeprecatedBuiltinCode``: the schema
    moved codes above 127 to a new field and keeps the old one for old readers.
    """
    model = parse_model(tflite)
    names = builtin_names()
    counts: Counter[int] = Counter()
    try:
        for s in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(s)
            for o in range(subgraph.OperatorsLength()):
                counts[subgraph.Operators(o).OpcodeIndex()] += 1
        uses = []
        for i in range(model.OperatorCodesLength()):
            code = model.OperatorCodes(i)
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            custom = code.CustomCode()
            uses.append(OpUse(name=names.get(builtin, f"BUILTIN_{builtin}"), version=int(code.Version()),
                              count=counts[i], custom_code=custom.decode("utf-8", "replace") if custom else ""))
    except ModelInputError:
        raise
    except Exception as exc:
        raise ModelInputError(f"TFLite flatbuffer is damaged ({type(exc).__name__}: {exc})") from None
    return uses


def parse_version(text: str) -> tuple[int, ...]:
    """'2.14' -> (2, 14, 0); compares like the runtime's own CompareRuntimeVersion."""
    parts = [int(p) for p in re.findall(r"\d+", text)[:3]]
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts + [0] * (3 - len(parts)))


def min_runtime_for(op: OpUse) -> str | None:
    """The smallest TFLite runtime version that can load this op version; None when unknown."""
    if op.custom_code:
        return None
    return MIN_RUNTIME.get(op.name, {}).get(op.version)


def runtime_problems(ops: list[OpUse], min_version: str) -> list[str]:
    """One line per op the oldest allowed runtime cannot (or cannot be shown to) load.

    ``edgetpu-custom-op`` is not listed: the profile's Edge TPU delegate provides it. Lines for
    ops that are merely unknown contain "unknown"; see :func:`blocking` to tell them apart.
    """
    allowed = parse_version(min_version)
    problems = []
    for op in ops:
        if op.custom_code:
            if op.custom_code != EDGETPU_CUSTOM_OP:
                problems.append(f"custom op {op.custom_code!r} v{op.version}: unknown to the builtin runtime, "
                                "cannot prove the runtime loads it")
            continue
        needed = min_runtime_for(op)
        if needed is None:
            problems.append(f"{op.name} v{op.version}: unknown version, cannot prove the runtime loads it")
        elif parse_version(needed) > allowed:
            problems.append(f"{op.name} v{op.version} needs runtime {needed}, profile allows {min_version}")
    return problems


def blocking(problems: list[str]) -> list[str]:
    """The problems that are proven (an op version known to be too new), not merely unknown."""
    return [p for p in problems if "cannot prove" not in p]


def accelerator_fallbacks(ops: list[OpUse], supported_ops: list[str]) -> list[str]:
    """Names of the ops the accelerator does not list: those nodes fall back to the CPU.

    An ``edgetpu-custom-op`` is the part already compiled for the Edge TPU, so it never falls back.
    """
    supported = set(supported_ops)
    out = []
    for op in ops:
        if op.custom_code == EDGETPU_CUSTOM_OP:
            continue
        name = op.custom_code or op.name
        if name not in supported and name not in out:
            out.append(name)
    return out


def has_edgetpu_op(ops: list[OpUse]) -> bool:
    """True when edgetpu_compiler has mapped part of the model onto the Edge TPU."""
    return any(op.custom_code == EDGETPU_CUSTOM_OP for op in ops)
