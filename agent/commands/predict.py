"""``litefleet-agent predict``: ask the local inference API for one prediction and print it.

Standard library HTTP only (a device has no requests/httpx); a Unix socket is reached through
a small ``http.client.HTTPConnection`` subclass.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from agent.clikit import print_json
from agent.errors import AgentError, InferenceError

DEFAULT_URL = "http://127.0.0.1:8500"
TOP_K = 5


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix stream socket (the agent's api.sock)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """A tiny client of the inference API over TCP or a Unix socket."""

    def __init__(self, url: str | None = None, unix_socket: str | None = None, timeout: float = 30.0) -> None:
        self.where = unix_socket or url or DEFAULT_URL
        if unix_socket:
            self._connect = lambda: UnixHTTPConnection(unix_socket, timeout)
            self._prefix = ""
        else:
            parts = urlsplit(url or DEFAULT_URL)
            if parts.scheme != "http" or not parts.hostname:
                raise AgentError(f"--url must look like http://HOST:PORT, got {url!r}")
            host, port = parts.hostname, parts.port or 80
            self._connect = lambda: http.client.HTTPConnection(host, port, timeout=timeout)
            self._prefix = parts.path.rstrip("/")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = self._connect()
        try:
            conn.request(method, self._prefix + path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise AgentError(f"cannot reach the inference API at {self.where} ({exc}); is the agent running "
                             "(systemctl status litefleet-agent) and is this the right --url/--socket?") from None
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> dict[str, Any]:
        status, _, data = self.request(method, path, body, headers)
        try:
            doc = json.loads(data) if data else {}
        except json.JSONDecodeError:
            doc = {"error": data[:200].decode("utf-8", "replace")}
        if status != 200:
            raise InferenceError(status, f"HTTP {status} from {self.where}{path}: {doc.get('error', doc)}")
        return doc


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="run one prediction through the local inference API",
        description="Send an input to the running agent's inference API and print the outputs "
                    "(the top-5 classes with their scores when an output is a class vector).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help=f"API base URL (default {DEFAULT_URL})")
    where.add_argument("--socket", type=Path, metavar="PATH", help="the agent's Unix socket (api.sock)")
    p.add_argument("--model", metavar="NAME", help="model name (default: the one the agent serves)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--npy", type=Path, metavar="FILE", help="input tensor saved with numpy.save")
    what.add_argument("--data", dest="json_input", metavar="JSON",
                      help="input tensor as nested lists, e.g. '[[0.1, 0.2]]' (the batch dimension may be "
                           "left out); a whole request body {\"instances\": ...} or {\"inputs\": ...}; "
                           "or @FILE to read it from a file")
    what.add_argument("--image", type=Path, metavar="FILE",
                      help="an image, resized to the model's input and scaled to [0, 1] (needs Pillow)")
    p.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    client = ApiClient(args.url, str(args.socket) if args.socket else None, args.timeout)
    name = args.model or _served_model(client)
    path = f"/v1/models/{quote(name, safe='')}"
    if args.npy is not None:
        try:
            body = args.npy.read_bytes()
        except OSError as exc:
            raise AgentError(f"cannot read {args.npy}: {exc.strerror}") from None
        answer = client.json("POST", path + ":predict", body,
                             {"Content-Type": "application/x-npy", "Accept": "application/json"})
    else:
        if args.image is not None:
            request = {"inputs": _image_tensor(args.image, _input_shape(client, path))}
        else:
            request = _json_request(args.json_input, client, path)
        answer = client.json("POST", path + ":predict", json.dumps(request).encode(),
                             {"Content-Type": "application/json"})
    if args.json:
        print_json(answer)
        return 0
    outputs = answer.get("outputs", answer.get("predictions"))
    print(f"model {name} version {answer.get('model_version', '?')}  prediction id {answer.get('id', '?')}")
    if isinstance(outputs, dict):
        for key, value in outputs.items():
            print(f"output {key}:")
            _print_output(np.asarray(value))
    else:
        _print_output(np.asarray(outputs))
    return 0


def _served_model(client: ApiClient) -> str:
    models = client.json("GET", "/v1/models").get("models", [])
    if not models:
        raise InferenceError(503, f"the agent at {client.where} serves no model yet")
    return models[0]["name"]


def _input_shape(client: ApiClient, path: str) -> list[int]:
    meta = client.json("GET", path + "/metadata")
    inputs = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    if len(inputs) != 1:
        raise AgentError(f"the model has {len(inputs)} inputs; --json/--image send one; use a full request body")
    spec = next(iter(inputs.values()))
    return [int(d["size"]) for d in spec["tensor_shape"]["dim"]]


def _json_request(text: str, client: ApiClient, path: str) -> dict[str, Any]:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise AgentError(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AgentError(f"--json is not valid JSON: {exc}") from None
    if isinstance(value, dict):
        return value
    shape = _input_shape(client, path)
    try:
        given = np.shape(value)
    except ValueError:
        given = ()
    if len(given) == len(shape) - 1 and shape and shape[0] == 1:
        value = [value]  # the batch dimension was left out
    return {"inputs": value}


def _image_tensor(path: Path, shape: list[int]) -> list:
    try:
        from PIL import Image  # optional: not part of litefleet[device]
    except ImportError:
        raise AgentError("--image needs Pillow (pip install pillow); or save the tensor with numpy.save "
                         "and use --npy") from None
    if len(shape) != 4:
        raise AgentError(f"--image needs a model input of shape [1, H, W, C], this model's is {shape}")
    _, height, width, channels = shape
    try:
        image = Image.open(path)
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height))
    except OSError as exc:
        raise AgentError(f"cannot read the image {path}: {exc}") from None
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels.reshape(1, height, width, channels).tolist()


def _print_output(array: np.ndarray) -> None:
    """Top-5 classes of a class vector ([K] or [N, K] floats), else the values."""
    if array.ndim in (1, 2) and array.shape[-1] > 1 and np.issubdtype(array.dtype, np.floating):
        rows = array.reshape(-1, array.shape[-1])
        for n, scores in enumerate(rows):
            order = np.argsort(-scores, kind="stable")[:TOP_K]
            label = f"row {n}: " if len(rows) > 1 else ""
            print(f"{label}top {len(order)} of {scores.size} classes:")
            for rank, index in enumerate(order, 1):
                print(f"  {rank}. class {int(index):>4}  score {float(scores[index]):.6f}")
        return
    print(f"shape {list(array.shape)}:\n{np.array2string(array, precision=6, threshold=64)}")
