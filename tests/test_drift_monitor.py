"""Drift on the device: a DriftMonitor fed real digits through a real model, against the data profile
the converter records (converter/datastats.py) on the training digits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.api import InferenceApi, Request
from agent.drift import MIN_SAMPLES, DriftMonitor
from agent.model_slot import ModelSlot
from tests.test_api import load

WINDOW = 300


@pytest.fixture(scope="module")
def profile(digits, digits_tflite_int8):
    """The digits model's data profile on 500 training digits, as `litefleet convert` records it."""
    from converter import datastats as host
    x_train = digits[0]
    return host.profile(digits_tflite_int8, x_train[:500])


@pytest.fixture(scope="module")
def model(digits_tflite_int8, profile):
    """The int8 digits model as the agent loads it, from a manifest that carries the profile."""
    loaded = load(digits_tflite_int8, 4, "int8", data_profile=profile.to_dict())
    yield loaded
    loaded.close()


def monitor_for(model, window: int = WINDOW) -> DriftMonitor:
    monitor = DriftMonitor.for_model(model, window=window)
    assert monitor is not None
    return monitor


def feed(monitor: DriftMonitor, model, x: np.ndarray, batch: int = 1) -> None:
    """What the API does after each predict: real inputs and the model's real outputs."""
    for i in range(0, len(x), batch):
        rows = x[i:i + batch].astype(np.float32)
        outputs = [np.concatenate([model.predict([r[None]])[0] for r in rows])]
        monitor.observe([rows], outputs)


def test_matching_digits_score_low_and_shifted_digits_clearly_higher(digits, model):
    _, _, x_test, _ = digits
    x = x_test[:WINDOW]
    same = monitor_for(model)
    feed(same, model, x)
    inverted = monitor_for(model)
    feed(inverted, model, 1.0 - x)                     # light digits on a dark ground
    brightened = monitor_for(model)
    feed(brightened, model, np.clip(x + 0.35, 0, 1))   # an over-exposed camera

    calm, flipped, bright = same.report(), inverted.report(), brightened.report()
    assert calm["method"] == "psi" and calm["window"] == WINDOW
    assert calm["model"] == {"name": "digits", "version": 4}
    assert calm["score"] < 0.1, calm                          # "stable" by the conventional reading
    assert flipped["score"] > 0.25 and bright["score"] > 0.25, (flipped, bright)   # "major shift"
    assert min(flipped["score"], bright["score"]) > 10 * calm["score"]
    assert flipped["inputs"] > 0.5 > 50 * calm["inputs"]


def test_the_device_scores_a_batch_as_the_converter_does(digits, digits_tflite_int8, model, profile):
    """Same edges, same binning, same PSI: the monitor over one window equals the host's figure."""
    from converter import datastats as host
    _, _, x_test, _ = digits
    for x in (x_test[:WINDOW], 1.0 - x_test[:WINDOW]):
        monitor = monitor_for(model)
        feed(monitor, model, x, batch=25)                  # batches count row by row
        expected = host.drift(profile, digits_tflite_int8, x)
        got = monitor.report()
        assert got["inputs"] == pytest.approx(expected["inputs"], abs=1e-4)
        assert got["outputs"] == pytest.approx(expected["outputs"], abs=1e-4)
        assert got["score"] == pytest.approx(expected["score"], abs=1e-4)


def test_the_window_slides_and_memory_stays_bounded(digits, model):
    _, _, x_test, _ = digits
    monitor = monitor_for(model, window=150)
    feed(monitor, model, x_test[:MIN_SAMPLES - 1])
    assert monitor.report() is None                       # too few inferences to say anything
    feed(monitor, model, 1.0 - x_test[:150])
    assert monitor.report()["score"] > 0.25
    ring_bytes = monitor.memory_bytes
    feed(monitor, model, x_test[150:300])                 # the shifted inferences leave the window
    after = monitor.report()
    assert after["score"] < 0.1 and after["window"] == 150
    assert monitor.seen == MIN_SAMPLES - 1 + 300
    # per inference: 10 input bins and its winning class (int32), plus the running totals
    assert monitor.memory_bytes == ring_bytes == 150 * (10 + 1) * 4 + 10 * 8 + 10 * 8


def test_api_feeds_the_served_models_monitor_and_starts_afresh_on_a_swap(digits, digits_tflite_int8, model,
                                                                       profile):
    _, _, x_test, _ = digits
    slot = ModelSlot(model)
    api = InferenceApi(slot, drift_window=200)
    body = json.dumps({"instances": (1.0 - x_test[:120]).tolist()}).encode()
    assert api.handle(Request("POST", "/v1/models/digits:predict", {}, body)).status == 200
    report = api.drift_report()
    assert report is not None and report["window"] == 120 and report["score"] > 0.25

    newer = load(digits_tflite_int8, 5, "int8", data_profile=profile.to_dict())
    slot.swap(newer)
    assert api.drift_report() is None                     # v5 has seen nothing yet
    body = json.dumps({"instances": x_test[:MIN_SAMPLES].tolist()}).encode()
    assert api.handle(Request("POST", "/v1/models/digits:predict", {}, body)).status == 200
    report = api.drift_report()
    assert report["model"]["version"] == 5 and report["window"] == MIN_SAMPLES and report["score"] < 0.1
    slot.swap(model)                                      # give the module's model back, unclosed
    newer.close()


def test_a_model_without_a_profile_reports_no_drift(digits_tflite_int8, digits):
    plain = load(digits_tflite_int8, 2, "int8")
    try:
        assert DriftMonitor.for_model(plain) is None
        api = InferenceApi(ModelSlot(plain))
        body = json.dumps({"instances": digits[2][:MIN_SAMPLES].tolist()}).encode()
        assert api.handle(Request("POST", "/v1/models/digits:predict", {}, body)).status == 200
        assert api.drift_report() is None
    finally:
        plain.close()


def test_large_inputs_are_read_at_a_bounded_number_of_positions():
    """A camera frame costs what a small input does: at most MAX_VALUES positions per channel."""
    from agent.drift import MAX_VALUES
    from agent.protocol.datastats import ChannelProfile, DataProfile, InputProfile, OutputProfile
    edges = tuple(float(e) for e in np.linspace(0, 1, 11))
    channel = ChannelProfile(0.5, 0.29, edges, (0.1,) * 10)
    profile = DataProfile(samples=10, inputs=(InputProfile("frame", (channel,) * 3),),
                          outputs=(OutputProfile("logits", "classes", (0.5, 0.5), mean_top1=0.9),))
    monitor = DriftMonitor(profile, [(1, 224, 224, 3)], [(1, 2)], window=MIN_SAMPLES)
    rng = np.random.default_rng(1)
    for _ in range(MIN_SAMPLES):
        monitor.observe([rng.uniform(0, 1, (1, 224, 224, 3)).astype(np.float32)], [np.array([[0.2, 0.8]])])
    per_channel = monitor._totals[:10].sum()
    assert per_channel == MIN_SAMPLES * MAX_VALUES
    report = monitor.report()
    assert report["inputs"] < 0.01            # uniform frames match the uniform profile
    assert report["outputs"] > 1              # but the model always answers class 1: a major shift
