"""The converter's data profile on real digits data: PSI separates held-out digits from shifted ones.

The reference is the training split (as calibration data) and the converted model's outputs on
it. With the binning a device uses (agent.protocol.datastats), held-out digits must read as
stable; brighter and inverted digits as a major shift; noisy digits (Gaussian noise, sd 0.25,
clipped to [0, 1], so half the noise on the black background vanishes) as at least moderate.
"""

from __future__ import annotations

import numpy as np
import pytest

from agent.protocol import bundle as bundle_mod
from agent.protocol import datastats
from agent.protocol.datastats import DataProfile
from converter import datastats as conv
from converter.errors import DataError


@pytest.fixture(scope="module", params=["float32", "int8"])
def reference(request, digits, digits_tflite_float, digits_tflite_int8):
    model = digits_tflite_float if request.param == "float32" else digits_tflite_int8
    x_train = digits[0][:500]
    return model, conv.profile(model, x_train)


def shifted(x: np.ndarray, how: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if how == "brighter":
        return np.clip(x + 0.3, 0.0, 1.0)
    if how == "inverted":
        return 1.0 - x
    return np.clip(x + rng.normal(0.0, 0.25, x.shape), 0.0, 1.0).astype(np.float32)


def test_profile_describes_the_calibration_data_and_the_model_outputs(reference, digits):
    _, found = reference
    doc = found.to_dict()
    assert DataProfile.from_dict(doc) == found          # what the manifest validates
    assert doc["samples"] == 500
    (channel,) = doc["inputs"][0]["channels"]            # (8, 8, 1): one channel
    x = digits[0][:500]
    assert channel["mean"] == pytest.approx(float(x.mean()), abs=1e-6)
    assert channel["std"] == pytest.approx(float(x.std()), abs=1e-6)
    assert channel["edges"][0] == 0.0 and channel["edges"][-1] == 1.0
    (out,) = doc["outputs"]
    assert out["kind"] == "classes" and len(out["fractions"]) == 10
    # The training split is balanced over 10 digits and the model is good on it.
    assert all(0.05 < f < 0.15 for f in out["fractions"])
    assert out["mean_top1"] > 0.8


def test_held_out_digits_are_stable(reference, digits):
    model, found = reference
    result = conv.drift(found, model, digits[2])
    assert result["score"] < datastats.PSI_STABLE, result


@pytest.mark.parametrize("how, reading", [("brighter", "major"), ("inverted", "major"), ("noisy", "moderate")])
def test_shifted_digits_are_flagged(reference, digits, how, reading):
    model, found = reference
    held_out = conv.drift(found, model, digits[2])["score"]
    result = conv.drift(found, model, shifted(digits[2], how))
    assert datastats.reading(result["score"]) in (("major",) if reading == "major" else ("moderate", "major")), result
    assert result["score"] > (5 if reading == "major" else 2) * held_out, (result, held_out)


def test_channels_of_a_short_last_axis_are_profiled_separately():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 1, (200, 4)), rng.normal(10, 2, (200, 4)), rng.uniform(0, 1, (200, 4))], axis=-1)
    found = conv.input_profile("rgb", x)
    assert [round(c.mean) for c in found.channels] == [0, 10, 0]
    for c in found.channels:
        assert sum(c.fractions) == pytest.approx(1.0)
        assert all(f == pytest.approx(0.1, abs=0.02) for f in c.fractions)   # deciles: equal shares


def test_too_little_or_non_finite_data_is_refused(digits_tflite_float, digits):
    with pytest.raises(DataError, match="at least 2 samples"):
        conv.profile(digits_tflite_float, digits[0][:1])
    bad = digits[0][:10].copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        conv.profile(digits_tflite_float, bad)


def test_convert_puts_the_profile_into_the_signed_manifest(tmp_path, digits, digits_tflite_int8, keys_dir,
                                                          trusted_keys):
    from converter.pipeline import convert_to_bundle
    x_train, y_train, x_test, y_test = digits
    np.savez(tmp_path / "cal.npz", x=x_train[:200], y=y_train[:200])
    np.savez(tmp_path / "eval.npz", x=x_test[:100], y=y_test[:100])
    model = tmp_path / "digits.tflite"
    model.write_bytes(digits_tflite_int8)
    result = convert_to_bundle(model, "x86-cpu", calibration=tmp_path / "cal.npz", eval=tmp_path / "eval.npz",
                               name="digits", version=1, sign_key=keys_dir / "release.key", out_dir=tmp_path / "out")
    verified = bundle_mod.verify(bundle_mod.read_bundle(result.bundle_path), trusted_keys)
    found = verified.manifest.data_profile
    assert found is not None and found.samples == 200
    assert found.inputs[0].name == verified.manifest.doc["inputs"][0]["name"]
    assert found.outputs[0].kind == "classes"
