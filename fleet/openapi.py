"""The OpenAPI 3.0 description of the fleet server's HTTP API, served at ``/api/openapi.json``.

Kept as a Python dict beside the routes (fleet/api.py) so a test can check that every routed
path is documented and every documented path is routed, with the same query parameters.
"""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _q(name: str, description: str, schema: dict[str, Any] | None = None, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": schema or {"type": "string"}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_SINCE = {"type": "number", "description": "epoch seconds; zero or negative means seconds before now (-3600)"}
_ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "500": {"$ref": "#/components/responses/ServerError"},
}
_NUM = {"type": "number", "nullable": True}
_DEVICE_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "device id"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "litefleet fleet server API",
        "version": "1",
        "description": "Read-only JSON view of the fleet: devices, telemetry, series, events, alerts, ingest. "
                       "Every /api/v1 endpoint needs `Authorization: Bearer <token>` (the token is in the "
                       "server's data directory, file api-token). Errors are `{\"error\": \"...\"}`.",
    },
    "servers": [{"url": "http://127.0.0.1:8600"}],
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/devices": {"get": {
            "summary": "All devices with their latest figures, and a summary",
            "parameters": [_q("group", "only devices in this group"), _q("profile", "only devices of this profile")],
            "responses": {"200": _json({"type": "object", "required": ["devices", "summary"], "properties": {
                "devices": {"type": "array", "items": _ref("Device")}, "summary": _ref("Summary")}},
                "devices and summary"), **_ERRORS},
        }},
        "/api/v1/devices/{id}": {"get": {
            "summary": "One device, its telemetry since `since` (default: the last hour), recent events and alerts",
            "parameters": [_DEVICE_ID, _q("since", "start of the telemetry window", _SINCE)],
            "responses": {"200": _json({"type": "object", "properties": {
                "device": _ref("Device"), "since": {"type": "number"},
                "telemetry": {"type": "array", "items": _ref("TelemetryRow")},
                "events": {"type": "array", "items": _ref("Event")},
                "alerts": {"type": "array", "items": _ref("Alert")}}}, "the device's recent history"),
                "404": {"$ref": "#/components/responses/NotFound"}, **_ERRORS},
        }},
        "/api/v1/devices/{id}/telemetry": {"get": {
            "summary": "A device's telemetry: raw rows or minute/hour rollups",
            "parameters": [_DEVICE_ID, _q("since", "start (default: an hour ago)", _SINCE),
                           _q("until", "end (default: now)", _SINCE),
                           _q("resolution", "raw rows, rollups, or auto (by the window's age)",
                              {"type": "string", "enum": ["auto", "raw", "minute", "hour"], "default": "auto"})],
            "responses": {"200": _json({"type": "object", "properties": {
                "device_id": {"type": "string"}, "since": {"type": "number"}, "until": _NUM,
                "resolution": {"type": "string"}, "telemetry": {"type": "array", "items": _ref("TelemetryRow")}}},
                "telemetry rows"), "404": {"$ref": "#/components/responses/NotFound"}, **_ERRORS},
        }},
        "/api/v1/series": {"get": {
            "summary": "Fleet-wide time series of a metric, one series per model version ('digits v3') or by=all",
            "parameters": [_q("metric", "what to chart", {"type": "string", "enum": ["p95_ms", "inferences_per_s"]},
                              required=True),
                           _q("since", "start (default: an hour ago)", _SINCE),
                           _q("by", "how to split the series", {"type": "string", "default": "model_version",
                                                                "enum": ["model_version", "all"]})],
            "responses": {"200": _json({"type": "object", "properties": {
                "metric": {"type": "string"}, "by": {"type": "string"}, "since": {"type": "number"},
                "series": {"type": "object", "additionalProperties": {
                    "type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                               "items": {"type": "number"}},
                    "description": "[timestamp, value] points"}}}}, "series by key"), **_ERRORS},
        }},
        "/api/v1/events": {"get": {
            "summary": "Device events, newest first",
            "parameters": [_q("device", "only this device"), _q("command", "only events of this command id"),
                           _q("kind", "event kinds, repeated or comma-separated (installed,install_failed)"),
                           _q("since", "only events after this time", _SINCE),
                           _q("limit", "at most this many (1..1000)",
                              {"type": "integer", "minimum": 1, "maximum": 1000, "default": 200})],
            "responses": {"200": _json({"type": "object", "properties": {
                "events": {"type": "array", "items": _ref("Event")}}}, "events"), **_ERRORS},
        }},
        "/api/v1/alerts": {"get": {
            "summary": "Alerts: the active ones, or all with all=1",
            "parameters": [_q("all", "include closed alerts", {"type": "string", "enum": ["0", "1", "true", "false"]}),
                           _q("limit", "at most this many, newest first (1..10000)",
                              {"type": "integer", "minimum": 1, "maximum": 10000, "default": 500})],
            "responses": {"200": _json({"type": "object", "properties": {
                "alerts": {"type": "array", "items": _ref("Alert")}}}, "alerts"), **_ERRORS},
        }},
        "/api/v1/ingest": {"get": {
            "summary": "The ingestor's statistics (messages/s, batches, database errors, lag)",
            "responses": {"200": _json({"type": "object", "properties": {"running": {"type": "boolean"}},
                                        "additionalProperties": True}, "ingest stats"), **_ERRORS},
        }},
        "/api/openapi.json": {"get": {
            "summary": "This document", "security": [],
            "responses": {"200": _json({"type": "object"}, "the OpenAPI document")},
        }},
        "/metrics": {"get": {
            "summary": "Prometheus exposition (no token unless the server was started to require one)",
            "security": [{}, {"bearer": []}],
            "responses": {"200": {"description": "Prometheus text exposition format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          "401": {"$ref": "#/components/responses/Unauthorized"}},
        }},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "the token in <data_dir>/api-token"}},
        "responses": {
            "BadRequest": _json(_ref("Error"), "a parameter is missing or wrong; the message names it"),
            "Unauthorized": _json(_ref("Error"), "no token, or a wrong one"),
            "NotFound": _json(_ref("Error"), "no such device or endpoint"),
            "ServerError": _json(_ref("Error"), "the server failed (503: the database is unavailable)"),
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "ModelRef": {"type": "object", "nullable": True, "properties": {
                "name": {"type": "string"}, "version": {"type": "integer"}, "sha256": {"type": "string"}}},
            "Device": {"type": "object", "required": ["device_id", "online"], "properties": {
                "device_id": {"type": "string"}, "fleet": {"type": "string"}, "profile": {"type": "string"},
                "groups": {"type": "array", "items": {"type": "string"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "online": {"type": "boolean"}, "last_seen": _NUM, "status_ts": _NUM,
                "agent_version": {"type": "string", "nullable": True}, "model": _ref("ModelRef"),
                "runtime": {"nullable": True}, "delegate": {"type": "string", "nullable": True},
                "p95_ms": _NUM, "inferences_per_s": _NUM, "cpu_percent": _NUM, "temperature_c": _NUM,
                "memory_percent": _NUM, "pending_deployment": {"nullable": True},
                "lost": {"type": "integer", "nullable": True}}, "additionalProperties": True},
            "Summary": {"type": "object", "properties": {
                "online": {"type": "integer"}, "offline": {"type": "integer"}, "total": {"type": "integer"},
                "lost": {"type": "integer"}, "pending_deployments": {"type": "integer"},
                "alerts": {"type": "integer"},
                "alerts_by_kind": {"type": "object", "additionalProperties": {"type": "integer"}},
                "time": {"type": "number"}}},
            "TelemetryRow": {"type": "object", "properties": {
                "ts": {"type": "number"}, "device_id": {"type": "string"},
                "model_version": {"nullable": True}, "p50_ms": _NUM, "p95_ms": _NUM, "p99_ms": _NUM,
                "inferences_per_s": _NUM, "count": _NUM, "errors": _NUM, "cpu_percent": _NUM,
                "temperature_c": _NUM, "memory_percent": _NUM}, "additionalProperties": True},
            "Event": {"type": "object", "properties": {
                "device_id": {"type": "string"}, "seq": {"type": "integer"}, "ts": {"type": "number"},
                "kind": {"type": "string"}, "reason": {"type": "string"}, "command_id": {"type": "string"},
                "details": {"type": "object"}}, "additionalProperties": True},
            "Alert": {"type": "object", "properties": {
                "device_id": {"type": "string"}, "kind": {"type": "string",
                                                          "enum": ["offline", "temperature", "latency_regression"]},
                "active": {"type": "boolean"}, "message": {"type": "string"},
                "opened_at": _NUM, "closed_at": _NUM, "details": {"type": "object"}},
                "additionalProperties": True},
        },
    },
}

__all__ = ["OPENAPI"]
