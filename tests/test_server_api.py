"""The fleet server's HTTP API: the pure handler and a real server on a free port, over a real SQLite store.

The store is filled with ``Store.write_batch`` from messages shaped exactly like the agents' (a
birth, telemetry documents as agent/telemetry.py ``collect()`` makes them, events, a last will).
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fleet import api as api_mod
from fleet import api_rollouts
from fleet.api import ApiServer, Request, ServerApi, dashboard_url, ensure_token
from fleet.openapi import OPENAPI

TOKEN = "test-token-0123456789"
FLEET = "plant"


# Realistic messages ----------------------------------------------------------------------

def birth(device_id: str, ts: float, *, profile: str, groups: list[str], model: dict | None,
          delegate: str = "xnnpack") -> dict[str, Any]:
    return {"v": 1, "state": "online", "device_id": device_id, "ts": ts, "reason": "", "fleet": FLEET,
            "groups": groups, "labels": {"site": "hall-2"}, "profile": profile, "agent_version": "0.1.0",
            "runtime": {"name": "ai-edge-litert", "version": "2.3.0"}, "delegates_available": [delegate],
            "engine": {"runtime": "ai-edge-litert", "runtime_version": "2.3.0", "delegate": delegate, "threads": 2},
            "active_model": model, "hardware": {"architecture": "aarch64", "cores": 4}, "public_keys": {}}


def last_will(device_id: str, ts: float) -> dict[str, Any]:
    return {"v": 1, "state": "offline", "device_id": device_id, "ts": ts, "reason": "connection lost"}


def telemetry_doc(ts: float, *, model: dict | None, p95: float, ips: float, cpu: float, temp: float | None,
                  delegate: str = "xnnpack") -> dict[str, Any]:
    """A document with the keys of agent.telemetry.collect()."""
    count = int(ips * 10)
    return {
        "schema": 1, "type": "telemetry", "time": ts,
        "agent": {"version": "0.1.0", "uptime_s": 1234.5},
        "model": model,
        "engine": {"runtime": "ai-edge-litert", "runtime_version": "2.3.0", "delegate": delegate} if model else None,
        "inference": {"count": count, "errors": 0, "interval_s": 10.0, "inferences_per_s": ips,
                      "latency_ms": {"p50": round(p95 * 0.7, 3), "p95": p95, "p99": round(p95 * 1.2, 3),
                                     "mean": round(p95 * 0.75, 3), "max": round(p95 * 1.5, 3)},
                      "sampled": count},
        "system": {"cpu_percent": cpu, "load_avg": [0.5, 0.4, 0.3], "memory_total_bytes": 4_000_000_000,
                   "memory_used_bytes": 1_000_000_000, "memory_available_bytes": 3_000_000_000,
                   "agent_rss_bytes": 80_000_000, "agent_cpu_percent": cpu / 2, "temperature_c": temp,
                   "temperatures_c": {"cpu_thermal": temp} if temp is not None else {},
                   "disk_free_bytes": 10_000_000_000, "disk_total_bytes": 30_000_000_000},
        "spool": {"pending": 0, "dropped": 0},
    }


def event_msg(device_id: str, seq: int, ts: float, kind: str, reason: str, command_id: str = "",
              details: dict | None = None) -> dict[str, Any]:
    return {"v": 1, "device_id": device_id, "seq": seq, "ts": ts, "kind": kind, "reason": reason,
            "command_id": command_id, "details": details or {}}


DIGITS_V2 = {"name": "digits", "version": 2, "sha256": "ab" * 32}
DIGITS_V3 = {"name": "digits", "version": 3, "sha256": "cd" * 32}


def fill_store(store: Any, now: float) -> None:
    """Three devices: dev-a (lab, rpi4, v2, healthy), dev-b (field, jetson, v3, hot, a deploy pending),
    dev-c (lab, x86, went offline 10 minutes ago, lost 2 messages)."""
    from fleet.store import IngestBatch
    statuses = [("dev-a", birth("dev-a", now - 900, profile="rpi4-cpu", groups=["lab"], model=DIGITS_V2)),
                ("dev-b", birth("dev-b", now - 900, profile="jetson-gpu", groups=["field"], model=DIGITS_V3,
                                delegate="gpu")),
                ("dev-c", birth("dev-c", now - 1800, profile="x86-cpu", groups=["lab"], model=DIGITS_V2))]
    telemetry, events = [], []
    for i in range(20):                                    # every 30 s over the last 10 minutes
        ts = now - 600 + i * 30
        telemetry.append(("dev-a", i + 1, ts, telemetry_doc(ts, model=DIGITS_V2, p95=5.0 + (i % 3) * 0.1,
                                                            ips=20.0, cpu=30.0, temp=55.0)))
        telemetry.append(("dev-b", i + 1, ts, telemetry_doc(ts, model=DIGITS_V3, p95=3.0, ips=50.0, cpu=60.0,
                                                            temp=95.5, delegate="gpu")))
    for i, seq in enumerate((1, 2, 3, 6, 7)):             # dev-c: seqs 4 and 5 never arrived
        ts = now - 1500 + i * 30
        telemetry.append(("dev-c", seq, ts, telemetry_doc(ts, model=DIGITS_V2, p95=8.0, ips=10.0, cpu=20.0,
                                                          temp=None)))
    events.append(("dev-a", 21, now - 800, event_msg("dev-a", 21, now - 800, "installed", "digits v2 active",
                                                     "cmd-1", {"name": "digits", "version": 2})))
    events.append(("dev-b", 21, now - 60, event_msg("dev-b", 21, now - 60, "deploy_accepted", "fetching digits v4",
                                                    "cmd-2", {"name": "digits", "version": 4})))
    store.write_batch(IngestBatch(statuses=statuses, telemetry=telemetry, events=events))
    store.write_batch(IngestBatch(statuses=[("dev-c", last_will("dev-c", now - 600))], telemetry=[], events=[]))


# Fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path):
    from fleet.store import open_store
    s = open_store(str(tmp_path / "fleet.db"))
    s.migrate()
    yield s
    s.close()


@pytest.fixture(scope="session")
def pg_database():
    """One throwaway PostgreSQL database for the session (tests/support/postgres.py); reset per test."""
    from tests.support.postgres import TempPostgres
    pg = TempPostgres.create()
    yield pg
    pg.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path):
    """The same tests on both backends."""
    from fleet.store import open_store
    if request.param == "sqlite":
        url = str(tmp_path / "fleet.db")
    else:
        pg = request.getfixturevalue("pg_database")
        pg.reset()
        url = pg.url
    s = open_store(url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def now() -> float:
    return time.time()


@pytest.fixture
def filled(store, now):
    fill_store(store, now)
    return store


@pytest.fixture
def web_dir(tmp_path) -> Path:
    """A dashboard directory of our own (the real fleet/web/ is another helper's), with a secret beside it."""
    web = tmp_path / "web"
    (web / "assets").mkdir(parents=True)
    (web / "index.html").write_text("<!doctype html><title>fleet</title>")
    (web / "device.html").write_text("<!doctype html><title>device</title>")
    (web / "assets" / "app.js").write_text("console.log('app');")
    (web / "assets" / "style.css").write_text("body{}")
    (web / ".hidden").write_text("no")
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    return web


INGEST_STATS = {"messages": 42, "messages_per_s": 3.5, "batches": 2, "db_errors": 0}


@pytest.fixture
def api(filled, web_dir) -> ServerApi:
    """SQLite only: for the checks that do not depend on the backend (tokens, 4xx, files)."""
    return ServerApi(filled, TOKEN, ingest_stats=lambda: INGEST_STATS, web_dir=web_dir)


@pytest.fixture
def data_api(any_store, now, web_dir) -> ServerApi:
    """SQLite and PostgreSQL: for the data each endpoint returns."""
    fill_store(any_store, now)
    return ServerApi(any_store, TOKEN, ingest_stats=lambda: INGEST_STATS, web_dir=web_dir)


def get(api: ServerApi, target: str, token: str | None = TOKEN, method: str = "GET"):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return api.handle(Request.from_target(method, target, headers))


# Pure handler --------------------------------------------------------------------------------

def test_devices_lists_every_device_with_a_summary(data_api):
    r = get(data_api, "/api/v1/devices")
    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
    doc = r.json()
    by_id = {d["device_id"]: d for d in doc["devices"]}
    assert sorted(by_id) == ["dev-a", "dev-b", "dev-c"]
    assert by_id["dev-a"]["online"] is True and by_id["dev-c"]["online"] is False
    assert by_id["dev-b"]["model"]["version"] == 3 and by_id["dev-b"]["temperature_c"] == 95.5
    assert by_id["dev-c"]["lost"] == 2
    summary = doc["summary"]
    assert (summary["online"], summary["offline"], summary["total"], summary["lost"]) == (2, 1, 3, 2)
    assert summary["pending_deployments"] == 1


def test_devices_filter_by_group_and_profile(data_api):
    lab = get(data_api, "/api/v1/devices?group=lab").json()
    assert sorted(d["device_id"] for d in lab["devices"]) == ["dev-a", "dev-c"]
    assert lab["summary"]["total"] == 2
    jetson = get(data_api, "/api/v1/devices?profile=jetson-gpu").json()
    assert [d["device_id"] for d in jetson["devices"]] == ["dev-b"]
    assert get(data_api, "/api/v1/devices?group=nowhere").json()["devices"] == []


def test_one_device_with_its_last_hour(data_api, now):
    doc = get(data_api, "/api/v1/devices/dev-a").json()
    assert doc["device"]["device_id"] == "dev-a"
    assert len(doc["telemetry"]) == 20
    assert all(now - 3600 <= row["ts"] <= now for row in doc["telemetry"])
    assert [e["kind"] for e in doc["events"]] == ["installed"]
    assert doc["alerts"] == []
    short = get(data_api, "/api/v1/devices/dev-a?since=-300").json()
    assert 0 < len(short["telemetry"]) < 20


def test_device_telemetry_and_series(data_api, now):
    doc = get(data_api, "/api/v1/devices/dev-b/telemetry?since=-3600&resolution=raw").json()
    assert doc["resolution"] == "raw" and len(doc["telemetry"]) == 20
    assert {row["p95_ms"] for row in doc["telemetry"]} == {3.0}
    series = get(data_api, "/api/v1/series?metric=p95_ms&since=-3600").json()
    assert series["metric"] == "p95_ms" and series["by"] == "model_version"
    assert len(series["series"]) >= 2                      # digits v2 and v3
    assert all(len(point) == 2 for points in series["series"].values() for point in points)


def test_events_filters(data_api):
    assert [e["device_id"] for e in get(data_api, "/api/v1/events?kind=deploy_accepted").json()["events"]] == ["dev-b"]
    assert [e["kind"] for e in get(data_api, "/api/v1/events?command=cmd-1").json()["events"]] == ["installed"]
    both = get(data_api, "/api/v1/events?kind=installed,deploy_accepted").json()["events"]
    assert len(both) == 2
    assert len(get(data_api, "/api/v1/events?limit=1").json()["events"]) == 1


def test_alerts_and_ingest(data_api, now):
    api = data_api
    assert get(api, "/api/v1/alerts").json() == {"alerts": []}
    api.store.record_alert({"device_id": "dev-b", "kind": "temperature", "open": True, "ts": now,
                         "message": "dev-b is hot", "details": {"temperature_c": 95.5}})
    alerts = get(api, "/api/v1/alerts").json()["alerts"]
    assert [(a["device_id"], a["kind"]) for a in alerts] == [("dev-b", "temperature")]
    assert get(api, "/api/v1/devices").json()["summary"]["alerts"] == 1
    assert get(api, "/api/v1/ingest").json()["messages_per_s"] == 3.5


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic dXNlcjpwYXNz", "Bearer ", TOKEN])
def test_api_refuses_a_missing_or_wrong_token(api, header):
    headers = {"Authorization": header} if header is not None else {}
    r = api.handle(Request.from_target("GET", "/api/v1/devices", headers))
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    message = r.json()["error"]
    assert "token" in message or "Bearer" in message
    assert "dev-a" not in r.body.decode()


def test_unknown_paths_need_the_token_before_saying_404(api):
    assert get(api, "/api/v1/nothing", token=None).status == 401
    r = get(api, "/api/v1/nothing")
    assert r.status == 404 and "/api/v1/nothing" in r.json()["error"]


@pytest.mark.parametrize("target, status, words", [
    ("/api/v1/devices/nope", 404, "unknown device 'nope'"),
    ("/api/v1/devices/nope/telemetry", 404, "unknown device 'nope'"),
    ("/api/v1/devices?colour=red", 400, "unknown query parameter 'colour'"),
    ("/api/v1/series", 400, "metric"),
    ("/api/v1/series?metric=watts", 400, "p95_ms"),
    ("/api/v1/series?metric=p95_ms&by=moon", 400, "by"),
    ("/api/v1/devices/dev-a/telemetry?since=yesterday", 400, "since"),
    ("/api/v1/devices/dev-a/telemetry?resolution=second", 400, "resolution"),
    ("/api/v1/devices/dev-a/telemetry?since=-60&until=-3600", 400, "until"),
    ("/api/v1/devices/dev-a/telemetry?since=nan", 400, "finite"),
    ("/api/v1/events?limit=0", 400, "limit"),
    ("/api/v1/events?limit=many", 400, "limit"),
    ("/api/v1/alerts?all=maybe", 400, "all"),
    ("/api/v1/alerts?limit=20000", 400, "limit"),
])
def test_bad_requests_name_the_problem(api, target, status, words):
    r = get(api, target)
    assert r.status == status, r.body
    assert words in r.json()["error"]


def test_wrong_method_is_405_with_allow(api):
    r = get(api, "/api/v1/devices", method="DELETE")
    assert r.status == 405 and r.headers["Allow"] == "GET" and "DELETE" in r.json()["error"]
    assert get(api, "/", method="POST").status == 405


def test_a_failing_store_is_a_500_with_a_message(filled, web_dir):
    class Broken:
        def __getattr__(self, name):
            return getattr(filled, name)

        def devices(self, **kw):
            raise RuntimeError("disk on fire")

    api = ServerApi(Broken(), TOKEN, web_dir=web_dir)
    r = get(api, "/api/v1/devices")
    assert r.status == 500 and "disk on fire" in r.json()["error"]
    assert get(api, "/api/v1/alerts").status == 200            # and the next request is fine


def test_an_unreachable_database_is_a_503_saying_so(filled, web_dir):
    """The store's own 'unavailable' error (fleet/db.py), raised as a dropped connection would raise it."""
    from fleet.db import StoreUnavailableError

    class Down:
        def __getattr__(self, name):
            def fail(*a, **kw):
                raise StoreUnavailableError("postgresql database postgresql://db:5432/fleet: connection refused")
            return fail

    r = get(ServerApi(Down(), TOKEN, web_dir=web_dir), "/api/v1/devices")
    assert r.status == 503 and "database unavailable" in r.json()["error"] and "connection refused" in r.json()["error"]
    assert r.headers["Retry-After"] == "5"


def test_metrics_needs_no_token_unless_asked(filled, web_dir):
    open_api = ServerApi(filled, TOKEN, web_dir=web_dir)
    r = get(open_api, "/metrics", token=None)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert b"litefleet_devices" in r.body
    closed = ServerApi(filled, TOKEN, web_dir=web_dir, metrics_token=True)
    assert get(closed, "/metrics", token=None).status == 401
    assert get(closed, "/metrics").status == 200


# OpenAPI ---------------------------------------------------------------------------------------

def test_openapi_documents_exactly_the_routed_paths_and_parameters(api, filled):
    r = get(api, "/api/openapi.json", token=None)
    assert r.status == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.0") and doc == json.loads(json.dumps(OPENAPI))
    routed = {route.pattern: route for route in api_mod.ROUTES}
    rollout_routes: dict[str, set[str]] = {}
    for method, pattern in api_rollouts.ROUTES:
        rollout_routes.setdefault(pattern, set()).add(method.lower())
    assert set(doc["paths"]) == set(routed) | set(rollout_routes)
    for path, methods in rollout_routes.items():
        assert set(doc["paths"][path]) == methods, path
        for operation in doc["paths"][path].values():
            assert {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"} == set(
                seg[1:-1] for seg in path.split("/") if seg.startswith("{")), path
            assert {"200", "201"} & set(operation["responses"]), path
    rollouts = api_rollouts.RolloutApi(filled, fleet="f")
    for method, pattern in api_rollouts.ROUTES:                 # each documented rollout route is routed
        status, answer = rollouts.handle(method, pattern.replace("{id}", "nope"), b"{}")
        assert status != 405 and "no such endpoint" not in answer.get("error", ""), (method, pattern, answer)
    for path, route in routed.items():
        operations = doc["paths"][path]
        assert set(operations) == {route.method.lower()}, path
        params = operations[route.method.lower()].get("parameters", [])
        assert {p["name"] for p in params if p["in"] == "query"} == set(route.params), path
        assert {p["name"] for p in params if p["in"] == "path"} == set(
            seg[1:-1] for seg in path.split("/") if seg.startswith("{")), path
        assert "200" in operations[route.method.lower()]["responses"]

    def refs(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(doc):                                      # every $ref resolves
        target: Any = doc
        for part in ref.lstrip("#/").split("/"):
            target = target[part]


# Static files ----------------------------------------------------------------------------------

def test_dashboard_files_are_served_without_a_token_with_their_types(api):
    cases = {"/": ("text/html", b"<title>fleet"), "/index.html": ("text/html", b"<title>fleet"),
             "/devices/dev-a": ("text/html", b"<title>device"), "/assets/app.js": ("text/javascript", b"app"),
             "/assets/style.css": ("text/css", b"body")}
    for target, (content_type, snippet) in cases.items():
        r = get(api, target, token=None)
        assert r.status == 200, target
        assert r.headers["Content-Type"].startswith(content_type), target
        assert snippet in r.body and r.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("target", [
    "/../secret.txt", "/assets/../../secret.txt", "/%2e%2e/secret.txt", "/assets/%2e%2e/%2e%2e/secret.txt",
    "/..%2fsecret.txt", "/assets/..%5c..%5csecret.txt", "//etc/passwd", "/.hidden", "/assets/", "/nothing.js",
    "/%00index.html",
])
def test_no_path_traversal(api, target):
    r = get(api, target, token=None)
    assert r.status == 404, target
    assert b"TOP SECRET" not in r.body and b"root:" not in r.body


def test_symlink_out_of_the_web_dir_is_not_followed(api, web_dir):
    (web_dir / "assets" / "leak.txt").symlink_to(web_dir.parent / "secret.txt")
    assert get(api, "/assets/leak.txt", token=None).status == 404


# Token file -------------------------------------------------------------------------------------

def test_ensure_token_creates_a_private_file_once(tmp_path):
    data = tmp_path / "data"
    token = ensure_token(data)
    path = data / "api-token"
    assert len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_token(data) == token
    assert ensure_token(tmp_path / "other") != token
    assert dashboard_url("http://127.0.0.1:8600/", token) == f"http://127.0.0.1:8600/#token={token}"


def test_concurrent_first_starts_agree_on_one_token(tmp_path):
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_token(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and (tmp_path / "api-token").read_text().strip() == results[0]


# A real server -----------------------------------------------------------------------------------

def http(url: str, token: str | None = TOKEN, method: str = "GET") -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_real_server_on_a_free_port(api):
    with ApiServer(api, port=0) as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, headers, body = http(f"{server.url}/api/v1/devices")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body)["summary"]["total"] == 3
        status, _, body = http(f"{server.url}/api/v1/devices", token="nope")
        assert status == 401 and "invalid token" in json.loads(body)["error"]
        status, _, body = http(f"{server.url}/api/v1/devices/dev-c")
        assert status == 200 and json.loads(body)["device"]["online"] is False
        status, _, body = http(f"{server.url}/assets/../../secret.txt", token=None)
        assert status == 404 and b"TOP SECRET" not in body
        status, headers, _ = http(f"{server.url}/api/v1/devices", method="POST")
        assert status == 405 and headers["Allow"] == "GET"
        status, _, body = http(f"{server.url}/metrics", token=None)
        assert status == 200 and b'litefleet_devices{state="online"} 2.0' in body
        status, _, body = http(f"{server.url}/")
        assert status == 200 and b"<title>fleet" in body


def test_real_server_survives_a_handler_crash_and_concurrent_clients(filled, web_dir):
    calls = {"n": 0}

    def flaky_stats():
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("stats exploded")
        return {"messages": 1}

    api = ServerApi(filled, TOKEN, ingest_stats=flaky_stats, web_dir=web_dir)
    with ApiServer(api, port=0) as server:
        status, _, body = http(f"{server.url}/api/v1/ingest")
        assert status == 500 and "stats exploded" in json.loads(body)["error"]
        results: list[int] = []
        workers = [threading.Thread(target=lambda: results.append(http(f"{server.url}/api/v1/devices")[0]))
                   for _ in range(16)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert results == [200] * 16
        assert http(f"{server.url}/api/v1/ingest")[0] == 200


def test_start_api_serves_with_the_token_from_the_data_dir(filled, tmp_path, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="litefleet.api"):
        server, token = api_mod.start_api(filled, tmp_path / "data", port=0)
    try:
        assert (tmp_path / "data" / "api-token").read_text().strip() == token
        assert http(f"{server.url}/api/v1/alerts", token=token)[0] == 200
        assert http(f"{server.url}/api/v1/alerts", token=TOKEN)[0] == 401
        assert token not in caplog.text and "api-token" in caplog.text      # the log names the file, not the secret
    finally:
        server.stop()


def test_server_binds_loopback_by_default(api):
    server = ApiServer(api, port=0)
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
    finally:
        server.httpd.server_close()
