"""`litefleet convert --search`: real candidates (modes x pruning, real fine-tuning) for a real profile.

What an operator checks: the table lists every candidate with its size, compressed size,
latency, accuracy and why it does or does not fit; the chosen one is the smallest (or fastest)
that fits and is the only thing signed; when nothing fits, nothing is written.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from converter.search import Candidate, candidate_modes, rank
from tests.conftest import ROOT, run_cli
from tests.converter_fixtures import *  # noqa: F401,F403


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_keras, digits_npz, keys_dir):
    base = tmp_path_factory.mktemp("search")
    cal, ev = digits_npz
    # A profile nothing can fit: a 1 kB model budget.
    profiles = base / "profiles"
    profiles.mkdir()
    text = (ROOT / "firmware_profiles" / "rpi4-cpu.toml").read_text().replace("max_model_bytes = 50_000_000",
                                                                                 "max_model_bytes = 1_000")
    assert "max_model_bytes = 1_000" in text
    (profiles / "rpi4-cpu.toml").write_text(text)

    def convert(out: str, *extra: str) -> list[str]:
        return ["convert", str(digits_keras), "--calibration", str(cal), "--eval", str(ev), "--name", "digits",
                "--version", "1", "--sign-key", str(keys_dir / "release.key"), "-o", str(base / out), "--search",
                *extra]

    jobs = {
        "size": convert("size", "--profile", "rpi-zero2w-cpu", "--finetune", str(cal), "--epochs", "1", "--json"),
        # No --finetune: the pruned candidates are listed as not tried; human output (the table).
        "nothing_fits": convert("nothing_fits", "--profile", "rpi4-cpu", "--profiles-dir", str(profiles),
                                "--search-modes", "int8,float32"),
        "with_mode": convert("with_mode", "--profile", "rpi4-cpu", "--mode", "int8"),
    }
    with ThreadPoolExecutor(3) as pool:
        futures = {key: pool.submit(run_cli, *args) for key, args in jobs.items()}
        return {key: (future.result(), base / key) for key, future in futures.items()}


def test_search_lists_every_candidate_and_signs_only_the_smallest_that_fits(runs, keys_dir):
    proc, out = runs["size"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    table = doc["search"]
    modes = ["int8", "float32", "float16", "dynamic"]              # the profile's own mode first
    assert table["modes"] == modes and table["sparsities"] == [0.5, 0.8] and table["goal"] == "size"
    labels = [c["label"] for c in table["candidates"]]
    assert labels == modes + [f"{m} + prune 50%" for m in modes] + [f"{m} + prune 80%" for m in modes]
    for c in table["candidates"]:
        assert c["tried"] and c["model_bytes"] > 0 and 0 < c["deflate_bytes"] <= c["model_bytes"]
        assert c["latency_ms"] > 0 and c["accuracy"] is not None and c["drop_measure"] == "accuracy"
        assert c["fits"] == (c["drop_points"] <= table["max_accuracy_drop"]) == (not c["why_not"])
    fitting = [c for c in table["candidates"] if c["fits"]]
    chosen = [c for c in table["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["label"] == table["chosen"]
    assert chosen[0]["model_bytes"] == min(c["model_bytes"] for c in fitting)
    # Pruned float models are stored sparse, so pruning shrinks the file itself.
    by_label = {c["label"]: c for c in table["candidates"]}
    assert by_label["float32 + prune 80%"]["sparse_weights"]
    assert by_label["float32 + prune 80%"]["model_bytes"] < 0.5 * by_label["float32"]["model_bytes"]

    # Only the chosen candidate was bundled, with every check, and it is what the table says.
    assert sorted(p.name for p in out.iterdir()) == ["digits-v1-rpi-zero2w-cpu.lfb",
                                                     "digits-v1-rpi-zero2w-cpu.report.json"]
    assert doc["validation"]["ok"] and doc["quantization"]["mode"] == chosen[0]["mode"]
    assert json.loads((out / "digits-v1-rpi-zero2w-cpu.report.json").read_text())["search"] == table
    if chosen[0]["prune"]:
        assert doc["pruning"]["target"] == chosen[0]["prune"]
    verify = run_cli("bundle", "verify", str(out / "digits-v1-rpi-zero2w-cpu.lfb"),
                     "--trust", str(keys_dir / "release.pub"))
    assert verify.returncode == 0, verify.stderr


def test_when_nothing_fits_the_table_says_why_and_nothing_is_written(runs):
    proc, out = runs["nothing_fits"]
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "no candidate fits profile rpi4-cpu" in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    rows = {label: next((line for line in lines if line.startswith(f"│ {label} ")), "")
            for label in ("int8", "float32", "int8 + prune 50%", "float32 + prune 80%")}
    assert all(rows.values()), proc.stdout
    assert "> 1,000 B budget" in rows["int8"] and "> 1,000 B budget" in rows["float32"]
    assert "needs --finetune" in rows["int8 + prune 50%"] and "needs --finetune" in rows["float32 + prune 80%"]
    assert "NOT signed" in proc.stdout and "\x1b[" not in proc.stdout
    assert not out.exists() or not list(out.iterdir())


def test_search_with_a_fixed_mode_is_refused_before_any_work(runs):
    proc, out = runs["with_mode"]
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--mode cannot be combined with --search" in errors[0]
    assert not out.exists()


def _candidate(label: str, size: int, latency: float, drop: float = 0.0, why: list[str] | None = None) -> Candidate:
    mode, _, prune = label.partition(" + prune ")
    return Candidate(mode, float(prune) / 100 if prune else None, model_bytes=size, deflate_bytes=size // 2,
                     latency_ms=latency, drop_points=drop, tried=True, why_not=why or [])


def test_latency_goal_picks_the_fastest_fitting_candidate_and_size_the_smallest():
    candidates = [_candidate("float32", 150_000, 0.5), _candidate("int8", 45_000, 0.3),
                  _candidate("int8 + prune 80", 40_000, 0.1, why=["accuracy drop 3.00 pt > 1.5 pt"]),
                  _candidate("dynamic", 44_000, 0.2)]
    assert [c.label for c in rank(candidates, "latency")] == ["dynamic", "int8", "float32"]
    assert [c.label for c in rank(candidates, "size")] == ["dynamic", "int8", "float32"]
    candidates[3].latency_ms = 0.9
    assert rank(candidates, "latency")[0].label == "int8"


def test_candidate_modes_follow_the_profiles_hardware():
    from agent.protocol import profiles
    assert candidate_modes(profiles.load_profile("coral-usb-edgetpu")) == ["int8"]
    assert candidate_modes(profiles.load_profile("jetson-gpu")) == ["float16", "float32"]
    assert candidate_modes(profiles.load_profile("x86-cpu")) == ["dynamic", "float32", "float16", "int8"]
    with pytest.raises(Exception, match="runs only int8"):
        candidate_modes(profiles.load_profile("coral-usb-edgetpu"), ["float32"])
