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
_DURATION = {"description": "seconds, or a duration such as \"90s\" or \"10m\"",
             "oneOf": [{"type": "number"}, {"type": "string"}]}
_ROLLOUT_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "rollout id"}
_ROLLOUT = {"type": "object", "required": ["rollout"], "properties": {"rollout": {"$ref": "#/components/schemas/Rollout"}}}
_DEVICE_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}, "description": "device id"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "litefleet fleet server API",
        "version": "1",
        "description": "JSON view of the fleet (devices, telemetry, series, events, alerts, ingest, "
                       "model quality) and its staged rollouts. "
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
                "alerts": {"type": "array", "items": _ref("Alert")},
                "quality": {"type": "object", "description": "drift and field accuracy per model version the device "
                                                            "reported on"}}}, "the device's recent history"),
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
        "/api/v1/keys": {"get": {
            "summary": "Devices' X25519 public keys (from their birth messages), to encrypt bundles for",
            "parameters": [_q("group", "only devices in this group"), _q("profile", "only devices of this profile")],
            "responses": {"200": _json({"type": "object", "required": ["keys", "without_key"], "properties": {
                "keys": {"type": "array", "items": {"type": "object", "properties": {
                    "device_id": {"type": "string"}, "profile": {"type": "string"},
                    "x25519": {"type": "string", "description": "base64 of the raw 32-byte public key"},
                    "key_id": {"type": "string", "description": "first 16 hex digits of its sha256"}},
                    "additionalProperties": True}},
                "without_key": {"type": "array", "items": {"type": "string"},
                                "description": "devices that reported no (valid) key"}}},
                "device keys"), **_ERRORS},
        }},
        "/api/v1/quality": {"get": {
            "summary": "Every model version devices reported drift or feedback for: drift summary, field accuracy "
                       "beside the converter's (docs/quality.md)",
            "parameters": [_q("model", "only this model name")],
            "responses": {"200": _json({"type": "object", "properties": {
                "drift_threshold": {"type": "number"},
                "models": {"type": "array", "items": _ref("VersionQuality")}}}, "model versions"), **_ERRORS},
        }},
        "/api/v1/models/{name}/versions/{version}/quality": {"get": {
            "summary": "One model version's quality in the field: drift per device, the summed confusion matrix, "
                       "accuracy and per-class precision/recall/F1, beside the converter's figures per profile",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "model name"},
                           {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "version number (3 or v3)"}],
            "responses": {"200": _json(_ref("VersionQuality"), "the version's quality, with per-class figures and "
                                                               "devices"),
                          "404": {"$ref": "#/components/responses/NotFound"}, **_ERRORS},
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
        "/api/v1/rollouts": {
            "get": {
                "summary": "Rollouts, newest first: state, stage of N with every stage's size, devices by state, "
                           "versions per profile, what stopped it and the last health verdict",
                "responses": {"200": _json({"type": "object", "required": ["rollouts"], "properties": {
                    "rollouts": {"type": "array", "items": _ref("RolloutSummary")}}}, "rollout summaries"),
                    **_ERRORS},
            },
            "post": {
                "summary": "Start a staged rollout (what `litefleet rollout start` sends)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("RolloutRequest")}}},
                "responses": {"201": _json(_ROLLOUT, "the rollout, created"), **_ERRORS,
                              "409": {"$ref": "#/components/responses/Conflict"}},
            },
        },
        "/api/v1/rollouts/{id}": {"get": {
            "summary": "One rollout with its devices and history",
            "parameters": [_ROLLOUT_ID],
            "responses": {"200": _json(_ROLLOUT, "the rollout"), **_ERRORS,
                          "404": {"$ref": "#/components/responses/NotFound"}},
        }},
        **{f"/api/v1/rollouts/{{id}}/{action}": {"post": {
            "summary": summary,
            "parameters": [_ROLLOUT_ID],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"reason": {"type": "string"}}}}}},
            "responses": {"200": _json(_ROLLOUT, "the rollout after the change"), **_ERRORS,
                          "404": {"$ref": "#/components/responses/NotFound"},
                          "409": {"$ref": "#/components/responses/Conflict"}},
        }} for action, summary in (
            ("pause", "Pause a rollout: no further stage starts; devices keep what they have"),
            ("resume", "Resume a paused rollout from its current stage"),
            ("abort", "Abort a rollout: the devices it updated are rolled back"))},
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "the token in <data_dir>/api-token"}},
        "responses": {
            "BadRequest": _json(_ref("Error"), "a parameter is missing or wrong; the message names it"),
            "Unauthorized": _json(_ref("Error"), "no token, or a wrong one"),
            "NotFound": _json(_ref("Error"), "no such device or endpoint"),
            "ServerError": _json(_ref("Error"), "the server failed (503: the database is unavailable)"),
            "Conflict": _json(_ref("Error"), "the rollout is not in a state that allows this, or another "
                                             "rollout holds some of its devices"),
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "RolloutRequest": {"type": "object", "required": ["bundles", "target"], "properties": {
                "id": {"type": "string"}, "target": {"type": "string", "description": "device:ID, group:NAME, "
                                                                                       "profile:NAME or all"},
                "bundles": {"type": "object", "description": "profile -> deploy args (blob, name, version, profile, "
                                                            "model_sha256)", "additionalProperties": {"type": "object"}},
                "stages": {"type": "string", "example": "1,10%,50%,100%"},
                "soak_s": _DURATION, "max_failures": {"type": "string", "example": "5%"},
                "health": {"type": "string", "example": "p95_latency_ms<=1.2*baseline,error_rate<1%"},
                "on_breach": {"type": "string", "enum": ["pause", "abort"]},
                "install_timeout_s": _DURATION, "stale_after_s": _DURATION,
                "min_samples": {"type": "integer"}, "baseline_window_s": _DURATION, "command_ttl_s": _DURATION},
                "additionalProperties": False},
            "RolloutSummary": {"type": "object", "required": ["id", "state"], "properties": {
                "id": {"type": "string"}, "state": {"type": "string"}, "reason": {"type": "string"},
                "breach": {"type": "string"}, "model": {"type": "string"}, "target": {"type": "string"},
                "stage": {"type": "integer", "description": "1-based; 0 before the first stage"},
                "stages": {"type": "integer"}, "stage_target": {"type": "integer"},
                "target_devices": {"type": "integer"},
                "versions": {"type": "object", "additionalProperties": {"type": "integer"}},
                "devices_by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
                "health": {"type": "object", "description": "the last soak's verdict: figures against the baseline"},
                "created_at": {"type": "number"}, "updated_at": {"type": "number"}},
                "additionalProperties": True},
            "Rollout": {"allOf": [_ref("RolloutSummary"), {"type": "object", "properties": {
                "spec": {"type": "object"}, "stage_counts": {"type": "array", "items": {"type": "integer"}},
                "stage_index": {"type": "integer"}, "stage_started_at": _NUM, "soak_started_at": _NUM,
                "then": {"type": "string"}, "revision": {"type": "integer"},
                "devices": {"type": "array", "items": {"type": "object"}},
                "history": {"type": "array", "items": {"type": "object"}}}}]},
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
                "lost": {"type": "integer", "nullable": True}, "drift": _ref("Drift")},
                "additionalProperties": True},
            "Summary": {"type": "object", "properties": {
                "online": {"type": "integer"}, "offline": {"type": "integer"}, "total": {"type": "integer"},
                "lost": {"type": "integer"}, "pending_deployments": {"type": "integer"},
                "alerts": {"type": "integer"},
                "alerts_by_kind": {"type": "object", "additionalProperties": {"type": "integer"}},
                "time": {"type": "number"},
                "drifting": {"type": "integer", "description": "devices whose drift score is over drift_threshold"},
                "drift_threshold": {"type": "number"}}},
            "Drift": {"type": "object", "nullable": True, "description": "a device's latest drift report",
                      "properties": {"score": {"type": "number"}, "inputs": _NUM, "outputs": _NUM,
                                     "window": {"type": "integer", "nullable": True}, "ts": _NUM}},
            "VersionQuality": {"type": "object", "required": ["name", "version", "drift", "field", "converter"],
                               "properties": {
                "name": {"type": "string"}, "version": {"type": "integer"},
                "drift": {"type": "object", "properties": {
                    "devices": {"type": "integer"}, "drifting": {"type": "array", "items": {"type": "string"}},
                    "median": _NUM, "max": _NUM, "threshold": {"type": "number"}}},
                "field": {"type": "object", "properties": {
                    "labels": {"type": "integer"}, "correct": {"type": "integer"}, "accuracy": _NUM,
                    "devices": {"type": "integer"}, "unmatched": {"type": "integer"}, "macro": {"type": "object"},
                    "per_class": {"type": "array", "items": {"type": "object"}},
                    "confusion": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}},
                                  "description": "rows = true label, columns = predicted"}}},
                "converter": {"type": "array", "items": {"type": "object"},
                              "description": "the accuracy check of each manifest of this version (one per profile)"},
                "converter_accuracy": _NUM, "accuracy_delta_points": _NUM,
                "devices": {"type": "array", "items": {"type": "object"}}}},
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
                                                          "enum": ["offline", "temperature", "latency_regression",
                                                                   "drift", "anomaly_latency", "anomaly_error_rate",
                                                                   "anomaly_temperature", "anomaly_memory"]},
                "active": {"type": "boolean"}, "message": {"type": "string"},
                "opened_at": _NUM, "closed_at": _NUM, "details": {"type": "object"}},
                "additionalProperties": True},
        },
    },
}

__all__ = ["OPENAPI"]
