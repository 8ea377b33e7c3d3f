"""``litefleet-agent predict`` as a real process against a real InferenceServer (TCP and Unix socket)."""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pytest

from agent.api import InferenceServer
from agent.model_slot import ModelSlot
from tests.conftest import run_cli
from tests.test_api import TOKEN, TOKENS, load, reference_outputs


@pytest.fixture(scope="module")
def server(digits_tflite_int8, tmp_path_factory):
    slot = ModelSlot(load(digits_tflite_int8, 5, "int8"))
    root = tmp_path_factory.mktemp("cli")
    sock = root / "api.sock"
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    srv = InferenceServer(slot, tcp=("127.0.0.1", 0), unix_socket=sock, tokens=TOKENS)
    port = srv.start()
    yield {"url": f"http://127.0.0.1:{port}", "socket": sock, "token": str(token_file)}
    srv.stop()
    slot.close(timeout=5)


@pytest.fixture(scope="module")
def sample(digits, digits_tflite_int8):
    """A test image the model classifies correctly, and the interpreter's scores for it."""
    _, _, x_test, y_test = digits
    expected = reference_outputs(digits_tflite_int8, x_test[:10])
    i = int(np.flatnonzero(expected.argmax(1) == y_test[:10])[0])
    return x_test[i:i + 1], int(y_test[i]), expected[i]


def top_classes(stdout: str) -> list[tuple[int, float]]:
    return [(int(c), float(s)) for c, s in re.findall(r"class\s+(\d+)\s+score\s+([0-9.]+)", stdout)]


def test_predict_npy_over_tcp_prints_top5(server, sample, tmp_path):
    image, label, expected = sample
    path = tmp_path / "x.npy"
    np.save(path, image)
    result = run_cli("agent", "predict", "--url", server["url"], "--token-file", server["token"], "--npy", str(path))
    assert result.returncode == 0, result.stderr
    top = top_classes(result.stdout)
    assert len(top) == 5
    assert top[0][0] == label
    assert [c for c, _ in top] == list(np.argsort(-expected, kind="stable")[:5])
    assert abs(top[0][1] - float(expected[label])) < 1e-5
    assert "model digits version 5" in result.stdout


def test_predict_json_over_unix_socket_without_batch_dim(server, sample):
    image, label, expected = sample
    result = run_cli("agent", "predict", "--socket", str(server["socket"]), "--model", "digits",
                     "--data", json.dumps(image[0].tolist()), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    np.testing.assert_allclose(np.asarray(doc["outputs"], np.float32)[0], expected, atol=1e-6)
    assert doc["model_version"] == "5" and len(doc["prediction_id"]) == 32


def test_predict_reports_the_servers_error(server):
    result = run_cli("agent", "predict", "--url", server["url"], "--token-file", server["token"],
                     "--data", "[[1, 2, 3]]")
    assert result.returncode == 2
    assert "HTTP 400" in result.stderr and "does not fit the model's [1, 8, 8, 1]" in result.stderr
    result = run_cli("agent", "predict", "--url", server["url"], "--token-file", server["token"], "--model", "cats",
                     "--data", "[1]")
    assert result.returncode == 2 and "model 'cats' is not served here" in result.stderr


def test_predict_without_an_agent_says_so(tmp_path):
    with socket.socket() as s:            # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("agent", "predict", "--url", f"http://127.0.0.1:{port}", "--data", "[1]")
    assert result.returncode == 2
    assert "cannot reach the inference API" in result.stderr and "is the agent running" in result.stderr
    result = run_cli("agent", "predict", "--socket", str(tmp_path / "none.sock"), "--data", "[1]")
    assert result.returncode == 2 and "cannot reach the inference API" in result.stderr
    # neither --url nor --socket: the agent's config says where it serves; without one, the error says what to pass
    result = run_cli("agent", "predict", "--config", str(tmp_path / "none.toml"), "--data", "[1]")
    assert result.returncode == 78
    assert "config file not found" in result.stderr and "pass --socket PATH" in result.stderr
