"""Accuracy in the field: labels posted for earlier predictions become confusion counts per model
version, reported in telemetry by a real agent process and kept across its restarts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.api import InferenceApi, Request
from agent.commands.predict import ApiClient
from agent.feedback import FeedbackBook
from agent.model_slot import ModelSlot
from tests.conftest import run_cli
from tests.support.agents import AgentProcess, make_device, wait_for
from tests.support.bundles import make_bundle
from tests.test_api import load

N = 40


def post(api: InferenceApi, path: str, doc) -> tuple[int, dict]:
    response = api.handle(Request("POST", path, {"Content-Type": "application/json"}, json.dumps(doc).encode()))
    return response.status, json.loads(response.body)


def confusion(labels, predicted, classes: int = 10) -> list[list[int]]:
    matrix = np.zeros((classes, classes), dtype=int)
    for t, p in zip(labels, predicted):
        matrix[t, p] += 1
    return matrix.tolist()


@pytest.fixture(scope="module")
def model(digits_tflite_int8):
    loaded = load(digits_tflite_int8, 3, "int8")
    yield loaded
    loaded.close()


@pytest.fixture
def api(model):
    return InferenceApi(ModelSlot(model), feedback=FeedbackBook(capacity=100))


def test_labels_for_single_predictions_build_the_confusion_matrix(api, digits):
    _, _, x_test, y_test = digits
    ids, predicted = [], []
    for image in x_test[:N]:
        status, doc = post(api, "/v1/models/digits:predict", {"instances": [image.tolist()]})
        assert status == 200 and doc["prediction_id"] == doc["id"] and len(doc["prediction_id"]) == 32
        ids.append(doc["prediction_id"])
        predicted.append(int(np.argmax(doc["predictions"][0])))
    for ident, label in zip(ids, y_test[:N]):
        status, doc = post(api, "/v1/models/digits:feedback", {"prediction_id": ident, "label": int(label)})
        assert status == 200 and doc["correct"] == (doc["predicted"] == label) and doc["model_version"] == "3"
    report = api.feedback_report()
    assert report == {"model": {"name": "digits", "version": 3}, "labels": N, "unmatched": 0, "classes": 10,
                      "confusion": confusion(y_test[:N], predicted)}
    assert np.trace(np.asarray(report["confusion"])) > 0.85 * N        # the model is good on digits

    # a corrected label moves the count instead of adding one
    first = int(y_test[0])
    status, doc = post(api, "/v1/models/digits:feedback", {"prediction_id": ids[0], "label": (first + 1) % 10})
    assert status == 200 and doc["relabelled"]
    fixed = confusion([(first + 1) % 10, *y_test[1:N]], predicted)
    assert api.feedback_report()["confusion"] == fixed and api.feedback_report()["labels"] == N


def test_a_batch_gets_one_id_per_row_and_labels_in_one_request(api, digits):
    _, _, x_test, y_test = digits
    status, doc = post(api, "/v1/models/digits:predict", {"instances": x_test[:8].tolist()})
    assert status == 200 and len(doc["prediction_ids"]) == 8 and doc["prediction_id"] not in doc["prediction_ids"]
    predicted = np.asarray(doc["predictions"]).argmax(axis=1)
    status, err = post(api, "/v1/models/digits:feedback", {"prediction_id": doc["prediction_id"], "label": 1})
    assert status == 400 and "batch of 8 rows" in err["error"]
    labels = [{"prediction_id": i, "label": int(y)} for i, y in zip(doc["prediction_ids"], y_test[:8])]
    labels.append({"prediction_id": "0" * 32, "label": 2})                # never given out
    status, answer = post(api, "/v1/models/digits:feedback", {"labels": labels})
    assert status == 200 and answer["recorded"] == 8 and answer["unmatched"] == 1
    assert [r["status"] for r in answer["results"]] == [200] * 8 + [404]
    report = api.feedback_report()
    assert report["labels"] == 8 and report["unmatched"] == 1
    assert report["confusion"] == confusion(y_test[:8], predicted)


def test_unknown_ids_are_404_and_unmatched_bad_labels_are_400_and_not_counted(api, digits):
    _, _, x_test, _ = digits
    status, doc = post(api, "/v1/models/digits:predict", {"instances": [x_test[0].tolist()]})
    ident = doc["prediction_id"]
    status, err = post(api, "/v1/models/digits:feedback", {"prediction_id": "f" * 32, "label": 3})
    assert status == 404 and "unknown or expired" in err["error"] and "last 100 predictions" in err["error"]
    for body, words in [({"prediction_id": ident, "label": 10}, "out of range: model digits v3 has classes 0-9"),
                        ({"prediction_id": ident, "label": -1}, "out of range"),
                        ({"prediction_id": ident, "label": 2.5}, "whole number"),
                        ({"prediction_id": ident, "label": True}, "whole number"),
                        ({"prediction_id": ident}, "exactly"),
                        ({"labels": [{"prediction_id": ident, "label": 3}, {"prediction_id": ident, "label": 99}]},
                         "out of range"),
                        ([1, 2], "JSON object")]:
        status, err = post(api, "/v1/models/digits:feedback", body)
        assert status == 400 and words in err["error"], (body, err)
    status, err = post(api, "/v1/models/cats:feedback", {"prediction_id": ident, "label": 3})
    assert status == 404 and "'cats' is not served" in err["error"]
    report = api.feedback_report()
    assert report["labels"] == 0 and report["unmatched"] == 1           # only the unknown id counted


def test_memory_is_a_bounded_ring(model, digits):
    api = InferenceApi(ModelSlot(model), feedback=FeedbackBook(capacity=5))
    _, _, x_test, _ = digits
    ids = [post(api, "/v1/models/digits:predict", {"instances": [x.tolist()]})[1]["prediction_id"] for x in x_test[:6]]
    assert post(api, "/v1/models/digits:feedback", {"prediction_id": ids[0], "label": 0})[0] == 404   # evicted
    assert post(api, "/v1/models/digits:feedback", {"prediction_id": ids[1], "label": 0})[0] == 200
    assert len(api.feedback._ring) == 5


def test_counts_survive_a_restart_and_a_damaged_file_is_kept_aside(tmp_path):
    path = tmp_path / "feedback.json"
    book = FeedbackBook(path)
    _, rows = book.remember("digits", 2, 3, [0, 1, 2, 2])
    book.record("digits", 2, 3, [(rows[0], 0), (rows[1], 2), (rows[3], 2), ("nope", 1)])
    assert book.flush() and not book.flush()                           # nothing new: no second write
    again = FeedbackBook(path)
    assert again.report("digits", 2) == {"model": {"name": "digits", "version": 2}, "labels": 3, "unmatched": 1,
                                         "classes": 3, "confusion": [[1, 0, 0], [0, 0, 0], [0, 1, 1]]}
    assert again.report("digits", 1) is None
    path.write_text("{not json")
    fresh = FeedbackBook(path)
    assert fresh.report("digits", 2) is None
    assert [p.name.startswith("feedback.json.damaged-") for p in tmp_path.iterdir()] == [True]


def test_real_agent_reports_field_confusion_and_drift_and_keeps_the_counts_across_a_restart(
        tmp_path, keys_dir, release_key, digits_tflite_int8, digits):
    from converter import datastats as host
    x_train, _, x_test, y_test = digits
    profile = host.profile(digits_tflite_int8, x_train[:500])
    device = make_device(tmp_path / "dev", keys_dir, telemetry_interval_s=0.3)
    bundle = make_bundle(tmp_path / "v1.lfb", digits_tflite_int8, release_key, version=1, mode="int8",
                         data_profile=profile.to_dict())
    assert run_cli("agent", "install-bundle", str(bundle), "--config", str(device.config)).returncode == 0

    agent = AgentProcess(device)
    try:
        agent.wait_serving(90)
        client = ApiClient(unix_socket=str(device.socket))
        rows = 120                                   # one request, 120 inferences: enough for a drift score
        answer = client.json("POST", "/v1/models/digits:predict",
                             json.dumps({"instances": x_test[:rows].tolist()}).encode())
        predicted = np.asarray(answer["predictions"]).argmax(axis=1)
        labels = [{"prediction_id": i, "label": int(y)} for i, y in zip(answer["prediction_ids"], y_test[:rows])]
        done = client.json("POST", "/v1/models/digits:feedback", json.dumps({"labels": labels}).encode())
        assert done["recorded"] == rows
        expected = confusion(y_test[:rows], predicted)

        def reported() -> dict | None:
            telemetry = device.status().get("telemetry") or {}
            return telemetry if (telemetry.get("feedback") or {}).get("labels") == rows else None
        telemetry = wait_for(reported, 20, "telemetry with the field labels")
        assert telemetry["feedback"] == {"model": {"name": "digits", "version": 1}, "labels": rows,
                                         "unmatched": 0, "classes": 10, "confusion": expected}
        drift = telemetry["drift"]
        assert drift["method"] == "psi" and drift["window"] == rows and drift["score"] < 0.1
        assert telemetry["api"] == {"unauthorized": 0, "forbidden": 0}
    finally:
        assert agent.stop() == 0, agent.log()

    again = AgentProcess(device)
    try:
        again.wait_serving(90)
        telemetry = wait_for(lambda: (device.status().get("telemetry") or {}).get("feedback"), 20,
                             "telemetry after the restart")
        assert telemetry["confusion"] == expected and telemetry["labels"] == rows
        assert "drift" not in device.status()["telemetry"]              # a new window: nothing seen yet
    finally:
        assert again.stop() == 0, again.log()
