"""Sparse weights in a converted .tflite: read them back, and measure what they save.

Pruning is only worth shipping if the zeros survive conversion and quantization, so the
report reads every weight tensor back from the flatbuffer rather than trusting the Keras
side. The saving is then in transfer size: a bundle travels as-is over MQTT (raw chunks),
so what pruning buys there is measured as the model's and bundle's deflate-compressed size
(what a gzip'd copy or a compressing link carries) next to the bytes a pull really sends.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelInputError

WEIGHT_OPS = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1, "TRANSPOSE_CONV": 1, "CONV_3D": 1,
              "BATCH_MATMUL": 1}
PASS_THROUGH = ("DEQUANTIZE", "DENSIFY")   # float16 weights and sparse-encoded weights reach the op through these
ZLIB_LEVEL = 9
# TensorType enum of the TFLite schema -> numpy dtype.
_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8,
           10: np.float64}


@dataclass(frozen=True)
class WeightTensor:
    """One weight tensor of the converted model."""

    name: str
    op: str
    dtype: str
    params: int
    zeros: int
    encoded_sparse: bool

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


def _schema():
    from tensorflow.lite.python import schema_py_generated
    return schema_py_generated


def _buffer(model_bytes: bytes, root, index: int) -> bytes:
    if not 0 < index < root.BuffersLength():
        return b""
    buf = root.Buffers(index)
    if buf.Offset() > 1:   # large models keep buffers after the flatbuffer
        return bytes(model_bytes[buf.Offset():buf.Offset() + buf.Size()])
    return buf.DataAsNumpy().tobytes() if buf.DataLength() else b""


def _zero_points(tensor) -> np.ndarray:
    q = tensor.Quantization()
    if q is None or q.ZeroPointLength() == 0:
        return np.zeros(1, np.int64)
    return q.ZeroPointAsNumpy().astype(np.int64)


def weight_tensors(model_bytes: bytes) -> list[WeightTensor]:
    """Every constant weight input of a weight-carrying op in the main subgraph, in op order."""
    from .ops import builtin_names, parse_model
    root = parse_model(model_bytes)
    names = builtin_names()
    codes = []
    for i in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(i)
        codes.append(names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?"))
    graph = root.Subgraphs(0)
    producer: dict[int, tuple[str, int]] = {}
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        name = codes[op.OpcodeIndex()]
        if name in PASS_THROUGH and op.InputsLength() and op.OutputsLength():
            producer[int(op.Outputs(0))] = (name, int(op.Inputs(0)))
    out: list[WeightTensor] = []
    seen: set[int] = set()
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        name = codes[op.OpcodeIndex()]
        slot = WEIGHT_OPS.get(name)
        if slot is None or op.InputsLength() <= slot:
            continue
        index = int(op.Inputs(slot))
        while index in producer:            # back through DEQUANTIZE / DENSIFY to the stored tensor
            index = producer[index][1]
        if index < 0 or index in seen:
            continue
        tensor = graph.Tensors(index)
        data = _buffer(model_bytes, root, tensor.Buffer())
        if not data:
            continue                        # an activation (BATCH_MATMUL of two inputs), not a weight
        seen.add(index)
        out.append(_measure(tensor, data, name))
    return out


def _measure(tensor, data: bytes, op: str) -> WeightTensor:
    dtype = _DTYPES.get(tensor.Type())
    name = tensor.Name().decode("utf-8", "replace")
    shape = [int(d) for d in tensor.ShapeAsNumpy()] if not tensor.ShapeIsNone() else []
    params = int(math.prod(shape)) if shape else 0
    if dtype is None:
        raise ModelInputError(f"weight tensor {name!r} has a tensor type ({tensor.Type()}) litefleet cannot read")
    values = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
    sparse = tensor.Sparsity() is not None
    if np.issubdtype(values.dtype, np.integer):
        zps = _zero_points(tensor)
        if not sparse and zps.size > 1 and values.size == params:
            q = tensor.Quantization()
            axis = q.QuantizedDimension()
            shaped = values.reshape(shape)
            expand = [1] * len(shape)
            expand[axis] = -1
            zero = int(np.sum(shaped == zps.reshape(expand)))
        else:
            zero = int(np.sum(values == int(zps[0])))
    else:
        zero = int(np.sum(values == 0))
    stored = int(values.size)
    zeros = zero + max(0, params - stored) if sparse else zero
    return WeightTensor(name=name, op=op, dtype=np.dtype(dtype).name, params=params, zeros=zeros,
                        encoded_sparse=sparse)


def overall_sparsity(weights: list) -> float:
    """Zeros over all weights together (``weights`` has ``sparsity`` and ``params``)."""
    total = sum(w.params for w in weights)
    return sum(w.sparsity * w.params for w in weights) / total if total else 0.0


def deflate_size(data: bytes) -> int:
    """Bytes after zlib (deflate, the algorithm of gzip) at level 9."""
    return len(zlib.compress(data, ZLIB_LEVEL))


def transfer_sizes(model: bytes, bundle: bytes | None = None, manifest: bytes | None = None,
                   signature: bytes | None = None) -> dict[str, Any]:
    """Sizes that decide transfer time: raw and deflate-compressed model (and bundle), MQTT pull bytes.

    The pull figure is the payload a device receives over MQTT: one head message (the signed
    manifest and signature) and one message per chunk, each with its 13-byte header; the
    broker's per-message framing (topic, packet header) comes on top.
    """
    from agent.protocol import messages
    from agent.protocol.manifest import DEFAULT_CHUNK_SIZE
    sizes: dict[str, Any] = {"model_bytes": len(model), "model_deflate_bytes": deflate_size(model)}
    sizes["model_deflate_ratio"] = round(sizes["model_deflate_bytes"] / len(model), 4) if model else None
    if bundle is not None:
        sizes["bundle_bytes"] = len(bundle)
        sizes["bundle_deflate_bytes"] = deflate_size(bundle)
    chunks = max(1, math.ceil(len(model) / DEFAULT_CHUNK_SIZE))
    head = (messages.HEADER_SIZE + 4 + len(manifest or b"") + len(signature or b"")) if manifest is not None else None
    sizes["mqtt_pull_chunks"] = chunks
    sizes["mqtt_pull_bytes"] = (head or 0) + chunks * messages.HEADER_SIZE + len(model)
    sizes["compression"] = f"zlib level {ZLIB_LEVEL} (deflate, as gzip)"
    return sizes
