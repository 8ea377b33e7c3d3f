"""The fleet server's HTTP API: JSON over stdlib ``http.server``, a bearer token, the dashboard's files.

Why two layers: :class:`ServerApi` is a pure function of a :class:`Request` (method, path, query,
headers, body) to a :class:`Response`; it holds no socket, so every route, every 4xx and the
token check are unit-tested without a network. :class:`ApiServer` only moves bytes between a
``ThreadingHTTPServer`` and ``ServerApi.handle``.

Authentication: every ``/api/v1/...`` route needs ``Authorization: Bearer <token>``; the token
is random, written once to ``<data_dir>/api-token`` (mode 0600) by :func:`ensure_token` and read
by ``litefleet fleet`` from that file. ``/metrics`` needs no token unless the server is told so
(``metrics_token=True``), because Prometheus scrapers are usually configured without one.
``/api/openapi.json`` is public (it describes, it holds no data).

The dashboard: the static files of ``fleet/web/`` (``/`` -> index.html, ``/devices/{id}`` ->
device.html, anything else by its path) are served WITHOUT a token, since a browser cannot
send a header on navigation. The server prints the dashboard URL as
``http://HOST:PORT/#token=<token>`` (:func:`dashboard_url`); the fragment never reaches the
server nor its logs; the page's JS reads it, keeps it in ``sessionStorage`` (per tab, gone when
the tab closes), removes it from the address bar, and sends it as ``Authorization: Bearer`` on
every ``fetch`` of the API. Static files hold no fleet data, so serving them openly leaks nothing.

Bound to 127.0.0.1 unless told otherwise. A handler exception becomes a 500 with a message and
a log line with the traceback; the server keeps serving.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import mimetypes
import os
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("litefleet.api")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8600
TOKEN_FILE = "api-token"
WEB_DIR = Path(__file__).resolve().parent / "web"
MAX_BODY_BYTES = 64 * 1024
SERIES_METRICS = ("p95_ms", "inferences_per_s")
SERIES_BY = ("model_version", "all")
RESOLUTIONS = ("auto", "raw", "minute", "hour")
DEVICE_HISTORY_S = 3600.0
MAX_EVENTS = 1000
MAX_ALERTS = 10_000

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
    ".map": "application/json", ".txt": "text/plain; charset=utf-8", ".woff2": "font/woff2",
}


# Token ------------------------------------------------------------------------------------

def ensure_token(data_dir: str | os.PathLike[str]) -> str:
    """The API token in ``<data_dir>/api-token``: created (0600, 256 random bits) on first start, then reused."""
    path = Path(data_dir) / TOKEN_FILE
    try:
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    try:
        os.link(tmp, path)          # atomic and never overwrites a token another process just wrote
    except FileExistsError:
        token = path.read_text(encoding="utf-8").strip()
    finally:
        tmp.unlink(missing_ok=True)
    return token


def dashboard_url(base_url: str, token: str) -> str:
    """The URL to open the dashboard with: the token rides in the fragment, which browsers never send."""
    return f"{base_url.rstrip('/')}/#token={urllib.parse.quote(token, safe='')}"


# Request / response -------------------------------------------------------------------------

@dataclass
class Request:
    method: str
    path: str                                   # without the query string, still percent-encoded
    query: dict[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def from_target(cls, method: str, target: str, headers: Mapping[str, str] | None = None,
                    body: bytes = b"") -> "Request":
        """Split a request target (``/api/v1/devices?group=a``) into path and query."""
        parts = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        return cls(method.upper(), parts.path or "/", query, dict(headers or {}), body)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lname:
                return value
        return None


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpError(Exception):
    """A request the API refuses; ``status`` is the 4xx code, the message goes into ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


def _clean(value: Any) -> Any:
    """JSON has no NaN/Infinity: they become null instead of an invalid document."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def json_response(status: int, doc: Any, headers: Mapping[str, str] | None = None) -> Response:
    body = json.dumps(_clean(doc), separators=(",", ":"), allow_nan=False, default=str).encode("utf-8")
    return Response(status, {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})},
                    body)


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return json_response(status, {"error": message}, headers)


# Query parameters ---------------------------------------------------------------------------

class Query:
    """Typed access to query parameters; every mistake is a 400 naming the parameter."""

    def __init__(self, raw: Mapping[str, list[str]], known: tuple[str, ...], now: float) -> None:
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise HttpError(400, f"unknown query parameter {unknown[0]!r} (this endpoint takes: "
                                 f"{', '.join(known) or 'none'})")
        self.raw = raw
        self.now = now

    def str(self, name: str) -> str | None:
        values = self.raw.get(name)
        if not values or values[-1] == "":
            return None
        return values[-1]

    def list(self, name: str) -> list[str] | None:
        """Repeated (``kind=a&kind=b``) or comma-separated (``kind=a,b``) values."""
        out = [v.strip() for value in self.raw.get(name, []) for v in value.split(",") if v.strip()]
        return out or None

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.str(name) or default
        if value not in choices:
            raise HttpError(400, f"query parameter {name}: must be one of {', '.join(choices)}, got {value!r}")
        return value

    def time(self, name: str, default: float | None) -> float | None:
        """Epoch seconds; a negative or zero number means that many seconds before now (``since=-3600``)."""
        value = self.str(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise HttpError(400, f"query parameter {name}: expected epoch seconds or a negative number of "
                                 f"seconds before now (e.g. -3600), got {value!r}") from None
        if not math.isfinite(number):
            raise HttpError(400, f"query parameter {name}: must be a finite number, got {value!r}")
        return self.now + number if number <= 0 else number

    def int(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.str(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise HttpError(400, f"query parameter {name}: expected an integer, got {value!r}") from None
        if not lo <= number <= hi:
            raise HttpError(400, f"query parameter {name}: must be between {lo} and {hi}, got {number}")
        return number


# The API ------------------------------------------------------------------------------------

Handler = Callable[[Request, Query, dict[str, str]], Response]


@dataclass(frozen=True)
class Route:
    """One endpoint: ``pattern`` is the documented path (``/api/v1/devices/{id}``), matched segment-wise."""

    method: str
    pattern: str
    handler: str                     # name of the ServerApi method
    params: tuple[str, ...] = ()     # accepted query parameters
    auth: bool = True

    def regex(self) -> re.Pattern[str]:
        parts = []
        for segment in self.pattern.strip("/").split("/"):
            m = re.fullmatch(r"\{(\w+)\}", segment)
            parts.append(f"(?P<{m.group(1)}>[^/]+)" if m else re.escape(segment))
        return re.compile("^/" + "/".join(parts) + "$")


ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/v1/devices", "_devices", ("group", "profile")),
    Route("GET", "/api/v1/devices/{id}", "_device", ("since",)),
    Route("GET", "/api/v1/devices/{id}/telemetry", "_device_telemetry", ("since", "until", "resolution")),
    Route("GET", "/api/v1/series", "_series", ("metric", "since", "by")),
    Route("GET", "/api/v1/events", "_events", ("device", "command", "kind", "since", "limit")),
    Route("GET", "/api/v1/alerts", "_alerts", ("all", "limit")),
    Route("GET", "/api/v1/ingest", "_ingest", ()),
    Route("GET", "/api/v1/keys", "_keys", ("group", "profile")),
    Route("GET", "/api/v1/quality", "_quality", ("model",)),
    Route("GET", "/api/v1/models/{name}/versions/{version}/quality", "_model_quality", ()),
    Route("GET", "/api/openapi.json", "_openapi", (), auth=False),
    Route("GET", "/metrics", "_metrics", ()),          # auth decided by ServerApi.metrics_token
)
_COMPILED = [(route, route.regex()) for route in ROUTES]


class ServerApi:
    """The API as a pure function: ``handle(Request) -> Response``. Thread-safe if the store is.

    ``store``: a :class:`fleet.store.Store` (or anything with its read methods).
    ``ingest_stats``: a callable returning the ingestor's stats dict (None when nothing ingests).
    ``metrics``: a callable returning ``(body, content_type)`` for ``/metrics`` (see
    :func:`fleet.metrics.exposition`); None builds one over ``store`` and ``ingest_stats``.
    ``metrics_token``: require the bearer token on ``/metrics`` too.
    ``blob_store``: the repository (:class:`fleet.repository.BlobStore`), whose manifests hold the
    converter's accuracy figures shown beside the field's; None shows the field's alone.
    ``drift_threshold``: the drift score (PSI) over which a device counts as drifting.
    """

    def __init__(self, store: Any, token: str, *, ingest_stats: Callable[[], Mapping[str, Any]] | None = None,
                 web_dir: str | os.PathLike[str] | None = None,
                 metrics: Callable[[], tuple[bytes, str]] | None = None, metrics_token: bool = False,
                 clock: Callable[[], float] = time.time, blob_store: Any = None,
                 drift_threshold: float | None = None) -> None:
        from fleet.quality import DEFAULT_DRIFT_THRESHOLD
        if not token:
            raise ValueError("the API needs a non-empty token")
        self.blob_store = blob_store
        self.drift_threshold = DEFAULT_DRIFT_THRESHOLD if drift_threshold is None else float(drift_threshold)
        self._manifest_cache: dict[str, tuple[str, int, dict[str, Any]] | None] = {}
        self._manifest_lock = threading.Lock()
        self.store = store
        self._token = token.encode("utf-8")
        self.ingest_stats = ingest_stats
        self.web_dir = Path(web_dir) if web_dir is not None else WEB_DIR
        self.metrics_token = metrics_token
        self.clock = clock
        if metrics is None:
            from fleet.metrics import exposition, make_registry
            registry = make_registry(store, ingest_stats, drift_threshold=self.drift_threshold)
            metrics = lambda: exposition(registry)  # noqa: E731
        self._render_metrics = metrics

    # dispatch -----------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Answer one request; never raises (a bug is a 500 with its message)."""
        try:
            return self._dispatch(request)
        except HttpError as exc:
            return error_response(exc.status, str(exc), exc.headers)
        except Exception as exc:  # noqa: BLE001 - the server must keep serving whatever a handler does
            names = {cls.__name__ for cls in type(exc).__mro__}
            if names & {"StoreUnavailableError", "OperationalError", "InterfaceError"}:
                log.warning("%s %s: database unavailable: %s", request.method, request.path, exc)
                return error_response(503, f"database unavailable, retry later: {exc}", {"Retry-After": "5"})
            if "StoreError" in names:       # the store refused an argument: the caller's mistake
                return error_response(400, str(exc))
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def _dispatch(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/api/") or path == "/metrics":
            for route, regex in _COMPILED:
                m = regex.match(path)
                if m is None:
                    continue
                if route.auth and (route.pattern != "/metrics" or self.metrics_token):
                    self._check_token(request)
                if request.method not in (route.method, "HEAD"):
                    raise HttpError(405, f"method {request.method} not allowed on {route.pattern} "
                                         f"(allowed: {route.method})", {"Allow": route.method})
                params = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
                query = Query(request.query, route.params, self.clock())
                response: Response = getattr(self, route.handler)(request, query, params)
                return response
            if path.startswith("/api/v1/"):
                self._check_token(request)       # do not reveal which paths exist to a caller without a token
            raise HttpError(404, f"no such endpoint: {path} (see /api/openapi.json)")
        return self._static(request)

    def _check_token(self, request: Request) -> None:
        challenge = {"WWW-Authenticate": 'Bearer realm="litefleet"'}
        value = request.header("Authorization")
        if not value:
            raise HttpError(401, "missing bearer token: send 'Authorization: Bearer <token>' with the token "
                                 "from the server's data directory (api-token)", challenge)
        scheme, _, presented = value.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise HttpError(401, "the Authorization header must be 'Bearer <token>'", challenge)
        if not hmac.compare_digest(presented.strip().encode("utf-8"), self._token):
            raise HttpError(401, "invalid token: use the one in the server's data directory (api-token)", challenge)

    # handlers -----------------------------------------------------------------------------

    def _devices(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        devices = self.store.devices(group=q.str("group"), profile=q.str("profile"))
        return json_response(200, {"devices": devices, "summary": self._summary(devices)})

    def _summary(self, devices: list[dict[str, Any]]) -> dict[str, Any]:
        online = sum(1 for d in devices if d.get("online"))
        ids = {d.get("device_id") for d in devices}
        alerts = [a for a in self.store.alerts(active_only=True, limit=MAX_ALERTS) if a.get("device_id") in ids]
        by_kind: dict[str, int] = {}
        for alert in alerts:
            by_kind[alert.get("kind", "?")] = by_kind.get(alert.get("kind", "?"), 0) + 1
        drifting = sum(1 for d in devices if (d.get("drift") or {}).get("score") is not None
                       and float(d["drift"]["score"]) > self.drift_threshold)
        return {"online": online, "offline": len(devices) - online, "total": len(devices),
                "lost": sum(int(d.get("lost") or 0) for d in devices),
                "pending_deployments": sum(1 for d in devices if d.get("pending_deployment")),
                "alerts": len(alerts), "alerts_by_kind": by_kind, "time": self.clock(),
                "drifting": drifting, "drift_threshold": self.drift_threshold}

    def _device(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        device_id = p["id"]
        device = self.store.device(device_id)
        if device is None:
            raise HttpError(404, f"unknown device {device_id!r}")
        since = q.time("since", self.clock() - DEVICE_HISTORY_S)
        telemetry = self.store.telemetry(device_id, since=since)
        events = self.store.events(device_id=device_id, limit=50)
        alerts = [a for a in self.store.alerts(active_only=False, limit=MAX_ALERTS)
                  if a.get("device_id") == device_id][:50]
        return json_response(200, {"device": device, "since": since, "telemetry": telemetry, "events": events,
                                   "alerts": alerts, "quality": self._device_quality(device_id)})

    def _device_telemetry(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        device_id = p["id"]
        if self.store.device(device_id) is None:
            raise HttpError(404, f"unknown device {device_id!r}")
        since = q.time("since", self.clock() - DEVICE_HISTORY_S)
        until = q.time("until", None)
        if until is not None and since is not None and until < since:
            raise HttpError(400, "query parameter until: is before since")
        resolution = q.choice("resolution", RESOLUTIONS, "auto")
        rows = self.store.telemetry(device_id, since=since, until=until, resolution=resolution)
        return json_response(200, {"device_id": device_id, "since": since, "until": until,
                                   "resolution": resolution, "telemetry": rows})

    def _series(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        if q.str("metric") is None:
            raise HttpError(400, f"query parameter metric: required, one of {', '.join(SERIES_METRICS)}")
        metric = q.choice("metric", SERIES_METRICS, "p95_ms")
        by = q.choice("by", SERIES_BY, "model_version")
        since = q.time("since", self.clock() - DEVICE_HISTORY_S)
        series = self.store.series(since=since, metric=metric, by=by)
        return json_response(200, {"metric": metric, "by": by, "since": since,
                                   "series": {str(k): [[t, v] for t, v in points] for k, points in series.items()}})

    def _events(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        events = self.store.events(device_id=q.str("device"), command_id=q.str("command"), kinds=q.list("kind"),
                                   since=q.time("since", None), limit=q.int("limit", 200, 1, MAX_EVENTS))
        return json_response(200, {"events": events})

    def _alerts(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        flag = (q.str("all") or "0").lower()
        if flag not in ("0", "1", "true", "false"):
            raise HttpError(400, f"query parameter all: must be 0/1/true/false, got {flag!r}")
        limit = q.int("limit", 500, 1, MAX_ALERTS)
        return json_response(200, {"alerts": self.store.alerts(active_only=flag in ("0", "false"), limit=limit)})

    def _keys(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        """Devices' X25519 public keys, for encrypting bundles (``litefleet fleet keys``)."""
        from agent.protocol.errors import KeyFileError
        from agent.protocol.keys import x25519_from_b64, x25519_key_id
        group, profile = q.str("group"), q.str("profile")
        found, without = [], []
        for d in self.store.device_keys():
            if (profile and d["profile"] != profile) or (group and group not in d["groups"]):
                continue
            raw = d["public_keys"].get("x25519")
            try:
                key_id = x25519_key_id(x25519_from_b64(raw, d["device_id"])) if raw else None
            except KeyFileError:
                key_id = None  # a malformed key is listed as none: nothing could be encrypted for it
            if key_id is None:
                without.append(d["device_id"])
                continue
            found.append({"device_id": d["device_id"], "fleet": d["fleet"], "profile": d["profile"],
                          "groups": d["groups"], "online": d["online"], "status_ts": d["status_ts"],
                          "x25519": raw, "key_id": key_id})
        return json_response(200, {"keys": found, "without_key": without})

    def _ingest(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        if self.ingest_stats is None:
            return json_response(200, {"running": False})
        return json_response(200, {"running": True, **dict(self.ingest_stats())})

    # model quality (docs/quality.md) ------------------------------------------------------

    def _device_quality(self, device_id: str) -> dict[str, Any]:
        """Per model version this device reported on: its drift and field accuracy."""
        from fleet.quality import confusion_metrics
        rows = []
        for r in self.store.quality(device_id=device_id):
            fb = r.get("feedback")
            drift = r.get("drift")
            rows.append({"name": r["model_name"], "version": r["model_version"], "current": r["current"],
                         "drift": drift, "drifting": bool(drift) and float(drift["score"]) > self.drift_threshold,
                         "labels": (fb or {}).get("labels"), "unmatched": (fb or {}).get("unmatched"),
                         "accuracy": confusion_metrics(fb["confusion"])["accuracy"] if fb else None})
        rows.sort(key=lambda r: (not r["current"], r["name"], -r["version"]))
        return {"drift_threshold": self.drift_threshold, "models": rows}

    def _quality(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        from fleet.quality import group_rows, version_quality
        model = q.str("model")
        groups = group_rows(self.store.quality(model_name=model))
        models = [version_quality(name, version, rows, self._manifests(name, version),
                                  threshold=self.drift_threshold, detail=False)
                  for (name, version), rows in groups.items()]
        return json_response(200, {"drift_threshold": self.drift_threshold, "models": models})

    def _model_quality(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        from fleet.quality import version_quality
        name, raw = p["name"], p["version"]
        try:
            version = int(raw.removeprefix("v"))
        except ValueError:
            raise HttpError(400, f"version {raw!r}: expected a positive integer (3 or v3)") from None
        rows = self.store.quality(model_name=name, model_version=version)
        manifests = self._manifests(name, version)
        if not rows and not manifests:
            raise HttpError(404, f"no quality reports for {name} v{version} and no such bundle in the repository "
                                 f"(`litefleet fleet quality {name}` lists the versions with reports)")
        return json_response(200, version_quality(name, version, rows, manifests, threshold=self.drift_threshold))

    def _manifests(self, name: str, version: int) -> list[dict[str, Any]]:
        """The repository's manifests of ``name`` v``version`` (one per profile); blobs never change, so cached."""
        if self.blob_store is None:
            return []
        found = []
        with self._manifest_lock:
            for blob_id in self.blob_store.list():
                if blob_id not in self._manifest_cache:
                    stored = self.blob_store.get(blob_id)
                    self._manifest_cache[blob_id] = (None if stored is None else
                                                     (stored.manifest.name, stored.manifest.version,
                                                      stored.manifest.doc))
                entry = self._manifest_cache[blob_id]
                if entry is not None and entry[0] == name and entry[1] == version:
                    found.append(entry[2])
        return found

    def _openapi(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        from fleet.openapi import OPENAPI
        return json_response(200, OPENAPI, {"Cache-Control": "max-age=60"})

    def _metrics(self, request: Request, q: Query, p: dict[str, str]) -> Response:
        body, content_type = self._render_metrics()
        return Response(200, {"Content-Type": content_type, "Cache-Control": "no-store"}, body)

    # static files -------------------------------------------------------------------------

    def _static(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise HttpError(405, f"method {request.method} not allowed on the dashboard's files (allowed: GET)",
                            {"Allow": "GET"})
        path = urllib.parse.unquote(request.path)
        if path in ("/", "/index.html"):
            name = "index.html"
        elif re.fullmatch(r"/devices/[^/]+/?", path):
            name = "device.html"
        else:
            name = path.lstrip("/")
        file = self._resolve_static(name)
        if file is None:
            raise HttpError(404, f"not found: {request.path}")
        content_type = CONTENT_TYPES.get(file.suffix.lower()) or mimetypes.guess_type(file.name)[0] \
            or "application/octet-stream"
        headers = {"Content-Type": content_type, "X-Content-Type-Options": "nosniff",
                   "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}
        return Response(200, headers, file.read_bytes())

    def _resolve_static(self, name: str) -> Path | None:
        """The file under web_dir, or None: no '..', no hidden files, no escaping through symlinks."""
        segments = name.split("/")
        if any(s in ("", ".", "..") or s.startswith(".") or "\\" in s or "\x00" in s for s in segments):
            return None
        root = self.web_dir.resolve()
        try:
            candidate = (root / name).resolve()
        except (OSError, ValueError):
            return None
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
        return candidate


# The socket server --------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    server_version = "litefleet"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    api: ServerApi   # set on the subclass made per server

    def _serve(self) -> None:
        length = self.headers.get("Content-Length")
        body = b""
        try:
            size = int(length) if length else 0
        except ValueError:
            size = -1
        if size < 0 or size > MAX_BODY_BYTES:
            response = error_response(400 if size < 0 else 413, "bad Content-Length" if size < 0
                                      else f"request body over {MAX_BODY_BYTES} bytes")
            self.close_connection = True
        else:
            body = self.rfile.read(size) if size else b""
            request = Request.from_target(self.command, self.path, dict(self.headers.items()), body)
            response = self.api.handle(request)
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s %s", self.address_string(), format % args)


class ApiServer:
    """A ``ThreadingHTTPServer`` around a :class:`ServerApi`, served from a daemon thread.

    ``port=0`` picks a free port (tests); ``url`` tells which. ``start``/``stop`` or a ``with`` block.
    """

    def __init__(self, api: ServerApi, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        handler = type("LitefleetApiHandler", (_Handler,), {"api": api})
        self.api = api
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def start(self) -> "ApiServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="litefleet-api", daemon=True)
        self._thread.start()
        log.info("HTTP API on %s", self.url)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_api(store: Any, data_dir: str | os.PathLike[str], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
              ingest_stats: Callable[[], Mapping[str, Any]] | None = None, metrics_token: bool = False,
              web_dir: str | os.PathLike[str] | None = None, blob_store: Any = None,
              drift_threshold: float | None = None) -> tuple[ApiServer, str]:
    """What ``litefleet server`` calls: make or reuse the token, serve the API, return (server, token).

    The log line names the token file, never the token (logs end up in journals); a caller that
    talks to a person may print :func:`dashboard_url` itself.
    """
    token = ensure_token(data_dir)
    server = ApiServer(ServerApi(store, token, ingest_stats=ingest_stats, web_dir=web_dir,
                                 metrics_token=metrics_token, blob_store=blob_store,
                                 drift_threshold=drift_threshold), host, port).start()
    if host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("the HTTP API listens on %s, beyond this machine, over plain HTTP: put TLS in front of it",
                    server.url)
    log.info("dashboard: %s/#token=<the token in %s>", server.url, Path(data_dir) / TOKEN_FILE)
    return server, token


__all__ = ["ApiServer", "HttpError", "Request", "Response", "ROUTES", "ServerApi", "dashboard_url",
           "ensure_token", "start_api", "DEFAULT_HOST", "DEFAULT_PORT", "TOKEN_FILE"]
