"""Errors the host-side converter raises.

Each message is one line that names the file, array, op or setting that is wrong, so the
operator can act on it without reading a traceback.
"""

from __future__ import annotations

from typing import Any

from agent.protocol.errors import LitefleetError


class ConverterError(LitefleetError):
    """Base of the converter's errors."""


class ModelInputError(ConverterError):
    """The model file or directory cannot be read, or is not a model litefleet can convert."""


class DataError(ConverterError):
    """Calibration or evaluation data is unusable: wrong shape or dtype, NaN/inf, empty, unreadable."""


class ConversionError(ConverterError):
    """TensorFlow's conversion failed, or no converter settings keep every op within the runtime."""


class ValidationFailed(ConverterError):
    """A validation check failed and --force was not given; ``report`` holds the ValidationReport."""

    def __init__(self, message: str, report: Any = None) -> None:
        self.report = report
        super().__init__(message)
