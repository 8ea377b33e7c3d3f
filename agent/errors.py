"""Errors raised on the device. Each says what went wrong and what the device did about it."""

from __future__ import annotations

from agent.protocol.errors import LitefleetError


class AgentError(LitefleetError):
    """Base of the agent's own errors."""


class ConfigError(AgentError):
    """The agent's configuration is invalid; the agent exits with EX_CONFIG (78)."""

    exit_code = 78  # EX_CONFIG (sysexits.h): clikit returns it; a unit can list it in RestartPreventExitStatus


class RuntimeUnavailableError(AgentError):
    """No TFLite runtime (ai-edge-litert, tflite-runtime, tensorflow.lite) can be imported."""


class ModelLoadError(AgentError):
    """A model could not be loaded even on the CPU."""


class SmokeTestError(AgentError):
    """A model's output on the manifest's sample input is not the expected output."""


class InstallError(AgentError):
    """An install was refused or failed; the previously active model stays active.

    ``code`` is a stable, machine-readable reason (``bad_signature``, ``wrong_profile``,
    ``not_newer``, ``no_space``, ``load_failed``, ``smoke_test_failed`` ...).
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class InferenceError(AgentError):
    """A request to the inference API cannot be served; ``status`` is the HTTP status to send."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)
