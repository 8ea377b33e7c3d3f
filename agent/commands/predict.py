"""``litefleet-agent predict``: ask the local inference API for one prediction and print it.

Standard library HTTP only (a device has no requests/httpx); a Unix socket is reached through
a small ``http.client.HTTPConnection`` subclass.

Where to ask: ``--socket`` or ``--url``, else the Unix socket the agent's config names (the TCP
listener is off unless configured). Over TCP a bearer token is sent: from ``--token-file`` (a
file holding the token, or the agent's tokens file), else from the config's ``api.tokens_file``
when this user may read it (root on the device).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from agent.clikit import print_json
from agent.config import DEFAULT_CONFIG_PATH
from agent.errors import AgentError, ConfigError, InferenceError

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

    def __init__(self, url: str | None = None, unix_socket: str | None = None, timeout: float = 30.0,
                 token: str | None = None) -> None:
        self.where = unix_socket or url or DEFAULT_URL
        self.token = token if not unix_socket else None   # the socket is authorised by its permissions
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
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request(method, self._prefix + path, body=body, headers=headers)
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
    where.add_argument("--url", help="API base URL over TCP, e.g. http://127.0.0.1:8500 (the agent's api.tcp_port "
                                     "must be set; a bearer token is sent)")
    where.add_argument("--socket", type=Path, metavar="PATH",
                       help="the agent's Unix socket (default: api.unix_socket from --config)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, metavar="PATH",
                   help="the agent's config, read for the default socket and tokens file (default: %(default)s)")
    p.add_argument("--token-file", type=Path, metavar="PATH",
                   help="bearer token for --url: a file holding the token, or a tokens file (NAME TOKEN [MODELS] "
                        "lines); default: the config's api.tokens_file if readable")
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
    client = _client(args)
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
    ident = answer.get("prediction_id", answer.get("id", "?"))
    print(f"model {name} version {answer.get('model_version', '?')}  prediction id {ident}")
    if isinstance(outputs, dict):
        for key, value in outputs.items():
            print(f"output {key}:")
            _print_output(np.asarray(value))
    else:
        _print_output(np.asarray(outputs))
    return 0


def _client(args: argparse.Namespace) -> ApiClient:
    """Where to ask and with which token, from the options and the agent's config."""
    if args.socket is not None:
        return ApiClient(unix_socket=str(args.socket), timeout=args.timeout)
    config = None
    if args.url is None or args.token_file is None:
        config = _api_config(args.config, needed=args.url is None)
    if args.url is None:
        assert config is not None
        return ApiClient(unix_socket=config.unix_socket, timeout=args.timeout)
    if args.token_file is not None:
        token = read_token(args.token_file, args.model)
    elif config is not None and config.tokens_file and os.access(config.tokens_file, os.R_OK):
        token = read_token(Path(config.tokens_file), args.model)
    else:
        token = None     # the server's 401 says what is missing
    return ApiClient(args.url, timeout=args.timeout, token=token)


def _api_config(path: Path, needed: bool) -> Any:
    """The config's [api] table, or None when it is not needed and cannot be read."""
    from agent.config import load_config
    try:
        return load_config(path).api
    except ConfigError as exc:
        if not needed:
            return None
        raise ConfigError(f"{exc}; pass --socket PATH (or --url URL with --token-file) to say where the agent "
                          "serves") from None


def read_token(path: Path, model: str | None = None) -> str:
    """The token in ``path``: a file holding just the token, or a tokens file (the first token that may
    use ``model``, or the first one)."""
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise AgentError(f"cannot read the token file {path}: permission denied (the agent's tokens file is "
                         "root-only; run as root, or give this application a file with its own token)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentError(f"cannot read the token file {path}: {exc}") from None
    lines = [line.split("#", 1)[0].split() for line in text.splitlines()]
    lines = [fields for fields in lines if fields]
    if not lines:
        raise AgentError(f"the token file {path} holds no token")
    if len(lines) == 1 and len(lines[0]) == 1:
        return lines[0][0]
    entries = [(f[1], None if len(f) < 3 or f[2] == "*" else f[2].split(",")) for f in lines if len(f) >= 2]
    if not entries:
        raise AgentError(f"{path}: expected one token, or lines of NAME TOKEN [MODELS]")
    for token, models in entries:
        if models is None or (model is not None and model in models):
            return token
    return entries[0][0]


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
