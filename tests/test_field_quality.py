"""Model quality on the server: drift and feedback reports from devices to the API, CLI, /metrics and alerts.

End to end: devices publish births and telemetry carrying ``drift`` and ``feedback`` reports
(docs/quality.md) to a real mosquitto; the real ingestor writes them into the real store (SQLite
and PostgreSQL); the real HTTP API, with the real repository holding the signed bundle of the
model version, answers the dashboard's and the CLI's questions; the real ``litefleet fleet``
process prints them. The expected per-class figures come from scikit-learn on the same labels.
Also: the pure figures of fleet/quality.py and the rollout health grammar's drift and
field_accuracy clauses (fleet/rollout.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent.mqtt import MqttLink
from agent.protocol.messages import encode
from fleet import quality
from fleet.rollout import RolloutError, evaluate_health, parse_health
from tests.support.agents import wait_for
from tests.support.broker import mosquitto, mosquitto_factory  # noqa: F401 (fixtures)
from tests.support.postgres import postgres_db  # noqa: F401 (session fixture)

ROOT = Path(__file__).resolve().parents[1]
FLEET = "qf"
TOKEN = "quality-test-token-81c2"

# Cumulative confusion matrices (rows = true label, columns = predicted), 3 classes.
CAM1_V3 = [[40, 2, 0], [3, 35, 2], [0, 1, 17]]
CAM2_V3 = [[10, 0, 5], [0, 20, 0], [4, 0, 14]]
CAM3_V2 = [[30, 0, 0], [10, 20, 0], [0, 0, 5]]


def labels_of(matrix: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) arrays that make ``matrix``: what the applications labelled, what the model said."""
    pairs = [(t, p) for t, row in enumerate(matrix) for p, n in enumerate(row) for _ in range(n)]
    return np.array([t for t, _ in pairs]), np.array([p for _, p in pairs])


# Pure figures -----------------------------------------------------------------------------------

def test_confusion_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    total = quality.sum_confusions([CAM1_V3, CAM2_V3])
    y, p = labels_of(total)
    found = quality.confusion_metrics(total)
    assert found["labels"] == len(y) == 153 and found["accuracy"] == pytest.approx(accuracy_score(y, p))
    precision, recall, f1, support = precision_recall_fscore_support(y, p, zero_division=0)
    for c, figures in enumerate(found["per_class"]):
        assert figures["precision"] == pytest.approx(precision[c])
        assert figures["recall"] == pytest.approx(recall[c])
        assert figures["f1"] == pytest.approx(f1[c])
        assert figures["support"] == support[c]
    assert found["macro"]["f1"] == pytest.approx(float(np.mean(f1)))


def test_matrices_of_different_sizes_add_up_and_an_empty_one_has_no_accuracy():
    assert quality.sum_confusions([[[1, 2], [3, 4]], [[1, 0, 0], [0, 1, 0], [0, 0, 9]]]) == \
        [[2, 2, 0], [3, 5, 0], [0, 0, 9]]
    assert quality.confusion_metrics([])["accuracy"] is None
    never_predicted = quality.confusion_metrics([[5, 0], [3, 0]])["per_class"][1]
    assert never_predicted["precision"] == 0.0 and never_predicted["recall"] == 0.0 and never_predicted["f1"] == 0.0


# Rollout health: drift and field accuracy --------------------------------------------------------

def test_health_grammar_reads_drift_and_field_accuracy_against_the_baseline():
    rule = parse_health("drift<0.2,field_accuracy>=baseline-1%")
    drift, field = rule.clauses
    assert (drift.metric, drift.op, drift.value) == ("drift", "<", 0.2)
    assert field.factor == 1.0 and field.offset == pytest.approx(-0.01)
    assert field.bound(0.93) == pytest.approx(0.92)
    assert parse_health("field_accuracy>=95%").clauses[0].value == pytest.approx(0.95)
    assert parse_health("field_accuracy>=0.9*baseline+0.02").clauses[0].bound(0.9) == pytest.approx(0.83)


@pytest.mark.parametrize("text, message", [
    ("p95_latency_ms<=baseline-1%", "an offset in % is only for error_rate and field_accuracy"),
    ("field_accuracy>=120%", "field_accuracy is a fraction"),
    ("drift<=lots", "the bound 'lots' must be a number"),
    ("drfit<0.2", "unknown metric 'drfit'"),
])
def test_bad_quality_clauses_say_what_is_wrong(text, message):
    with pytest.raises(RolloutError, match=message):
        parse_health(text)


def samples(device: str, n: int, *, drift: float | None, labels: int, correct: int) -> list[dict]:
    """Compact telemetry samples (fleet/rollout.py) whose cumulative feedback grows to labels/correct."""
    return [{"p95": 5.0, "count": 100, "errors": 0, "drift": drift, "device": device,
             "fb_labels": labels * (i + 1) // n, "fb_correct": correct * (i + 1) // n} for i in range(n)]


def test_rollout_health_judges_field_accuracy_per_device_latest_against_the_old_model():
    rule = parse_health("drift<0.2,field_accuracy>=baseline-1%")
    baseline = samples("a", 5, drift=0.05, labels=100, correct=95) + samples("b", 5, drift=0.06, labels=100,
                                                                             correct=93)
    good = samples("a", 4, drift=0.04, labels=50, correct=47) + samples("b", 4, drift=0.08, labels=50, correct=46)
    verdict = evaluate_health(rule, good, baseline, min_samples=3)
    assert verdict.violations == () and verdict.post["field_accuracy"] == pytest.approx(0.93)
    assert verdict.baseline["field_accuracy"] == pytest.approx(0.94)       # (95 + 93) / 200, latest per device
    assert any("field_accuracy 93.00%" in n and "baseline 94.00% - 1.00% = 93.00%" in n for n in verdict.notes)

    worse = samples("a", 4, drift=0.35, labels=50, correct=44) + samples("b", 4, drift=0.31, labels=50, correct=45)
    verdict = evaluate_health(rule, worse, baseline, min_samples=3)
    assert len(verdict.violations) == 2
    assert verdict.violations[0].startswith("drift 0.330")
    assert "field_accuracy 89.00%" in verdict.violations[1]

    few = samples("a", 4, drift=0.05, labels=6, correct=1)
    verdict = evaluate_health(rule, few, baseline, min_samples=3)
    assert verdict.violations == ()
    assert any("6 feedback label(s), fewer than 20: not judged yet" in n for n in verdict.notes)


# End to end: MQTT -> ingest -> store -> API, CLI, /metrics, alerts ---------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    from fleet.store import open_store
    if request.param == "sqlite":
        url = str(tmp_path / "fleet.db")
    else:
        pg = request.getfixturevalue("postgres_db")
        pg.reset()
        url = pg.url
    s = open_store(url)
    s.migrate()
    yield s
    s.close()


def converter_validation(y: np.ndarray, pred: np.ndarray) -> dict:
    """A manifest ``validation`` section with the converter's accuracy check, computed by its own metrics."""
    from converter import metrics
    report = metrics.class_report(y, pred)
    return {"ok": True, "failed": [], "summary": "all checks passed", "notes": [], "checks": [
        {"name": "accuracy", "ok": True, "summary": "...", "forceable": True, "details": {
            "measured": True, "labels": True, "data": "eval data", "samples": int(len(y)),
            "source_accuracy": 0.95, "converted_accuracy": metrics.accuracy(y, pred), "drop_points": 0.0,
            "macro": {"converted": report.macro, "source": report.macro}, "per_class": report.to_dict()["per_class"]}}]}


@pytest.fixture
def repository(tmp_path, digits_tflite_float, release_key, trusted_keys):
    """The server's repository holding digits v3 for x86-cpu, validated at 90% on 200 samples."""
    from agent.protocol import bundle as bundle_mod
    from fleet.repository import BlobStore
    from tests.support.bundles import manifest_for
    y = np.repeat(np.arange(3), [70, 70, 60])
    pred = y.copy()
    pred[:20] = 1                                            # 20 of class 0 taken for class 1: 90%
    doc = manifest_for(digits_tflite_float, version=3, validation=converter_validation(y, pred))
    blobs = BlobStore(tmp_path / "repo", trusted_keys)
    parts = bundle_mod.parse_bundle(bundle_mod.build(doc, digits_tflite_float, release_key))
    blobs.add_parts(parts.manifest_bytes, parts.signature_bytes, parts.model)
    return blobs


def status(device: str, version: int) -> bytes:
    return encode({"v": 1, "state": "online", "device_id": device, "ts": time.time(), "fleet": FLEET,
                   "groups": ["line-a"], "profile": "x86-cpu", "agent_version": "0.1.0",
                   "active_model": {"name": "digits", "version": version, "sha256": "ab" * 32}})


def telemetry(device: str, seq: int, version: int, *, drift: float | None = None, confusion=None,
              about: int | None = None, ts: float | None = None) -> bytes:
    """A telemetry message with the agent's drift and feedback reports (the contract in docs/quality.md)."""
    model = {"name": "digits", "version": version, "sha256": "ab" * 32}
    data = {"schema": 1, "type": "telemetry", "model": model,
            "inference": {"count": 50, "errors": 0, "interval_s": 30.0, "inferences_per_s": 1.7,
                          "latency_ms": {"p50": 2.0, "p95": 4.0, "p99": 5.0}},
            "system": {"cpu_percent": 20.0, "temperature_c": 50.0}}
    ref = {"name": "digits", "version": about or version}
    if drift is not None:
        data["drift"] = {"method": "psi", "score": drift, "inputs": drift, "outputs": drift / 3, "window": 1000,
                         "model": ref}
    if confusion is not None:
        data["feedback"] = {"model": ref, "labels": sum(map(sum, confusion)), "unmatched": 2,
                            "classes": len(confusion), "confusion": confusion}
    return encode({"v": 1, "device_id": device, "seq": seq, "ts": ts or time.time(), "data": data})


def topic(device: str, channel: str) -> str:
    return f"lf/v1/{FLEET}/device/{device}/{channel}"


@pytest.fixture
def fleet(mosquitto, store, repository, tmp_path):
    """Ingest from the broker into the store; the API over it; three devices that reported."""
    from fleet.api import ApiServer, ServerApi, ensure_token
    from fleet.ingest import Ingestor
    ingest_link = MqttLink(mosquitto.url, "server-ingest", manual_ack=True, backoff=(0.05, 0.5))
    ingestor = Ingestor(ingest_link, store, FLEET, flush_ms=50)
    ingestor.start()
    ingest_link.start()
    wait_for(lambda: ingestor.stats()["subscribed"], 15, "the ingestor to subscribe")
    devices = MqttLink(mosquitto.url, "devices", clean_start=True, session_expiry_s=0, backoff=(0.05, 0.5))
    devices.start()
    assert devices.wait_connected(10)
    now = time.time()
    messages = [
        (topic("cam-1", "status"), status("cam-1", 3)), (topic("cam-2", "status"), status("cam-2", 3)),
        (topic("cam-3", "status"), status("cam-3", 2)),
        (topic("cam-1", "telemetry"), telemetry("cam-1", 1, 3, drift=0.04, confusion=CAM1_V3, ts=now)),
        # an older report redelivered late must not replace the newer one
        (topic("cam-1", "telemetry"), telemetry("cam-1", 0, 3, drift=0.9, confusion=[[1, 0, 0]] * 3, ts=now - 60)),
        (topic("cam-2", "telemetry"), telemetry("cam-2", 1, 3, drift=0.31, confusion=CAM2_V3, ts=now)),
        (topic("cam-3", "telemetry"), telemetry("cam-3", 1, 2, drift=0.02, confusion=CAM3_V2, ts=now)),
    ]
    assert all(tok.wait(10) for tok in [devices.publish(t, p, qos=1) for t, p in messages])
    wait_for(lambda: ingestor.stats()["telemetry"] == 4 and ingestor.stats()["pending"] == 0, 15,
             "the four telemetry messages in the store")
    data = tmp_path / "data"
    token = ensure_token(data)
    api = ApiServer(ServerApi(store, token, blob_store=repository), port=0).start()
    api.token = token
    api.token_file = data / "api-token"
    try:
        yield api
    finally:
        api.stop()
        devices.stop()
        ingestor.stop()
        ingest_link.stop()


def get(api, path: str) -> dict:
    request = urllib.request.Request(api.url + path, headers={"Authorization": f"Bearer {api.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if path != "/metrics" else body.decode()


def cli(api, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("LITEFLEET_API_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "litefleet.cli", "fleet", *args, "--server", api.url,
                           "--token-file", str(api.token_file)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_field_accuracy_and_drift_reach_the_api_beside_the_converters_figures(fleet):
    from sklearn.metrics import precision_recall_fscore_support
    doc = get(fleet, "/api/v1/models/digits/versions/3/quality")
    total = quality.sum_confusions([CAM1_V3, CAM2_V3])
    assert doc["field"]["confusion"] == total
    y, p = labels_of(total)
    assert doc["field"]["labels"] == 153 and doc["field"]["correct"] == 136 and doc["field"]["devices"] == 2
    assert doc["field"]["accuracy"] == pytest.approx(136 / 153)
    assert doc["field"]["unmatched"] == 4
    precision, recall, f1, _ = precision_recall_fscore_support(y, p, zero_division=0)
    assert [c["precision"] for c in doc["field"]["per_class"]] == pytest.approx(list(precision))
    assert [c["recall"] for c in doc["field"]["per_class"]] == pytest.approx(list(recall))
    assert [c["f1"] for c in doc["field"]["per_class"]] == pytest.approx(list(f1))
    # The converter's figures, from the signed manifest in the repository.
    (conv,) = doc["converter"]
    assert conv["profile"] == "x86-cpu" and conv["accuracy"] == pytest.approx(0.9) and conv["samples"] == 200
    assert [c["class"] for c in conv["per_class"]] == [0, 1, 2]
    assert doc["converter_accuracy"] == pytest.approx(0.9)
    assert doc["accuracy_delta_points"] == pytest.approx((136 / 153 - 0.9) * 100, abs=1e-3)
    # Drift: cam-2 is over the default threshold 0.2; cam-1 kept its newer report.
    assert doc["drift"]["drifting"] == ["cam-2"] and doc["drift"]["devices"] == 2
    by_device = {d["device_id"]: d for d in doc["devices"]}
    assert by_device["cam-1"]["drift"]["score"] == 0.04 and by_device["cam-1"]["labels"] == 100
    assert by_device["cam-2"]["drifting"] and not by_device["cam-1"]["drifting"]

    listing = get(fleet, "/api/v1/quality?model=digits")
    assert [(m["name"], m["version"]) for m in listing["models"]] == [("digits", 3), ("digits", 2)]
    v2 = listing["models"][1]
    assert v2["field"]["accuracy"] == pytest.approx(55 / 65) and v2["converter"] == []

    devices = get(fleet, "/api/v1/devices")
    assert devices["summary"]["drifting"] == 1 and devices["summary"]["drift_threshold"] == 0.2
    assert {d["device_id"]: (d["drift"] or {}).get("score") for d in devices["devices"]} == \
        {"cam-1": 0.04, "cam-2": 0.31, "cam-3": 0.02}
    page = get(fleet, "/api/v1/devices/cam-2")
    assert page["quality"]["models"][0]["drifting"] is True
    assert page["quality"]["models"][0]["accuracy"] == pytest.approx(44 / 53)

    metrics = get(fleet, "/metrics")
    assert 'litefleet_device_drift_score{device="cam-2",model="digits",version="3"} 0.31' in metrics
    assert 'litefleet_model_drifting_devices{model="digits",version="3"} 1.0' in metrics
    assert f'litefleet_model_field_accuracy{{model="digits",version="3"}} {136 / 153}' in metrics

    unknown = urllib.request.Request(fleet.url + "/api/v1/models/digits/versions/9/quality",
                                     headers={"Authorization": f"Bearer {fleet.token}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(unknown, timeout=10)
    assert err.value.code == 404 and "no quality reports for digits v9" in json.loads(err.value.read())["error"]


def test_the_cli_shows_drift_in_fleet_status_and_field_accuracy_in_fleet_quality(fleet, store):
    r = cli(fleet, "status")
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("cam-")}
    assert "0.31 !" in lines["cam-2"] and "0.04" in lines["cam-1"] and "!" not in lines["cam-1"]
    assert "drifting: 1 (drift > 0.2)" in r.stdout

    r = cli(fleet, "quality", "digits")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "field accuracy: 88.9% from 153 label(s) on 2 device(s) (4 unmatched)" in out
    assert "converter (eval data): x86-cpu: 90.0% on 200 samples" in out
    assert "over 0.2: cam-2" in out
    versions = [line.split() for line in out.splitlines() if line.startswith(("v2 ", "v3 "))]
    assert [v[0] for v in versions] == ["v3", "v2"]
    assert versions[0][-1] == "pt" and versions[0][-2] == "-1.1"

    r = cli(fleet, "quality", "digits", "--version", "v2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["version"] == 2 and doc["field"]["labels"] == 65

    r = cli(fleet, "quality", "nosuch")
    assert r.returncode == 1 and "no device has reported drift or feedback for model 'nosuch'" in r.stderr


def test_the_alert_engine_flags_the_drifting_device(fleet, store):
    from fleet.alerts import AlertConfig, AlertEngine
    engine = AlertEngine(store, AlertConfig(drift_threshold=0.2), max_temperatures={})
    opened = engine.run_once()
    assert [(a["device_id"], a["kind"]) for a in opened] == [("cam-2", "drift")]
    assert opened[0]["message"] == ("cam-2: data drift 0.31 (PSI) on digits v3 over its last 1000 inferences, "
                                    "over the threshold 0.2 (inputs 0.31, outputs 0.10)")
    strict = AlertEngine(store, AlertConfig(drift_threshold=0.03), max_temperatures={})
    assert {a["device_id"] for a in strict.run_once()} == {"cam-1"}      # cam-2 already open
