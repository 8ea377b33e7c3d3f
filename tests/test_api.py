"""The local inference API: a real InferenceServer on a free TCP port and a real Unix socket,
serving real LoadedModels (agent.engine) of the digits CNN, checked against a raw interpreter."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.access import TokenSet
from agent.api import InferenceApi, InferenceServer, Request
from agent.commands.predict import UnixHTTPConnection
from agent.model_slot import ModelSlot

N_IMAGES = 24
TOKEN = "test-token-0123456789abcdef"
TOKENS = TokenSet.parse(f"tests {TOKEN}\n", "<tests>")   # the TCP listener needs bearer tokens


# ------------------------------------------------------------------------------ helpers

def load(model_bytes: bytes, version: int, mode: str, workers: int = 2, **manifest: Any):
    """A real LoadedModel of ``model_bytes`` as the engine loads it on an x86-cpu device;
    ``manifest``: more manifest fields (a ``data_profile``)."""
    from agent.engine import load_model
    from agent.protocol.manifest import Manifest
    from agent.protocol.profiles import load_profile
    from tests.support.bundles import manifest_for
    manifest = Manifest.from_dict(manifest_for(model_bytes, version=version, mode=mode, **manifest))
    return load_model(model_bytes, manifest, load_profile("x86-cpu"), workers=workers)


def reference_outputs(model_bytes: bytes, images: np.ndarray) -> np.ndarray:
    """What a raw interpreter says for each image, dequantized to real values: shape [N, 10]."""
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=model_bytes)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    rows = []
    for image in images:
        x = image[None].astype(np.float32)
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / np.float32(scale) + np.float32(zero)), info.min, info.max).astype(inp["dtype"])
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype(np.float32) - zero) * np.float32(scale)
        rows.append(y[0])
    return np.stack(rows)


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, image=np.zeros((1, 8, 8, 1), np.float32))
    return buffer.getvalue()


class Client:
    """One keep-alive connection (TCP with the test token, or Unix socket)."""

    def __init__(self, port: int | None = None, unix: Path | None = None, token: str | None = TOKEN) -> None:
        self.conn = (UnixHTTPConnection(str(unix), timeout=30) if unix is not None
                     else http.client.HTTPConnection("127.0.0.1", port, timeout=30))
        self.auth = {"Authorization": f"Bearer {token}"} if token and unix is None else {}

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, path, body=body, headers={**self.auth, **(headers or {})})
        response = self.conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()

    def json(self, method: str, path: str, doc=None, **kw) -> tuple[int, dict]:
        body = doc if isinstance(doc, (bytes, str)) or doc is None else json.dumps(doc)
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data)

    def close(self) -> None:
        self.conn.close()


def spy_close(model) -> list[int]:
    """Record when the real model's close() is called (and still close it)."""
    calls: list[int] = []
    original = model.close

    def close() -> None:
        calls.append(model.version)
        original()
    model.close = close
    return calls


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def images(digits) -> tuple[np.ndarray, np.ndarray]:
    _, _, x_test, y_test = digits
    return x_test[:N_IMAGES], y_test[:N_IMAGES]


@pytest.fixture(scope="module")
def expected_int8(digits_tflite_int8, images) -> np.ndarray:
    return reference_outputs(digits_tflite_int8, images[0])


@pytest.fixture(scope="module")
def expected_float(digits_tflite_float, images) -> np.ndarray:
    return reference_outputs(digits_tflite_float, images[0])


@pytest.fixture(scope="module")
def served(digits_tflite_int8, tmp_path_factory):
    """The int8 digits model (version 3) on TCP and a Unix socket; ``calls`` records on_inference."""
    calls: list[tuple[float, bool]] = []
    nodelay: list[int] = []
    lock = threading.Lock()

    def on_inference(latency_ms: float, ok: bool) -> None:
        with lock:
            calls.append((latency_ms, ok))

    def on_accept(sock: socket.socket) -> None:
        if sock.family == socket.AF_INET:
            nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    slot = ModelSlot(load(digits_tflite_int8, 3, "int8"))
    sock_path = tmp_path_factory.mktemp("api") / "api.sock"
    server = InferenceServer(slot, tcp=("127.0.0.1", 0), unix_socket=sock_path, tokens=TOKENS,
                             on_inference=on_inference, on_accept=on_accept)
    port = server.start()
    yield {"server": server, "port": port, "unix": sock_path, "calls": calls, "nodelay": nodelay, "slot": slot}
    server.stop()
    slot.close(timeout=5)


@pytest.fixture
def client(served):
    c = Client(served["port"])
    yield c
    c.close()


# ------------------------------------------------------------------------------ TF Serving shapes

def test_status_has_tf_serving_shape(client):
    status, doc = client.json("GET", "/v1/models/digits")
    assert status == 200
    assert doc == {"model_version_status": [{"version": "3", "state": "AVAILABLE",
                                             "status": {"error_code": "OK", "error_message": ""}}]}
    assert client.json("GET", "/v1/models/digits/versions/3")[1] == doc


def test_metadata_names_the_signature_and_quantization(client, digits_tflite_int8):
    status, doc = client.json("GET", "/v1/models/digits/metadata")
    assert status == 200
    assert doc["model_spec"] == {"name": "digits", "signature_name": "", "version": "3"}
    sig = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    (in_name, inp), = sig["inputs"].items()
    (out_name, out), = sig["outputs"].items()
    assert in_name == inp["name"] and out_name == out["name"]
    # clients send and receive real values; the stored tensors are int8 with their scale/zero point
    assert inp["dtype"] == "DT_FLOAT" and inp["model_dtype"] == "int8"
    assert [d["size"] for d in inp["tensor_shape"]["dim"]] == ["1", "8", "8", "1"]
    assert [d["size"] for d in out["tensor_shape"]["dim"]] == ["1", "10"]
    assert inp["quantization"]["scale"][0] > 0 and "zero_point" in out["quantization"]
    assert doc["litefleet"]["engine"]["runtime"]


def test_list_models(client):
    status, doc = client.json("GET", "/v1/models")
    assert status == 200 and [(m["name"], m["version"]) for m in doc["models"]] == [("digits", "3")]


# ------------------------------------------------------------------------------ predictions

def test_instances_match_the_dequantized_interpreter(client, images, expected_int8):
    x, y = images
    status, doc = client.json("POST", "/v1/models/digits:predict", {"instances": x.tolist()})
    assert status == 200
    predictions = np.asarray(doc["predictions"], dtype=np.float32)
    assert predictions.shape == (N_IMAGES, 10)
    np.testing.assert_allclose(predictions, expected_int8, atol=1e-6)
    assert (predictions.argmax(1) == y).mean() > 0.8   # a real, working classifier
    assert len(doc["id"]) == 32 and doc["model_version"] == "3"


def test_columnar_inputs_and_versioned_path(client, images, expected_int8):
    x, _ = images
    status, doc = client.json("POST", "/v1/models/digits/versions/3:predict", {"inputs": x[:1].tolist()})
    assert status == 200
    np.testing.assert_allclose(np.asarray(doc["outputs"], np.float32), expected_int8[:1], atol=1e-6)
    named = client.json("POST", "/v1/models/digits:predict",
                        {"signature_name": "serving_default", "inputs": {"image": x[:2].tolist()}})
    assert named[0] == 200 and np.asarray(named[1]["outputs"]).shape == (2, 10)
    assert doc["id"] != named[1]["id"]


def test_npy_round_trip(client, images, expected_int8):
    x, _ = images
    status, headers, body = client.request("POST", "/v1/models/digits:predict", npy_bytes(x[:5]),
                                           {"Content-Type": "application/x-npy"})
    assert status == 200 and headers["content-type"] == "application/x-npy"
    out = np.load(io.BytesIO(body), allow_pickle=False)
    assert out.dtype == np.float32 and out.shape == (5, 10)
    np.testing.assert_allclose(out, expected_int8[:5], atol=1e-6)
    assert len(headers["x-prediction-id"]) == 32 and headers["x-model-version"] == "3"

    status, headers, body = client.request("POST", "/v1/models/digits:predict", npy_bytes(x[:1]),
                                           {"Content-Type": "application/x-npy", "Accept": "application/json"})
    assert status == 200 and headers["content-type"] == "application/json"
    np.testing.assert_allclose(np.asarray(json.loads(body)["outputs"], np.float32), expected_int8[:1], atol=1e-6)


def test_npy_of_raw_int8_passes_through_as_quantized_values(client, images, expected_int8, digits_tflite_int8):
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=digits_tflite_int8)
    scale, zero = interp.get_input_details()[0]["quantization"]
    q = np.clip(np.round(images[0][:1] / np.float32(scale) + np.float32(zero)), -128, 127).astype(np.int8)
    status, _, body = client.request("POST", "/v1/models/digits:predict", npy_bytes(q),
                                     {"Content-Type": "application/x-npy"})
    assert status == 200
    np.testing.assert_allclose(np.load(io.BytesIO(body)), expected_int8[:1], atol=1e-6)


def test_unix_socket_serves_the_same_answers(served, images, expected_int8):
    c = Client(unix=served["unix"])
    try:
        status, doc = c.json("POST", "/v1/models/digits:predict", {"instances": images[0][:3].tolist()})
    finally:
        c.close()
    assert status == 200
    np.testing.assert_allclose(np.asarray(doc["predictions"], np.float32), expected_int8[:3], atol=1e-6)
    assert oct(served["unix"].stat().st_mode & 0o777) == oct(0o660)


def test_on_inference_called_once_per_predict(served, client, images):
    calls = served["calls"]
    before = len(calls)
    assert client.json("POST", "/v1/models/digits:predict", {"instances": images[0][:1].tolist()})[0] == 200
    assert client.json("POST", "/v1/models/digits:predict", {"instances": [[1, 2]]})[0] == 400
    assert client.json("GET", "/v1/models/digits")[0] == 200          # not a prediction: not counted
    new = calls[before:]
    assert [ok for _, ok in new] == [True, False]
    assert all(latency >= 0 for latency, _ in new)


# ------------------------------------------------------------------------------ errors

BAD_REQUESTS = [
    ("malformed json", "POST", "/v1/models/digits:predict", b'{"instances": [1,', {}, 400, "malformed JSON"),
    ("not an object", "POST", "/v1/models/digits:predict", b"[1, 2]", {}, 400, "must be an object"),
    ("empty body", "POST", "/v1/models/digits:predict", b"", {}, 400, "empty body"),
    ("both formats", "POST", "/v1/models/digits:predict", b'{"instances": [], "inputs": []}', {}, 400,
     "exactly one of"),
    ("empty instances", "POST", "/v1/models/digits:predict", b'{"instances": []}', {}, 400, "non-empty list"),
    ("wrong shape", "POST", "/v1/models/digits:predict", b'{"instances": [[1, 2, 3]]}', {}, 400,
     "shape [1, 3] does not fit the model's [1, 8, 8, 1]"),
    ("ragged", "POST", "/v1/models/digits:predict", b'{"inputs": [[1], [2, 3]]}', {}, 400, "different lengths"),
    ("strings", "POST", "/v1/models/digits:predict",
     json.dumps({"instances": np.full((1, 8, 8, 1), "a").tolist()}).encode(), {}, 400, "got strings"),
    ("bools", "POST", "/v1/models/digits:predict",
     json.dumps({"inputs": np.ones((1, 8, 8, 1), bool).tolist()}).encode(), {}, 400, "bool"),
    ("unknown input name", "POST", "/v1/models/digits:predict", b'{"inputs": {"pixels": [1]}}', {}, 400,
     "unknown ['pixels']"),
    ("unknown signature", "POST", "/v1/models/digits:predict", b'{"signature_name": "x", "inputs": [1]}', {},
     400, "signature 'x' not found"),
    ("npy not npy", "POST", "/v1/models/digits:predict", b"hello", {"Content-Type": "application/x-npy"}, 400,
     "not a .npy file"),
    ("npy truncated", "POST", "/v1/models/digits:predict", npy_bytes(np.zeros((1, 8, 8, 1), np.float32))[:-10],
     {"Content-Type": "application/x-npy"}, 400, "cannot read the .npy body"),
    ("npy pickled objects", "POST", "/v1/models/digits:predict",
     npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True),
     {"Content-Type": "application/x-npy"}, 400, "Object arrays cannot be loaded"),
    ("npz archive", "POST", "/v1/models/digits:predict", npz_bytes(), {"Content-Type": "application/x-npy"}, 400,
     "not a .npy file"),
    ("npy wrong dtype", "POST", "/v1/models/digits:predict", npy_bytes(np.zeros((1, 8, 8, 1), np.complex64)),
     {"Content-Type": "application/x-npy"}, 400, "dtype complex64 is not supported"),
    ("npy wrong shape", "POST", "/v1/models/digits:predict", npy_bytes(np.zeros((8, 8), np.float32)),
     {"Content-Type": "application/x-npy"}, 400, "shape [8, 8] does not fit"),
    ("unknown model", "POST", "/v1/models/cats:predict", b'{"inputs": [1]}', {}, 404,
     "model 'cats' is not served here; this device serves 'digits' (version 3)"),
    ("unknown version", "GET", "/v1/models/digits/versions/9", None, {}, 404, "version 9 of model 'digits' is not loaded"),
    ("bad version", "GET", "/v1/models/digits/versions/latest", None, {}, 400, "version must be a whole number"),
    ("unknown verb", "POST", "/v1/models/digits:classify", b"{}", {}, 404, "':classify' is not supported"),
    ("unknown path", "GET", "/v2/whatever", None, {}, 404, "no such endpoint: /v2/whatever"),
    ("wrong method", "GET", "/v1/models/digits:predict", None, {}, 405, "GET is not allowed"),
    ("wrong method 2", "POST", "/v1/models/digits", b"{}", {}, 405, "POST is not allowed"),
    ("unknown method", "BREW", "/v1/models/digits", None, {}, 405, "BREW is not allowed"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_naming_the_problem(served, case):
    _, method, path, body, headers, status, message = case
    c = Client(served["port"])
    try:
        got, got_headers, data = c.request(method, path, body, headers)
        assert got == status, data
        assert got_headers["content-type"] == "application/json"
        assert message in json.loads(data)["error"]
        # the agent keeps running: the next request on a fresh connection is served
    finally:
        c.close()
    ok = Client(served["port"])
    try:
        assert ok.json("GET", "/v1/models/digits")[0] == 200
    finally:
        ok.close()


def test_keep_alive_survives_a_4xx(client):
    assert client.json("POST", "/v1/models/digits:predict", b"{oops")[0] == 400
    sock = client.conn.sock
    assert sock is not None
    assert client.json("GET", "/v1/models/digits")[0] == 200
    assert client.conn.sock is sock   # same TCP connection reused


@pytest.fixture
def small_server(digits_tflite_int8):
    slot = ModelSlot(load(digits_tflite_int8, 3, "int8", workers=1))
    server = InferenceServer(slot, tcp=("127.0.0.1", 0), unix_socket=None, max_body_bytes=4096, tokens=TOKENS)
    port = server.start()
    yield port
    server.stop()
    slot.close(timeout=5)


def test_body_too_big_is_413_before_it_is_read(small_server, images):
    big = json.dumps({"instances": images[0].tolist()}).encode()
    assert len(big) > 4096
    c = Client(small_server)
    status, _, data = c.request("POST", "/v1/models/digits:predict", big)
    assert status == 413 and "at most 4096" in json.loads(data)["error"]
    c.close()

    # a client that announces the size and waits for 100-continue never has to send it
    with socket.create_connection(("127.0.0.1", small_server), timeout=10) as s:
        s.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                  b"Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n")
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 413") and b"100000000 bytes" in head

    # chunked bodies are counted as they arrive
    with socket.create_connection(("127.0.0.1", small_server), timeout=10) as s:
        chunk = b"x" * 3000
        s.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 413")

    # and the server still serves small requests
    c = Client(small_server)
    status, _, _ = c.request("POST", "/v1/models/digits:predict", json.dumps({"instances": images[0][:1].tolist()}))
    assert status == 200
    c.close()


def test_chunked_body_within_limit_is_served(small_server, images, expected_int8):
    body = npy_bytes(images[0][:1])
    with socket.create_connection(("127.0.0.1", small_server), timeout=10) as s:
        s.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                  b"Accept: application/json\r\nTransfer-Encoding: chunked\r\n"
                  + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
                  + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        response = http.client.HTTPResponse(s)
        response.begin()
        assert response.status == 200
        np.testing.assert_allclose(np.asarray(json.loads(response.read())["outputs"], np.float32),
                                   expected_int8[:1], atol=1e-6)


def test_empty_slot_is_503_with_a_message(tmp_path):
    server = InferenceServer(ModelSlot(), tcp=None, unix_socket=tmp_path / "api.sock")
    server.start()
    try:
        c = Client(unix=tmp_path / "api.sock")
        status, doc = c.json("POST", "/v1/models/digits:predict", {"inputs": [1]})
        assert status == 503 and "no model is loaded" in doc["error"]
        assert c.json("GET", "/v1/models/digits")[0] == 503
        assert c.json("GET", "/v1/models") == (200, {"models": []})
        c.close()
    finally:
        server.stop()
    assert not (tmp_path / "api.sock").exists()


def test_unexpected_exception_is_500_and_the_api_keeps_serving(digits_tflite_int8, images):
    """The model's predict is made to raise once (failure injection on a real model)."""
    model = load(digits_tflite_int8, 3, "int8", workers=1)
    real_predict = model.predict
    failures = iter([RuntimeError("interpreter exploded")])

    def predict(inputs):
        for exc in failures:
            raise exc
        return real_predict(inputs)
    model.predict = predict
    slot = ModelSlot(model)
    api = InferenceApi(slot)
    body = json.dumps({"instances": images[0][:1].tolist()}).encode()
    first = api.handle(Request("POST", "/v1/models/digits:predict", {}, body))
    assert first.status == 500 and "RuntimeError: interpreter exploded" in json.loads(first.body)["error"]
    assert api.handle(Request("POST", "/v1/models/digits:predict", {}, body)).status == 200
    slot.close(timeout=5)


def test_pure_dispatch_without_sockets(served):
    api = InferenceApi(served["slot"])
    response = api.handle(Request("GET", "/v1/models/digits?x=1", {}))
    assert response.status == 200 and json.loads(response.body)["model_version_status"][0]["version"] == "3"
    too_big = InferenceApi(served["slot"], max_body_bytes=10).handle(
        Request("POST", "/v1/models/digits:predict", {}, b"{" + b" " * 20 + b"}"))
    assert too_big.status == 413


def test_a_second_server_on_a_live_socket_is_refused(served):
    from agent.errors import AgentError
    other = InferenceServer(served["slot"], tcp=None, unix_socket=served["unix"])
    with pytest.raises(AgentError, match="another process is serving"):
        other.start()


def test_stale_socket_file_is_replaced(tmp_path, served):
    path = tmp_path / "api.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()   # the file stays, nobody listens
    server = InferenceServer(served["slot"], tcp=None, unix_socket=path)
    server.start()
    try:
        c = Client(unix=path)
        assert c.json("GET", "/v1/models/digits")[0] == 200
        c.close()
    finally:
        server.stop()


# ------------------------------------------------------------------------------ sockets, load

def test_tcp_nodelay_is_set_and_small_requests_are_fast(served):
    c = Client(served["port"])
    timings = []
    for _ in range(40):
        started = time.perf_counter()
        assert c.request("GET", "/v1/models/digits")[0] == 200
        timings.append((time.perf_counter() - started) * 1000)
    c.close()
    assert served["nodelay"] and all(v != 0 for v in served["nodelay"])
    assert sorted(timings)[len(timings) // 2] < 20, timings


def test_sixteen_concurrent_clients_all_get_correct_answers(served, images, expected_int8):
    x, _ = images
    errors: list[str] = []
    done = []

    def worker(k: int) -> None:
        c = Client(served["port"]) if k % 2 else Client(unix=served["unix"])
        try:
            for i in range(12):
                j = (k * 7 + i) % N_IMAGES
                status, doc = c.json("POST", "/v1/models/digits:predict", {"instances": x[j:j + 1].tolist()})
                if status != 200:
                    errors.append(f"{status} {doc}")
                elif not np.allclose(np.asarray(doc["predictions"], np.float32), expected_int8[j:j + 1], atol=1e-6):
                    errors.append(f"client {k} image {j}: wrong answer")
            done.append(k)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(done) == 20


def test_swapping_models_under_load_never_fails_a_request(digits_tflite_int8, digits_tflite_float, images,
                                                         expected_int8, expected_float, tmp_path):
    x, _ = images
    expected = {"1": expected_float, "2": expected_int8}
    assert not np.allclose(expected_float, expected_int8, atol=1e-6)   # the answers tell the models apart
    first = load(digits_tflite_float, 1, "float32")
    closed = spy_close(first)
    slot = ModelSlot(first)
    server = InferenceServer(slot, tcp=("127.0.0.1", 0), unix_socket=tmp_path / "api.sock", tokens=TOKENS)
    port = server.start()
    stop = threading.Event()
    errors: list[str] = []
    seen: dict[str, int] = {"1": 0, "2": 0}
    lock = threading.Lock()

    def hammer(k: int) -> None:
        c = Client(port) if k % 2 else Client(unix=tmp_path / "api.sock")
        i = k
        try:
            while not stop.is_set():
                j = i % N_IMAGES
                i += 1
                if i % 3:
                    status, doc = c.json("POST", "/v1/models/digits:predict", {"instances": x[j:j + 1].tolist()})
                    out, version = doc.get("predictions"), doc.get("model_version")
                else:
                    status, headers, body = c.request("POST", "/v1/models/digits:predict", npy_bytes(x[j:j + 1]),
                                                      {"Content-Type": "application/x-npy"})
                    out = np.load(io.BytesIO(body)) if status == 200 else body
                    version = headers.get("x-model-version")
                if status != 200:
                    errors.append(f"{status}: {out}")
                    continue
                if version not in expected or not np.allclose(np.asarray(out, np.float32),
                                                              expected[version][j:j + 1], atol=1e-6):
                    errors.append(f"answer for image {j} claims version {version} but matches neither model")
                with lock:
                    seen[version] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
        finally:
            c.close()

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    swapped = [first]
    close_calls = {id(first): closed}
    try:
        for n in range(30):
            version, data, mode = (2, digits_tflite_int8, "int8") if n % 2 == 0 else (1, digits_tflite_float, "float32")
            new = load(data, version, mode, workers=1)
            closed_new = spy_close(new)
            old = slot.swap(new)
            assert old is swapped[-1]
            swapped.append(new)
            close_calls[id(new)] = closed_new
            deadline = time.monotonic() + 5
            while sum(seen.values()) < 5 * (n + 1) and time.monotonic() < deadline:
                time.sleep(0.001)   # poll for progress: clients must be answered between swaps
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop()
    assert errors == []
    assert seen["1"] > 0 and seen["2"] > 0, seen
    # every replaced model was closed exactly once, after its last request
    for model in swapped[:-1]:
        assert slot.wait_idle(model, 5)
        assert close_calls[id(model)] == [model.version]
    assert close_calls[id(swapped[-1])] == []
    slot.close(timeout=5)
    assert close_calls[id(swapped[-1])] == [swapped[-1].version]


def test_stop_closes_idle_keep_alive_connections(digits_tflite_int8):
    slot = ModelSlot(load(digits_tflite_int8, 3, "int8", workers=1))
    server = InferenceServer(slot, tcp=("127.0.0.1", 0), unix_socket=None, tokens=TOKENS)
    port = server.start()
    c = Client(port)
    assert c.json("GET", "/v1/models/digits")[0] == 200
    started = time.monotonic()
    server.stop(timeout=5)
    assert time.monotonic() - started < 3
    assert c.conn.sock.recv(1) == b""     # the server closed the idle connection
    c.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    slot.close(timeout=5)
