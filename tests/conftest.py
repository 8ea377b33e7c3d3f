"""Session-wide fixtures: real models trained once, real keys, the second runtime's environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TFLITE214_PYTHON = ROOT / ".venv-tflite214" / "bin" / "python"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def digits():
    from tests.support.models import digits_data
    return digits_data()


@pytest.fixture(scope="session")
def digits_keras(tmp_path_factory) -> Path:
    """The digits CNN, trained once per session, saved as .keras."""
    from tests.support.models import train_digits_cnn
    return train_digits_cnn(tmp_path_factory.mktemp("models") / "digits.keras")


@pytest.fixture(scope="session")
def digits_tflite_float(digits_keras) -> bytes:
    from tests.support.models import convert_tflite
    return convert_tflite(digits_keras, "float32")


@pytest.fixture(scope="session")
def digits_tflite_int8(digits_keras) -> bytes:
    from tests.support.models import convert_tflite
    return convert_tflite(digits_keras, "int8")


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory) -> Path:
    """A directory with release, operator and root key pairs (unencrypted)."""
    from agent.protocol import keys
    directory = tmp_path_factory.mktemp("keys")
    for role in keys.ROLES:
        keys.generate(role, directory)
    return directory


@pytest.fixture(scope="session")
def release_key(keys_dir):
    from agent.protocol import keys
    return keys.load_private(keys_dir / "release.key")


@pytest.fixture(scope="session")
def trusted_keys(keys_dir):
    from agent.protocol import keys
    return [keys.load_public(keys_dir / f"{role}.pub") for role in keys.ROLES]


@pytest.fixture(scope="session")
def tflite214_python() -> Path:
    """The interpreter of the tflite-runtime 2.14 environment (numpy<2) that scripts/setup makes."""
    if not TFLITE214_PYTHON.exists():
        pytest.fail(f"{TFLITE214_PYTHON} is missing: run scripts/setup to create the tflite-runtime environment")
    return TFLITE214_PYTHON


@pytest.fixture(scope="session")
def gcc() -> str:
    path = shutil.which("gcc") or shutil.which("cc")
    if not path:
        pytest.fail("gcc is needed to build the test delegate plugins")
    return path


def run_cli(*args: str, check: bool = False, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``litefleet`` (or ``litefleet-agent`` when args[0] == 'agent') as a real process."""
    if args and args[0] == "agent":
        cmd = [sys.executable, "-m", "agent.cli", *args[1:]]
    else:
        cmd = [sys.executable, "-m", "litefleet.cli", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, check=check, env=full_env,
                          cwd=cwd or ROOT, timeout=timeout)


@pytest.fixture(scope="session")
def delegate_plugin(gcc, tmp_path_factory) -> Path:
    """The test delegate plugin (tests/plugins/test_delegate.c), built once per session.

    It stands in for accelerator hardware (Edge TPU, GPU) that cannot exist here.
    """
    from tests.support.plugins import build_plugin
    return build_plugin(gcc, tmp_path_factory.mktemp("plugins"))
