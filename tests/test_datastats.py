"""The data profile's schema, binning and PSI, shared by the converter and the agent."""

from __future__ import annotations

import copy
import math
import random

import pytest

from agent.protocol import bundle as bundle_mod
from agent.protocol import datastats
from agent.protocol.datastats import DataProfile, bin_counts, bin_index, psi
from agent.protocol.errors import BundleError, SchemaError
from agent.protocol.manifest import Manifest
from tests.support.bundles import manifest_for

EDGES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
UNIFORM = [0.1] * 10


def profile_doc() -> dict:
    return {
        "version": 1, "samples": 500,
        "inputs": [{"name": "input", "channels": [
            {"mean": 0.5, "std": 0.29, "edges": list(EDGES), "fractions": list(UNIFORM)}]}],
        "outputs": [
            {"name": "logits", "kind": "classes", "fractions": [0.5, 0.25, 0.25], "mean_top1": 0.93},
            {"name": "score", "kind": "scores", "edges": list(EDGES), "fractions": list(UNIFORM)},
        ],
    }


def test_first_and_last_bins_are_open_ended():
    assert bin_index(EDGES, -5.0) == 0
    assert bin_index(EDGES, 0.05) == 0
    assert bin_index(EDGES, 0.1) == 1          # an inner edge starts its bin
    assert bin_index(EDGES, 0.95) == 9
    assert bin_index(EDGES, 42.0) == 9
    assert bin_counts(EDGES, [-1, 0.15, 0.15, 0.9, 7]) == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]


def test_bin_counts_agree_with_bin_index():
    rng = random.Random(1)
    values = [rng.gauss(0.5, 0.4) for _ in range(2000)]
    counts = bin_counts(EDGES, values)
    expected = [0] * 10
    for v in values:
        expected[bin_index(EDGES, v)] += 1
    assert counts == expected and sum(counts) == len(values)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift():
    assert psi(UNIFORM, [100] * 10) == pytest.approx(0.0)
    small = psi(UNIFORM, [120, 110, 100, 100, 100, 100, 100, 100, 90, 80])
    large = psi(UNIFORM, [500, 300, 100, 50, 50, 0, 0, 0, 0, 0])
    assert 0 < small < datastats.PSI_STABLE < datastats.PSI_MAJOR < large
    assert math.isfinite(large)                # empty bins are floored, never infinite
    assert datastats.reading(small) == "stable" and datastats.reading(large) == "major"


def test_psi_matches_the_textbook_formula():
    expected, counts = [0.2, 0.3, 0.5], [30, 30, 40]
    observed = [0.3, 0.3, 0.4]
    want = sum((o - e) * math.log(o / e) for o, e in zip(observed, expected))
    assert psi(expected, counts) == pytest.approx(want)


def test_psi_refuses_mismatched_or_empty_counts():
    with pytest.raises(ValueError, match="as many observed bins"):
        psi(UNIFORM, [1, 2, 3])
    with pytest.raises(ValueError, match="no samples"):
        psi(UNIFORM, [0] * 10)


def test_channels_are_the_short_last_axis_and_classes_are_one_row():
    assert datastats.channel_count([1, 8, 8, 3]) == 3
    assert datastats.channel_count([1, 64]) == 1        # 64 features are not channels
    assert datastats.channel_count([1, 8, 8, 1]) == 1
    assert datastats.is_classes([1, 10]) and not datastats.is_classes([1, 1]) and not datastats.is_classes([1, 4, 4])


def test_top1_softmaxes_logits_but_not_probabilities():
    assert datastats.top1([0.1, 0.7, 0.2]) == (1, pytest.approx(0.7))
    index, conf = datastats.top1([1.0, 3.0, 0.0])
    assert index == 1 and conf == pytest.approx(math.exp(3) / (math.exp(1) + math.exp(3) + 1))
    assert datastats.drift_score([0.1, 0.3], 0.05) == pytest.approx(0.2)
    assert datastats.drift_score([0.01], 0.4) == pytest.approx(0.4)


def test_profile_round_trips():
    profile = DataProfile.from_dict(profile_doc())
    assert profile.to_dict() == profile_doc()
    channel = profile.inputs[0].channels[0]
    assert channel.psi(channel.counts([i / 100 for i in range(100)])) == pytest.approx(0.0)
    assert profile.outputs[0].psi([50, 25, 25]) == pytest.approx(0.0)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["inputs"][0]["channels"][0].update(edges=EDGES[:5]), r"inputs\[0\]\.channels\[0\]\.edges: must list 11"),
    (lambda d: d["inputs"][0]["channels"][0].update(edges=list(reversed(EDGES))), "must not decrease"),
    (lambda d: d["inputs"][0]["channels"][0].update(fractions=[0.2] * 10), r"fractions: must sum to 1, got 2\.0"),
    (lambda d: d["inputs"][0]["channels"][0].update(mean=float("nan")), "must be a finite number"),
    (lambda d: d["outputs"][0].pop("mean_top1"), r"outputs\[0\]\.mean_top1: required"),
    (lambda d: d["outputs"][0].update(kind="probabilities"), "'probabilities' is not one of"),
    (lambda d: d["outputs"][1].pop("edges"), r"outputs\[1\]\.edges: required for a 'scores' output"),
    (lambda d: d.update(sample=3), "did you mean 'samples'"),
    (lambda d: d.update(version=2), "version: 2 is not one of 1"),
])
def test_bad_profiles_name_the_field(edit, message):
    doc = profile_doc()
    edit(doc)
    with pytest.raises(SchemaError, match=message):
        DataProfile.from_dict(doc, "bundle.lfb")


def test_manifest_carries_a_profile_through_signing(digits_tflite_float, release_key, trusted_keys):
    doc = manifest_for(digits_tflite_float, data_profile=profile_doc())
    verified = bundle_mod.verify(bundle_mod.parse_bundle(bundle_mod.build(doc, digits_tflite_float, release_key)),
                                 trusted_keys)
    assert verified.manifest.data_profile == DataProfile.from_dict(profile_doc())


def test_manifest_without_profile_still_parses(digits_tflite_float):
    assert Manifest.from_dict(manifest_for(digits_tflite_float)).data_profile is None


def test_manifest_with_bad_profile_is_rejected_naming_the_field(digits_tflite_float):
    bad = copy.deepcopy(profile_doc())
    bad["outputs"][0]["fractions"] = [0.9, 0.9, 0.9]
    with pytest.raises(BundleError, match=r"data_profile: outputs\[0\]\.fractions: must sum to 1"):
        Manifest.from_dict(manifest_for(digits_tflite_float, data_profile=bad))
