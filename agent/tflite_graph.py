"""Read what a .tflite file holds (operator codes, op counts) straight from its flatbuffer.

Why by hand: tflite-runtime ships no schema module and the device never has tensorflow or the
``flatbuffers`` package, yet the agent must know whether a model was compiled for the Edge TPU
(its graph holds the custom op ``edgetpu-custom-op``) before choosing that delegate. Only the few
tables needed are walked (Model.operator_codes, Model.subgraphs[].operators), with bounds checks,
following tensorflow/lite/schema/schema.fbs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
_IDENTIFIER = b"TFL3"


class ModelFormatError(ValueError):
    """The bytes are not a TFLite flatbuffer (or are cut short)."""


@dataclass(frozen=True)
class GraphInfo:
    """What the agent needs to know about a model's graph before loading it."""

    custom_codes: tuple[str, ...]       # custom op names, as in operator_codes
    builtin_codes: tuple[int, ...]      # builtin operator codes, as in operator_codes
    operator_counts: tuple[int, ...]    # number of operators in each subgraph

    @property
    def main_operators(self) -> int:
        return self.operator_counts[0] if self.operator_counts else 0

    @property
    def compiled_for_edgetpu(self) -> bool:
        return EDGETPU_CUSTOM_OP in self.custom_codes


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = memoryview(buf)

    def _unpack(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.buf):
            raise ModelFormatError(f"offset {pos} is outside the {len(self.buf)}-byte model")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def field(self, table: int, index: int) -> int | None:
        """Absolute position of field ``index`` of the table at ``table``, or None when absent."""
        vtable = table - self._unpack("<i", table)
        vtable_len = self._unpack("<H", vtable)
        slot = 4 + 2 * index
        if slot + 2 > vtable_len:
            return None
        offset = self._unpack("<H", vtable + slot)
        return table + offset if offset else None

    def indirect(self, pos: int) -> int:
        return pos + self._unpack("<I", pos)

    def vector(self, pos: int) -> tuple[int, int]:
        """(start of elements, length) of the vector referenced at ``pos``."""
        start = self.indirect(pos)
        return start + 4, self._unpack("<I", start)

    def tables(self, table: int, index: int) -> list[int]:
        pos = self.field(table, index)
        if pos is None:
            return []
        start, length = self.vector(pos)
        if start + 4 * length > len(self.buf):
            raise ModelFormatError("a vector runs past the end of the model")
        return [self.indirect(start + 4 * i) for i in range(length)]

    def string(self, table: int, index: int) -> str | None:
        pos = self.field(table, index)
        if pos is None:
            return None
        start, length = self.vector(pos)
        if start + length > len(self.buf):
            raise ModelFormatError("a string runs past the end of the model")
        return bytes(self.buf[start:start + length]).decode("utf-8", "replace")

    def scalar(self, table: int, index: int, fmt: str, default: int) -> int:
        pos = self.field(table, index)
        return default if pos is None else self._unpack(fmt, pos)


def read_graph(model: bytes) -> GraphInfo:
    """Parse the operator codes and per-subgraph operator counts; raise ModelFormatError."""
    if len(model) < 8 or bytes(model[4:8]) != _IDENTIFIER:
        raise ModelFormatError("not a TFLite model: the file identifier 'TFL3' is missing at byte 4")
    try:
        reader = _Reader(model)
        root = reader.indirect(0)
        custom: list[str] = []
        builtin: list[int] = []
        for code in reader.tables(root, 1):          # Model.operator_codes
            name = reader.string(code, 1)            # OperatorCode.custom_code
            if name:
                custom.append(name)
            deprecated = reader.scalar(code, 0, "<b", 0)   # deprecated_builtin_code (int8)
            builtin.append(max(deprecated, reader.scalar(code, 3, "<i", 0)))  # builtin_code
        counts = []
        for subgraph in reader.tables(root, 2):     # Model.subgraphs
            ops = reader.field(subgraph, 3)          # SubGraph.operators
            counts.append(0 if ops is None else reader.vector(ops)[1])
    except struct.error as exc:  # pragma: no cover - _unpack checks bounds first
        raise ModelFormatError(f"not a TFLite model: {exc}") from None
    return GraphInfo(tuple(custom), tuple(builtin), tuple(counts))


def compiled_for_edgetpu(model: bytes) -> bool:
    """True when the model holds the Edge TPU custom op; a byte search if the file will not parse."""
    try:
        return read_graph(model).compiled_for_edgetpu
    except ModelFormatError:
        return EDGETPU_CUSTOM_OP.encode("ascii") in model
