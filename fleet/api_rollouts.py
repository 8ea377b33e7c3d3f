"""The rollout endpoints of the HTTP API, as a pure handler the server mounts.

``RolloutApi.handle(method, path, body) -> (status, doc)`` holds no socket: every route and every
4xx is unit-testable. :class:`MountedApi` puts it in front of :class:`fleet.api.ServerApi` (same
bearer token, same JSON and error shapes) until the server composes it itself.

    GET  /api/v1/rollouts                      -> {"rollouts": [summary...]}   (see RolloutStore.list)
    POST /api/v1/rollouts                      -> 201 {"rollout": state}   body: see create_rollout
    GET  /api/v1/rollouts/{id}                 -> {"rollout": state with devices and history}
    POST /api/v1/rollouts/{id}/pause|resume|abort -> {"rollout": state}   body: {"reason": "..."} optional

A summary carries what the dashboard's Rollouts panel draws without the device rows: state and
reason, stage of N with every stage's cumulative size, devices by state, versions per profile,
the breach, and the last health verdict of the stage's updated devices against their baseline.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from fleet.rollout import RolloutError
from fleet.rollout_runner import create_rollout
from fleet.rollout_store import RolloutConflict, RolloutNotFound, RolloutStore

PREFIX = "/api/v1/rollouts"
_ONE = re.compile(r"^/api/v1/rollouts/([A-Za-z0-9._-]{1,100})$")
_ACT = re.compile(r"^/api/v1/rollouts/([A-Za-z0-9._-]{1,100})/(pause|resume|abort)$")
ACTIONS = ("pause", "resume", "abort")
# (method, path pattern) of every route, as fleet/openapi.py documents them
ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", PREFIX), ("POST", PREFIX), ("GET", PREFIX + "/{id}"),
    *(("POST", f"{PREFIX}/{{id}}/{action}") for action in ACTIONS),
)


class RolloutApi:
    def __init__(self, store: Any, *, fleet: str, blob_store: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.rollouts = RolloutStore(store)
        self.fleet = fleet
        self.blob_store = blob_store
        self.clock = clock

    def handles(self, path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    def handle(self, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict[str, Any]]:
        """Answer one request; errors are ``(4xx, {"error": message})``."""
        try:
            return self._route(method.upper(), path.rstrip("/") or "/", body)
        except RolloutNotFound as exc:
            return 404, {"error": str(exc)}
        except RolloutConflict as exc:
            return 409, {"error": str(exc)}
        except RolloutError as exc:
            message = str(exc)
            status = 409 if ("only a" in message or "already" in message) else 400
            return status, {"error": message}

    def _route(self, method: str, path: str, body: bytes | dict | None) -> tuple[int, dict[str, Any]]:
        if path == PREFIX:
            if method == "GET":
                return 200, {"rollouts": self.rollouts.list()}
            if method == "POST":
                state = create_rollout(self.store, _json(body), fleet=self.fleet, blob_store=self.blob_store,
                                       now=self.clock())
                return 201, {"rollout": state.to_dict()}
            return 405, {"error": f"method {method} not allowed on {PREFIX} (allowed: GET, POST)"}
        m = _ONE.match(path)
        if m:
            if method != "GET":
                return 405, {"error": f"method {method} not allowed on {PREFIX}/{{id}} (allowed: GET)"}
            return 200, {"rollout": self.rollouts.load(m.group(1)).to_dict()}
        m = _ACT.match(path)
        if m:
            if method != "POST":
                return 405, {"error": f"method {method} not allowed on {path} (allowed: POST)"}
            doc = _json(body) if body else {}
            reason = str(doc.get("reason") or "")
            now = self.clock()
            action = m.group(2)
            if action == "pause":
                change = lambda mach: mach.pause(now, reason or "paused by the operator")  # noqa: E731
            elif action == "abort":
                change = lambda mach: mach.abort(now, reason or "aborted by the operator")  # noqa: E731
            else:
                change = lambda mach: mach.resume(now)  # noqa: E731
            state = self.rollouts.update(m.group(1), change)
            return 200, {"rollout": state.to_dict()}
        return 404, {"error": f"no such endpoint: {path}"}


def _json(body: bytes | dict | None) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    try:
        doc = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RolloutError(f"the request body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RolloutError("the request body must be a JSON object")
    return doc


class MountedApi:
    """``ServerApi`` plus the rollout routes, behind the same token; anything else goes to ``ServerApi``."""

    def __init__(self, server_api: Any, rollouts: RolloutApi) -> None:
        self.server_api = server_api
        self.rollouts = rollouts

    def handle(self, request: Any) -> Any:
        from fleet.api import HttpError, error_response, json_response
        if not self.rollouts.handles(request.path):
            return self.server_api.handle(request)
        try:
            self.server_api._check_token(request)
            status, doc = self.rollouts.handle(request.method, request.path, request.body)
        except HttpError as exc:
            return error_response(exc.status, str(exc), exc.headers)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving; the store may be down
            names = {c.__name__ for c in type(exc).__mro__}
            if "StoreUnavailableError" in names:
                return error_response(503, f"database unavailable, retry later: {exc}", {"Retry-After": "5"})
            return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        return json_response(status, doc)


__all__ = ["RolloutApi", "MountedApi", "PREFIX", "ROUTES"]
