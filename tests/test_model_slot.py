"""ModelSlot: atomic swaps, in-flight requests finish on the old model, which is closed once idle.
Real LoadedModels of the digits CNN; close() is wrapped to record when it happens."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.errors import InferenceError
from agent.model_slot import ModelSlot
from tests.test_api import load


@pytest.fixture(scope="module")
def image(digits) -> np.ndarray:
    return digits[2][:1]


def watched(model_bytes: bytes, version: int, mode: str, slot_ref: list | None = None):
    """A real model whose close() records (version, requests still using it at that moment)."""
    model = load(model_bytes, version, mode, workers=1)
    model.close_log = []
    original = model.close

    def close() -> None:
        in_use = slot_ref[0].in_use(model) if slot_ref else None
        model.close_log.append(in_use)
        original()
    model.close = close
    return model


def test_empty_slot_answers_503(image):
    slot = ModelSlot()
    assert slot.get() is None
    with pytest.raises(InferenceError) as info:
        with slot.use():
            pass
    assert info.value.status == 503 and "no model is loaded" in str(info.value)


def test_swap_replaces_and_closes_an_idle_model(digits_tflite_int8, digits_tflite_float, image):
    a = watched(digits_tflite_float, 1, "float32")
    b = watched(digits_tflite_int8, 2, "int8")
    slot = ModelSlot(a)
    with slot.use() as m:
        assert m is a and m.predict([image])[0].shape == (1, 10)
    assert slot.swap(b) is a
    assert a.close_log == [None]          # idle: closed at once
    assert slot.get() is b
    with slot.use() as m:
        assert m.version == 2
    with pytest.raises(InferenceError) as info:
        a.predict([image])                # really closed: the engine refuses
    assert info.value.status == 503
    assert b.close_log == []
    slot.close(timeout=5)
    assert b.close_log == [None]


def test_request_in_flight_finishes_on_the_old_model(digits_tflite_int8, digits_tflite_float, image):
    ref: list = []
    a = watched(digits_tflite_float, 1, "float32", ref)
    b = watched(digits_tflite_int8, 2, "int8", ref)
    slot = ModelSlot(a)
    ref.append(slot)
    with slot.use() as old:
        assert slot.swap(b) is a
        assert a.close_log == [] and slot.in_use(a) == 1
        assert not slot.wait_idle(a, timeout=0.05)
        with slot.use() as new:
            assert new is b                   # new requests get the new model at once
        out = old.predict([image])[0]         # the old one still works for its request
        assert out.shape == (1, 10) and a.close_log == []
    assert a.close_log == [0]                 # closed after the last request, by it
    assert slot.wait_idle(a, timeout=1)
    slot.close(timeout=5)


def test_swapping_the_same_model_or_back_before_idle_keeps_it_open(digits_tflite_int8, digits_tflite_float):
    a = watched(digits_tflite_float, 1, "float32")
    b = watched(digits_tflite_int8, 2, "int8")
    slot = ModelSlot(a)
    assert slot.swap(a) is a and a.close_log == []
    with slot.use():
        slot.swap(b)
        slot.swap(a)                          # rolled back while a request still ran on a
    assert a.close_log == [] and b.close_log == [None]
    assert slot.get() is a
    slot.close(timeout=5)
    assert a.close_log == [None]


def test_a_failing_close_does_not_break_the_request(digits_tflite_int8, caplog):
    a = load(digits_tflite_int8, 1, "int8", workers=1)
    b = load(digits_tflite_int8, 2, "int8", workers=1)

    def broken_close() -> None:
        raise RuntimeError("delegate teardown failed")
    a.close = broken_close
    slot = ModelSlot(a)
    with slot.use():
        slot.swap(b)
    assert "closing model digits failed" in caplog.text
    assert slot.wait_idle(a, timeout=1)
    slot.close(timeout=5)


def test_concurrent_use_and_swaps_never_close_a_model_in_use(digits_tflite_int8, digits_tflite_float, image):
    ref: list = []
    slot = ModelSlot(watched(digits_tflite_float, 1, "float32", ref))
    ref.append(slot)
    models = [slot.get()]
    errors: list[str] = []
    stop = threading.Event()

    def user() -> None:
        while not stop.is_set():
            try:
                with slot.use() as m:
                    m.predict([image])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

    threads = [threading.Thread(target=user) for _ in range(6)]
    for t in threads:
        t.start()
    for n in range(25):
        data, mode = (digits_tflite_int8, "int8") if n % 2 == 0 else (digits_tflite_float, "float32")
        new = watched(data, n + 2, mode, ref)
        models.append(new)
        slot.swap(new)
    stop.set()
    for t in threads:
        t.join(30)
    slot.close(timeout=5)
    assert errors == []
    for m in models:
        assert slot.wait_idle(m, timeout=5)
        assert m.close_log == [0]         # closed exactly once, and never while a request used it
