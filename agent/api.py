"""The local inference API: TensorFlow Serving's REST shape over a Unix socket (and TCP if configured).

Two layers, so the protocol logic can be tested without sockets:

* :class:`InferenceApi` is pure: a :class:`Request` in, a :class:`Response` out. It routes,
  parses JSON or ``.npy`` bodies, fits them to the model's signature, runs the model taken
  from the :class:`~agent.model_slot.ModelSlot` and encodes the answer. Every problem becomes
  a 4xx/5xx :class:`Response` with ``{"error": "..."}``; it never raises.
* :class:`InferenceServer` puts it on the standard library's ``ThreadingHTTPServer`` (the
  device install has no web framework): HTTP/1.1 keep-alive, ``TCP_NODELAY`` on accepted TCP
  sockets, a body-size limit enforced before the body is read, a clean ``stop()``.

Endpoints (``{v}`` is optional everywhere as ``/versions/{v}``)::

    GET  /v1/models                       the served model (litefleet extension)
    GET  /v1/models/{name}                version status, TF Serving's shape
    GET  /v1/models/{name}/metadata       signature: names, dtypes, shapes, quantization
    POST /v1/models/{name}:predict        {"instances": [...]} or {"inputs": ...}, or a raw .npy body
    POST /v1/models/{name}:feedback       {"prediction_id": "...", "label": 3} (litefleet extension)

Quantized models take and return real values: the engine applies scale and zero point.

Who may ask (agent/access.py): a process that can open the Unix socket (mode 0660, group
``api.socket_group``) is authorised by that; over TCP every request needs a bearer token.
After each predict the real inputs and outputs feed the model's drift monitor (agent/drift.py)
and its predicted classes are remembered for field labels (agent/feedback.py).
"""

from __future__ import annotations

import email.utils
import grp
import io
import json
import logging
import os
import re
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from agent import __version__
from agent.access import AccessControl, ApiToken, TokenSet
from agent.drift import DEFAULT_WINDOW, DriftMonitor
from agent.errors import AgentError, ConfigError, InferenceError
from agent.feedback import FeedbackBook, parse_labels
from agent.model_slot import ModelSlot

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
NPY_TYPE = "application/x-npy"
JSON_TYPE = "application/json"
SIGNATURE_NAME = "serving_default"
QUANTIZED_DTYPES = ("int8", "uint8", "int16")

OnInference = Callable[[float, bool], None]

_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?"
    r"(?:/(?P<sub>metadata|labels/[^/:]+)|:(?P<verb>[A-Za-z]+))?/?$")
_ENDPOINTS = ("GET /v1/models/{name}", "GET /v1/models/{name}/metadata", "POST /v1/models/{name}:predict",
              "POST /v1/models/{name}:feedback")
_VERBS = ("predict", "feedback")

# TF Serving's names for tensor dtypes, used in the metadata answer.
_TF_DTYPES = {"float32": "DT_FLOAT", "float16": "DT_HALF", "int8": "DT_INT8", "uint8": "DT_UINT8",
              "int16": "DT_INT16", "int32": "DT_INT32", "int64": "DT_INT64", "bool": "DT_BOOL"}


# --------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class Request:
    """One HTTP request; header names are matched case-insensitively.

    ``via`` is the listener it came in on: "unix" (authorised by the socket's permissions) or
    "tcp" (needs a bearer token when the API has tokens).
    """

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    via: str = "unix"

    def header(self, name: str, default: str = "") -> str:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return default


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def json_response(status: int, doc: Any, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(doc, separators=(",", ":")).encode()
    return Response(status, {"Content-Type": JSON_TYPE, **(headers or {})}, body)


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return json_response(status, {"error": message}, headers)


class _Reject(Exception):
    """Raised inside the dispatcher to answer with an error (status, message, extra headers)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


# --------------------------------------------------------------------------- tensors

@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the manifest describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quantization: dict[str, Any] | None

    @classmethod
    def from_manifest(cls, doc: Mapping[str, Any]) -> "TensorSpec":
        quant = doc.get("quantization") or None
        if quant is not None and not quant.get("scale"):
            quant = None
        return cls(doc["name"], tuple(int(d) for d in doc["shape"]), doc["dtype"], quant)

    @property
    def quantized(self) -> bool:
        return self.quantization is not None and self.dtype in QUANTIZED_DTYPES

    @property
    def api_dtype(self) -> str:
        """The dtype clients send and receive: real values (float32) for quantized tensors."""
        return "float32" if self.quantized else self.dtype


def input_specs(model: Any) -> list[TensorSpec]:
    return [TensorSpec.from_manifest(d) for d in model.manifest.doc["inputs"]]


def output_specs(model: Any) -> list[TensorSpec]:
    return [TensorSpec.from_manifest(d) for d in model.manifest.doc["outputs"]]


def to_array(value: Any, spec: TensorSpec) -> np.ndarray:
    """A JSON value as an array, rejecting ragged lists and non-numbers, naming the tensor."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise _Reject(400, f"input '{spec.name}': nested lists have rows of different lengths "
                           f"(expected shape {_shape_text(spec.shape)})") from None
    if array.dtype.kind not in "biuf":
        raise _Reject(400, f"input '{spec.name}': expected numbers for a {spec.api_dtype} tensor, "
                           f"got {_kind_text(array)}")
    return array


def coerce(array: np.ndarray, spec: TensorSpec, *, raw_allowed: bool) -> np.ndarray:
    """Fit an array's dtype to an input, or raise a 400 naming the tensor and both dtypes.

    Quantized inputs take real values (any number -> float32; the engine quantizes them);
    with ``raw_allowed`` (a typed .npy body) an array already in the model's integer dtype
    passes through as quantized values.
    """
    kind = array.dtype.kind
    where = f"input '{spec.name}'"
    if kind not in "biuf":
        raise _Reject(400, f"{where}: dtype {array.dtype} is not supported; send {spec.api_dtype}")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if spec.quantized:
        if raw_allowed and array.dtype == np.dtype(spec.dtype):
            return array
        if kind == "b":
            raise _Reject(400, f"{where}: got bool values, expected real numbers (float32)")
        return array.astype(np.float32)
    target = np.dtype(spec.dtype)
    if target.kind == "f":
        if kind == "b":
            raise _Reject(400, f"{where}: got bool values, expected {spec.dtype}")
        return array.astype(target)
    if target.kind == "b":
        if kind != "b" and not np.isin(array, (0, 1)).all():
            raise _Reject(400, f"{where}: expected bool (or 0/1) values")
        return array.astype(bool)
    # integer tensors (token ids, indices): only whole numbers in range
    if kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
        raise _Reject(400, f"{where}: expected whole numbers for a {spec.dtype} tensor, got fractions")
    if kind == "b":
        raise _Reject(400, f"{where}: got bool values, expected {spec.dtype}")
    info = np.iinfo(target)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise _Reject(400, f"{where}: values outside the {spec.dtype} range [{info.min}, {info.max}]")
    return array.astype(target)


def fit_batch(arrays: Sequence[np.ndarray], specs: Sequence[TensorSpec]) -> int:
    """Check each array's shape against its input; return the batch size N.

    An input of shape [B, ...] accepts exactly [B, ...], or [N, ...] for any N when B == 1
    (the request is then run row by row). Every input must carry the same N.
    """
    batch = None
    for array, spec in zip(arrays, specs):
        ok = tuple(array.shape) == spec.shape or (
            len(spec.shape) >= 1 and spec.shape[0] == 1 and array.ndim == len(spec.shape)
            and tuple(array.shape[1:]) == spec.shape[1:] and array.shape[0] >= 1)
        if not ok:
            hint = f"[N, {', '.join(map(str, spec.shape[1:]))}]" if spec.shape and spec.shape[0] == 1 else ""
            raise _Reject(400, f"input '{spec.name}': shape {_shape_text(array.shape)} does not fit the model's "
                               f"{_shape_text(spec.shape)}" + (f" (or {hint} for a batch)" if hint else ""))
        n = array.shape[0] if spec.shape and spec.shape[0] == 1 else 1
        if batch is not None and n != batch:
            raise _Reject(400, f"inputs have different batch sizes ({batch} and {n} for '{spec.name}')")
        batch = n
    return batch or 1


def run_model(model: Any, arrays: Sequence[np.ndarray], specs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """Run the model on a request's arrays, row by row when the model's batch is 1 and N > 1."""
    batch = fit_batch(arrays, specs)
    if batch == 1 or all(tuple(a.shape) == s.shape for a, s in zip(arrays, specs)):
        return [np.asarray(o) for o in model.predict(list(arrays))]
    rows = [[np.asarray(o) for o in model.predict([a[i:i + 1] for a in arrays])] for i in range(batch)]
    return [np.concatenate([r[k] for r in rows]) if rows[0][k].ndim else np.stack([r[k] for r in rows])
            for k in range(len(rows[0]))]


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _kind_text(array: np.ndarray) -> str:
    return {"U": "strings", "S": "bytes", "O": "objects (mixed or nested values)",
            "c": "complex numbers", "M": "dates", "m": "time deltas"}.get(array.dtype.kind, str(array.dtype))


def parse_npy(body: bytes) -> np.ndarray:
    """One tensor from a .npy body; never unpickles, refuses .npz archives and truncated files."""
    if not body.startswith(b"\x93NUMPY"):
        raise _Reject(400, "body is not a .npy file (it must start with the \\x93NUMPY magic); "
                           "send one array saved with numpy.save")
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise _Reject(400, f"cannot read the .npy body: {exc}") from None
    if not isinstance(array, np.ndarray):
        raise _Reject(400, "the .npy body does not hold one array")
    return array


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the dispatcher

class InferenceApi:
    """Pure request -> response logic of the inference API (no sockets; thread-safe).

    ``access`` decides who may ask (None: everyone); ``feedback`` remembers predictions for
    field labels (None: a private book without a file); every served model that carries a
    data profile gets a :class:`~agent.drift.DriftMonitor` over ``drift_window`` inferences,
    made afresh when another model (or version) is swapped in.
    """

    def __init__(self, slot: ModelSlot, *, on_inference: OnInference | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, access: AccessControl | None = None,
                 feedback: FeedbackBook | None = None, drift_window: int = DEFAULT_WINDOW) -> None:
        self.slot = slot
        self.on_inference = on_inference
        self.max_body_bytes = max_body_bytes
        self.access = access or AccessControl()
        self.feedback = feedback or FeedbackBook()
        self.drift_window = drift_window
        self._drift_lock = threading.Lock()
        self._drift: tuple[tuple[str, int, str], DriftMonitor | None] | None = None

    def body_too_large(self, length: int) -> Response | None:
        """The 413 answer for a body of ``length`` bytes, or None if it may be read."""
        if length > self.max_body_bytes:
            return error_response(413, f"request body is {length} bytes; this agent accepts at most "
                                       f"{self.max_body_bytes} (api max_body_bytes); send smaller batches")
        return None

    def handle(self, request: Request) -> Response:
        """Answer one request; never raises."""
        try:
            return self._dispatch(request)
        except _Reject as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except InferenceError as exc:
            return error_response(exc.status, str(exc))
        except Exception as exc:  # the server must keep running whatever a handler hits
            log.exception("inference API: %s %s failed", request.method, request.path)
            return error_response(500, f"internal error while serving {request.method} {request.path}: "
                                       f"{type(exc).__name__}: {exc}")

    # routing ---------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> Response:
        path = urlsplit(request.path).path
        match = _ROUTE.match(path)
        token, refusal = self.access.check(request.via, request.header("Authorization"),
                                           unquote(match["name"]) if match else None)
        if refusal is not None:
            return error_response(refusal.status, refusal.message, refusal.headers)
        too_big = self.body_too_large(len(request.body))
        if too_big is not None:
            return too_big
        if path.rstrip("/") == "/v1/models":
            self._allow(request, "GET")
            return self._list_models(token)
        if not match:
            raise _Reject(404, f"no such endpoint: {path}; this API serves {', '.join(_ENDPOINTS)}")
        name, version = unquote(match["name"]), match["version"]
        sub, verb = match["sub"], match["verb"]
        if version is not None and not version.isdigit():
            raise _Reject(400, f"version must be a whole number, got '{unquote(version)}'")
        if sub and sub.startswith("labels/"):
            raise _Reject(404, "version labels are not supported; use /versions/{v} or no version")
        if verb is not None:
            if verb not in _VERBS:
                raise _Reject(404, f"method ':{verb}' is not supported; this API serves "
                                   f"{', '.join(':' + v for v in _VERBS)}")
            self._allow(request, "POST")
            if verb == "feedback":
                return self._feedback(request, name)
            return self._predict(request, name, version)
        self._allow(request, "GET")
        with self.slot.use() as model:
            self._check_model(model, name, version)
            return self._metadata(model) if sub == "metadata" else self._status(model)

    @staticmethod
    def _allow(request: Request, method: str) -> None:
        if request.method.upper() != method:
            raise _Reject(405, f"{request.method} is not allowed on {urlsplit(request.path).path}; use {method}",
                          {"Allow": method})

    @staticmethod
    def _check_model(model: Any, name: str, version: str | None) -> None:
        if name != model.name:
            raise _Reject(404, f"model '{name}' is not served here; this device serves '{model.name}' "
                               f"(version {model.version})")
        if version is not None and int(version) != model.version:
            raise _Reject(404, f"version {int(version)} of model '{name}' is not loaded; version "
                               f"{model.version} is")

    # GET endpoints ---------------------------------------------------------------------

    def _list_models(self, token: ApiToken | None) -> Response:
        model = self.slot.get()
        models = [] if model is None or (token is not None and not token.allows(model.name)) else [
            {"name": model.name, "version": str(model.version), "state": "AVAILABLE", "sha256": model.sha256}]
        return json_response(200, {"models": models})

    @staticmethod
    def _status(model: Any) -> Response:
        return json_response(200, {"model_version_status": [{
            "version": str(model.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]})

    @staticmethod
    def _metadata(model: Any) -> Response:
        def info(spec: TensorSpec) -> dict[str, Any]:
            return {"name": spec.name, "dtype": _TF_DTYPES.get(spec.api_dtype, spec.api_dtype),
                    "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in spec.shape],
                                     "unknown_rank": False},
                    # litefleet extensions: the tensor as stored in the model
                    "model_dtype": spec.dtype, "quantization": spec.quantization}

        doc = model.manifest.doc
        report = getattr(model, "report", None)
        signature = {"inputs": {s.name: info(s) for s in input_specs(model)},
                     "outputs": {s.name: info(s) for s in output_specs(model)},
                     "method_name": "tensorflow/serving/predict"}
        return json_response(200, {
            "model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
            "metadata": {"signature_def": {"signature_def": {SIGNATURE_NAME: signature}}},
            "litefleet": {"sha256": model.sha256, "profile": doc.get("profile"),
                          "quantization": doc.get("quantization"),
                          "engine": report.to_dict() if report is not None else None},
        })

    # predict ---------------------------------------------------------------------------

    def _predict(self, request: Request, name: str, version: str | None) -> Response:
        content_type = request.header("Content-Type").split(";")[0].strip().lower()
        is_npy = content_type == NPY_TYPE
        doc = parse_npy(request.body) if is_npy else self._parse_json(request.body)
        started = time.perf_counter()
        with self.slot.use() as model:
            self._check_model(model, name, version)
            ok = False
            try:
                response = (self._predict_npy(request, model, doc) if is_npy
                            else self._predict_json(model, doc))
                ok = True
                return response
            finally:
                self._record((time.perf_counter() - started) * 1000.0, ok)

    def _record(self, latency_ms: float, ok: bool) -> None:
        if self.on_inference is None:
            return
        try:
            self.on_inference(latency_ms, ok)
        except Exception:  # metrics must never fail a request
            log.exception("on_inference hook failed")

    @staticmethod
    def _parse_json(body: bytes) -> dict[str, Any]:
        if not body:
            raise _Reject(400, 'empty body; send JSON {"instances": [...]} or {"inputs": ...}, '
                               f"or a .npy file with Content-Type: {NPY_TYPE}")
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Reject(400, f"malformed JSON body: {exc}") from None
        if not isinstance(doc, dict):
            raise _Reject(400, f'the JSON body must be an object with "instances" or "inputs", '
                               f"got {type(doc).__name__}")
        return doc

    def _predict_json(self, model: Any, doc: dict[str, Any]) -> Response:
        signature = doc.get("signature_name", SIGNATURE_NAME)
        if signature not in ("", SIGNATURE_NAME):
            raise _Reject(400, f"signature '{signature}' not found; the model has '{SIGNATURE_NAME}' only")
        has_rows, has_columns = "instances" in doc, "inputs" in doc
        if has_rows == has_columns:
            raise _Reject(400, 'the JSON body must have exactly one of "instances" (row format) '
                               'or "inputs" (columnar format)')
        ins, outs = input_specs(model), output_specs(model)
        values = self._rows(doc["instances"], ins) if has_rows else self._columns(doc["inputs"], ins)
        arrays = [coerce(to_array(v, s), s, raw_allowed=False) for v, s in zip(values, ins)]
        outputs = run_model(model, arrays, ins)
        names = [s.name for s in outs]
        ident, rows = self._observe(model, arrays, ins, outputs)
        if has_rows:
            batch = outputs[0].shape[0] if outputs and outputs[0].ndim else 1
            if len(outputs) == 1:
                predictions = outputs[0].tolist() if outputs[0].ndim else [outputs[0].tolist()]
            else:
                predictions = [{n: (o[i] if o.ndim else o).tolist() for n, o in zip(names, outputs)}
                               for i in range(batch)]
            body: dict[str, Any] = {"predictions": predictions}
        else:
            body = {"outputs": outputs[0].tolist() if len(outputs) == 1
                    else {n: o.tolist() for n, o in zip(names, outputs)}}
        body.update(prediction_id=ident, id=ident, model_version=str(model.version))
        if rows is not None and len(rows) > 1:
            body["prediction_ids"] = rows
        return json_response(200, body, {"X-Prediction-Id": ident, "X-Model-Version": str(model.version)})

    @staticmethod
    def _rows(instances: Any, specs: Sequence[TensorSpec]) -> list[Any]:
        """Row format -> one batched value per input (TF Serving: instance = one batch row)."""
        if not isinstance(instances, list) or not instances:
            raise _Reject(400, '"instances" must be a non-empty list with one entry per example')
        names = [s.name for s in specs]
        if all(isinstance(i, dict) for i in instances):
            for k, inst in enumerate(instances):
                if set(inst) != set(names):
                    raise _Reject(400, f"instance {k} has keys {sorted(inst)}; the model's inputs are {names}")
            return [[inst[n] for inst in instances] for n in names]
        if len(specs) != 1:
            raise _Reject(400, f"the model has {len(specs)} inputs {names}: each instance must be an object "
                               "with one key per input")
        if any(isinstance(i, dict) for i in instances):
            raise _Reject(400, "instances mix objects and plain values")
        return [instances]

    @staticmethod
    def _columns(inputs: Any, specs: Sequence[TensorSpec]) -> list[Any]:
        names = [s.name for s in specs]
        if isinstance(inputs, dict):
            if set(inputs) != set(names):
                missing, unknown = sorted(set(names) - set(inputs)), sorted(set(inputs) - set(names))
                raise _Reject(400, f'"inputs" must name the model\'s inputs {names}'
                                   + (f"; missing {missing}" if missing else "")
                                   + (f"; unknown {unknown}" if unknown else ""))
            return [inputs[n] for n in names]
        if len(specs) != 1:
            raise _Reject(400, f'the model has {len(specs)} inputs {names}: "inputs" must be an object '
                               "with one key per input")
        return [inputs]

    def _predict_npy(self, request: Request, model: Any, array: np.ndarray) -> Response:
        ins = input_specs(model)
        if len(ins) != 1:
            raise _Reject(400, f"a .npy body carries one tensor but the model has {len(ins)} inputs "
                               f"{[s.name for s in ins]}; send JSON instead")
        arrays = [coerce(array, ins[0], raw_allowed=True)]
        outputs = run_model(model, arrays, ins)
        ident, rows = self._observe(model, arrays, ins, outputs)
        headers = {"X-Prediction-Id": ident, "X-Model-Version": str(model.version)}
        if JSON_TYPE in request.header("Accept").lower():
            names = [s.name for s in output_specs(model)]
            body = {"outputs": outputs[0].tolist() if len(outputs) == 1
                    else {n: o.tolist() for n, o in zip(names, outputs)},
                    "prediction_id": ident, "id": ident, "model_version": str(model.version)}
            if rows is not None and len(rows) > 1:
                body["prediction_ids"] = rows
            return json_response(200, body, headers)
        return Response(200, {"Content-Type": NPY_TYPE, **headers}, encode_npy(outputs[0]))

    # after the model ran: drift statistics and prediction ids ---------------------------

    def _observe(self, model: Any, arrays: Sequence[np.ndarray], ins: Sequence[TensorSpec],
                 outputs: Sequence[np.ndarray]) -> tuple[str, list[str] | None]:
        """Feed the drift monitor and remember the predicted classes; (prediction_id, row ids).

        Neither may fail a request that the model answered: a problem here is logged and the
        answer goes out with a fresh, unremembered id.
        """
        try:
            monitor = self._monitor(model)
            if monitor is not None:
                monitor.observe([_real(model, i, a, s) for i, (a, s) in enumerate(zip(arrays, ins))], outputs)
            k = class_output(model)
            if k is None:
                return uuid.uuid4().hex, None
            classes = output_specs(model)[k].shape[-1]
            out = outputs[k]
            predicted = out.reshape(-1, classes).argmax(axis=1).tolist()
            return self.feedback.remember(model.name, model.version, classes, predicted)
        except Exception:
            log.exception("drift statistics / prediction memory failed for %s v%s", model.name, model.version)
            return uuid.uuid4().hex, None

    def _monitor(self, model: Any) -> DriftMonitor | None:
        key = (model.name, model.version, model.sha256)
        current = self._drift
        if current is not None and current[0] == key:
            return current[1]
        with self._drift_lock:
            if self._drift is None or self._drift[0] != key:   # another model: start a new window
                self._drift = (key, DriftMonitor.for_model(model, window=self.drift_window))
            return self._drift[1]

    def drift_report(self) -> dict[str, Any] | None:
        """The telemetry ``drift`` document of the model being served, or None (no profile, too few inferences)."""
        model = self.slot.get()
        current = self._drift
        if model is None or current is None or current[1] is None \
                or current[0] != (model.name, model.version, model.sha256):
            return None
        return current[1].report()

    def feedback_report(self) -> dict[str, Any] | None:
        """The telemetry ``feedback`` document of the model being served, or None before its first label."""
        model = self.slot.get()
        return None if model is None else self.feedback.report(model.name, model.version)

    def _feedback(self, request: Request, name: str) -> Response:
        try:
            doc = json.loads(request.body) if request.body else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Reject(400, f"malformed JSON body: {exc}") from None
        items, listed = parse_labels(doc)
        model = self.slot.get()
        if model is None:
            raise _Reject(503, "no model is loaded on this device yet, so no prediction can be labelled")
        if name != model.name:
            raise _Reject(404, f"model '{name}' is not served here; this device serves '{model.name}' "
                               f"(version {model.version})")
        k = class_output(model)
        if k is None:
            raise _Reject(400, f"model '{name}' v{model.version} has no class output (an output of shape [1, C]): "
                               "field labels are class indexes and cannot be matched to its answers")
        classes = output_specs(model)[k].shape[-1]
        self.feedback.check(name, items)
        results = self.feedback.record(name, model.version, classes, items)
        if not listed:
            result = results[0]
            if not result.matched:
                raise _Reject(404, f"prediction id {result.prediction_id} is unknown or expired: this agent remembers "
                                   f"the last {self.feedback.capacity} predictions (api.feedback_window) and none "
                                   "from before a restart; the label is counted as unmatched")
            return json_response(200, result.to_dict())
        matched = sum(r.matched for r in results)
        return json_response(200, {"recorded": matched, "unmatched": len(results) - matched,
                                   "results": [r.to_dict() for r in results]})


def class_output(model: Any) -> int | None:
    """The index of the model's first class output (shape [1, C], C >= 2), or None."""
    for k, spec in enumerate(output_specs(model)):
        if len(spec.shape) == 2 and spec.shape[0] == 1 and spec.shape[1] >= 2:
            return k
    return None


def _real(model: Any, index: int, array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """An input as real values: a raw quantized .npy body is dequantized with the engine's parameters."""
    if array.dtype.kind == "f" or not spec.quantized:
        return array
    engine_specs = getattr(model, "input_specs", None)
    if engine_specs is None:
        return array.astype(np.float32)
    return engine_specs[index].dequantize(array)


# --------------------------------------------------------------------------- the socket server

class _Handler(BaseHTTPRequestHandler):
    """Reads one request at a time from a keep-alive connection and writes the dispatcher's answer."""

    protocol_version = "HTTP/1.1"
    server_version = f"litefleet-agent/{__version__}"
    sys_version = ""  # do not advertise the Python version
    server: "_ServerMixin"

    def setup(self) -> None:
        super().setup()
        sock = self.connection
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # small JSON answers must not wait for the peer's delayed ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self, busy=False)
        hook = self.server.owner.on_accept
        if hook is not None:
            hook(sock)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self)

    def parse_request(self) -> bool:
        self.server.set_busy(self, True)
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        # refuse an oversized body before the client sends it
        try:
            length = self._content_length()
        except _Reject as exc:
            self._send(error_response(exc.status, exc.message), close=True)
            return False
        too_big = None if length is None else self.server.owner.api.body_too_large(length)
        if too_big is not None:
            self._send(too_big, close=True)
            return False
        return super().handle_expect_100()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        finally:
            self.server.set_busy(self, False)
            if self.server.stopping:
                self.close_connection = True

    def _content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None:
            return None
        try:
            length = int(value)
        except ValueError:
            length = -1
        if length < 0:
            raise _Reject(400, f"invalid Content-Length: {value!r}")
        return length

    def _read_body(self) -> bytes:
        api = self.server.owner.api
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(api.max_body_bytes)
        length = self._content_length()
        if length is None:
            return b""
        too_big = api.body_too_large(length)
        if too_big is not None:
            raise _Reject(413, json.loads(too_big.body)["error"])
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionError("client closed the connection before sending the whole body")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _Reject(400, "malformed chunked body") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > limit:
                raise _Reject(413, f"request body exceeds {limit} bytes (api max_body_bytes); "
                                   "send smaller batches")
            parts.append(self.rfile.read(size))
            self.rfile.readline(3)

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except _Reject as exc:
            # the unread body would be taken for the next request: answer and close
            self._send(error_response(exc.status, exc.message), close=True)
            return
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True
            return
        via = "unix" if isinstance(self.server, _UnixServer) else "tcp"
        request = Request(self.command, self.path, dict(self.headers.items()), body, via)
        self._send(self.server.owner.api.handle(request))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def _send(self, response: Response, close: bool = False) -> None:
        """Write status line, headers and body in one send (one packet for small answers)."""
        if close:
            self.close_connection = True
        self.log_request(response.status, len(response.body))
        try:
            phrase = HTTPStatus(response.status).phrase
        except ValueError:
            phrase = ""
        lines = [f"{self.protocol_version} {response.status} {phrase}",
                 f"Server: {self.version_string()}", f"Date: {email.utils.formatdate(usegmt=True)}",
                 *(f"{k}: {v}" for k, v in response.headers.items()),
                 f"Content-Length: {len(response.body)}"]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + response.body if self.command != "HEAD" else head)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (bad request line, unknown method, header too long) as JSON."""
        text = message or HTTPStatus(code).phrase
        if code == 501 and getattr(self, "command", None):
            code, text = 405, f"{self.command} is not allowed; use GET or POST"
        self._send(error_response(code, text), close=True)

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _ServerMixin:
    """Connection bookkeeping shared by the TCP and Unix-socket servers, for a clean stop()."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    owner: "InferenceServer"

    def init_tracking(self, owner: "InferenceServer") -> None:
        self.owner = owner
        self.stopping = False
        self._conns: dict[_Handler, bool] = {}
        self._conns_cond = threading.Condition()

    def track(self, handler: _Handler, busy: bool) -> None:
        with self._conns_cond:
            self._conns[handler] = busy

    def set_busy(self, handler: _Handler, busy: bool) -> None:
        with self._conns_cond:
            if handler in self._conns:
                self._conns[handler] = busy

    def untrack(self, handler: _Handler) -> None:
        with self._conns_cond:
            self._conns.pop(handler, None)
            self._conns_cond.notify_all()

    def close_connections(self, timeout: float) -> bool:
        """Close idle keep-alive connections now, let busy ones finish their request; True if all closed."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        with self._conns_cond:
            while self._conns:
                for handler, busy in list(self._conns.items()):
                    if not busy:
                        try:
                            handler.connection.shutdown(socket.SHUT_RD)  # its readline sees EOF
                        except OSError:
                            pass
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._conns_cond.wait(min(left, 0.05))
        return True


class _TCPServer(_ServerMixin, ThreadingHTTPServer):
    allow_reuse_address = True


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(_ServerMixin, ThreadingHTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        path = Path(self.server_address)
        _remove_stale_socket(path)
        old_umask = os.umask(0o177)  # owner only until the group is set: never open, even for an instant
        try:
            self.socket.bind(str(path))
        finally:
            os.umask(old_umask)
        if self.owner_socket_group is not None:
            _give_to_group(path, self.owner_socket_group)
        os.chmod(path, self.owner_socket_mode)
        self.server_address = str(path)
        self.server_name, self.server_port = "localhost", 0

    owner_socket_mode = 0o660
    owner_socket_group: str | None = None


def _give_to_group(path: Path, group: str) -> None:
    """Make ``group`` the socket's group, so that its members (the applications) may connect."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        path.unlink(missing_ok=True)
        raise ConfigError(f"api.socket_group: there is no group {group!r} on this system; create it "
                          f"(groupadd --system {group}; `litefleet-agent install` does) or set socket_group = \"\"") \
            from None
    parent = path.parent.stat()
    if not parent.st_mode & stat.S_IXOTH and not (parent.st_gid == gid and parent.st_mode & stat.S_IXGRP):
        log.warning("members of %s cannot reach %s: its directory %s is mode %04o; put the socket in a directory "
                    "they may enter (the unit's /run/litefleet is 0755)", group, path, path.parent,
                    stat.S_IMODE(parent.st_mode))
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        path.unlink(missing_ok=True)
        raise ConfigError(f"api.socket_group: the agent (uid {os.geteuid()}) cannot give {path} to group {group!r}: "
                          f"it must be a member (the unit's SupplementaryGroups= lists {group}) or root") from None


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead agent; refuse if a live server answers on it."""
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise AgentError(f"{path} exists and is not a socket; remove it or set api.unix_socket to another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise AgentError(f"another process is serving on {path}; stop it or set api.unix_socket to another path")


class InferenceServer:
    """The inference API on a Unix socket and/or TCP, on background threads.

    The socket is mode ``socket_mode`` (0660) and, with ``socket_group``, owned by that group:
    its members may connect. TCP needs ``tokens``: every request over it must present one.
    """

    def __init__(self, slot: ModelSlot, *, tcp: tuple[str, int] | None = None,
                 unix_socket: Path | str | None = None, on_inference: OnInference | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, socket_mode: int = 0o660,
                 socket_group: str | None = None, tokens: TokenSet | None = None,
                 feedback: FeedbackBook | None = None, drift_window: int = DEFAULT_WINDOW,
                 idle_timeout_s: float = 120.0,
                 on_accept: Callable[[socket.socket], None] | None = None) -> None:
        if tcp is None and unix_socket is None:
            raise AgentError("the inference API needs a Unix socket path or a TCP address "
                             "(api.unix_socket / api.tcp_port)")
        if tcp is not None and not tokens:
            raise ConfigError("the inference API's TCP listener needs bearer tokens (api.tokens_file): without them "
                              "any local process could ask the model; set api.tcp_port = 0 to serve the socket only")
        self.slot = slot
        self.access = AccessControl(tokens if tcp is not None else None)
        self.api = InferenceApi(slot, on_inference=on_inference, max_body_bytes=max_body_bytes, access=self.access,
                                feedback=feedback, drift_window=drift_window)
        self.on_accept = on_accept   # test/diagnostic hook: called with each accepted socket
        self._tcp = tcp
        self._unix = Path(unix_socket) if unix_socket is not None else None
        self._socket_mode = socket_mode
        self._socket_group = socket_group or None
        self._idle_timeout = idle_timeout_s
        self._servers: list[_ServerMixin] = []
        self._threads: list[threading.Thread] = []

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        for server in self._servers:
            if isinstance(server, _TCPServer):
                host, port = server.server_address[:2]
                return str(host), int(port)
        return None

    @property
    def unix_socket(self) -> Path | None:
        return self._unix

    def start(self) -> int | None:
        """Bind and serve on background threads; return the bound TCP port (None without TCP)."""
        if self._servers:
            raise AgentError("the inference server is already started")
        handler = type("Handler", (_Handler,), {"timeout": self._idle_timeout})
        try:
            if self._tcp is not None:
                cls = _TCP6Server if ":" in self._tcp[0] else _TCPServer
                tcp = cls(self._tcp, handler, bind_and_activate=False)
                tcp.init_tracking(self)
                try:
                    tcp.server_bind()
                    tcp.server_activate()
                except OSError as exc:
                    tcp.server_close()
                    raise AgentError(f"cannot listen on {self._tcp[0]}:{self._tcp[1]} ({exc.strerror or exc}); "
                                     "set api.tcp_port to a free port, or 0 to turn TCP off") from None
                self._servers.append(tcp)
            if self._unix is not None:
                unix = _UnixServer(str(self._unix), handler, bind_and_activate=False)
                unix.init_tracking(self)
                unix.owner_socket_mode = self._socket_mode
                unix.owner_socket_group = self._socket_group
                try:
                    unix.server_bind()
                    unix.server_activate()
                except OSError as exc:
                    unix.server_close()
                    raise AgentError(f"cannot listen on {self._unix} ({exc.strerror or exc}); "
                                     "check the directory's permissions or set api.unix_socket") from None
                except BaseException:
                    unix.server_close()
                    raise
                self._servers.append(unix)
        except BaseException:
            self._close_servers()
            raise
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                      name=f"inference-api-{type(server).__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        address = self.tcp_address
        return address[1] if address else None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close idle connections, let running requests finish (up to ``timeout``)."""
        for server in self._servers:
            server.shutdown()
        for server in self._servers:
            if not server.close_connections(timeout):
                log.warning("inference API: requests still running %.1f s after stop", timeout)
        for thread in self._threads:
            thread.join(timeout)
        self._close_servers()

    def _close_servers(self) -> None:
        for server in self._servers:
            server.server_close()
            if isinstance(server, _UnixServer):
                try:
                    os.unlink(server.server_address)
                except OSError:
                    pass
        self._servers, self._threads = [], []

    def __enter__(self) -> "InferenceServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
