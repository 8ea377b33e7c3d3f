"""kill -9 at every install step: the device is never left without a working model.

Each test runs a real ``litefleet-agent install-bundle`` process (or a real rollback process)
with ``LITEFLEET_CRASH_AT`` naming one step, so the process SIGKILLs itself right there. A
fresh process then opens the store (which runs recovery), loads the active model with the
real engine and runs its smoke test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.installer import Installer
from agent.protocol import keys, profiles
from agent.store import CRASH_ENV, CRASH_POINTS, ModelStore
from tests.conftest import ROOT, run_cli
from tests.support.bundles import make_bundle

BEFORE_SWITCH = ("begin", "staging", "staged", "loaded", "smoke_ok")
ROLLBACK_POINTS = ("begin", "loaded", "smoke_ok", "switched", "activated", "done")

# Runs in a fresh interpreter: open the store (recovery), then prove the active model serves.
VERIFY = r"""
import json, sys
import numpy as np
from agent.engine import load_model, smoke_test
from agent.protocol import profiles
from agent.store import ModelStore
store = ModelStore(sys.argv[1])
active, previous = store.active(), store.previous()
out = {"recovered": store.recovered, "slots": store.slots(),
       "staging": sorted(p.name for p in store.staging_dir.iterdir()),
       "active": active.manifest.version if active else None,
       "previous": previous.manifest.version if previous else None,
       "active_slot": active.slot if active else None, "previous_slot": previous.slot if previous else None,
       "journal_step": (store.journal() or {}).get("step")}
if active:
    loaded = load_model(active.read_model(), active.manifest, profiles.load_profile("x86-cpu"))
    out["smoke_diff"] = smoke_test(loaded)
    out["output_shape"] = list(loaded.predict([np.zeros((1, 8, 8, 1), np.float32)])[0].shape)
    loaded.close()
print(json.dumps(out))
"""

ROLLBACK = r"""
import sys
from agent.installer import Installer
from agent.protocol import keys, profiles
from agent.store import ModelStore
installer = Installer(ModelStore(sys.argv[1]), keys.load_trusted_dir(sys.argv[2]), profiles.load_profile("x86-cpu"))
result = installer.rollback("crash test")
print(result.code, result.message)
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, digits_tflite_float, digits_tflite_int8, release_key) -> dict[int, Path]:
    directory = tmp_path_factory.mktemp("crash-bundles")
    return {1: make_bundle(directory / "v1.lfb", digits_tflite_float, release_key, version=1),
            2: make_bundle(directory / "v2.lfb", digits_tflite_int8, release_key, version=2)}


def write_config(tmp_path: Path, keys_dir: Path) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "crash-test"\nprofile = "x86-cpu"\nstate_dir = "state"\n'
                      f'trusted_keys_dir = "{keys_dir}"\n')
    return config


def install_in_process(state: Path, keys_dir: Path, *paths: Path) -> None:
    installer = Installer(ModelStore(state), keys.load_trusted_dir(keys_dir), profiles.load_profile("x86-cpu"))
    for path in paths:
        result = installer.install_file(path)
        assert result.ok, result.message
        result.loaded.close()


def crash(args: list[str], step: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), CRASH_ENV: step}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == -signal.SIGKILL, (
        f"expected death by SIGKILL at {step!r}, got exit {result.returncode}: {result.stderr[-2000:]}")
    return result


def verify(state: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(CRASH_ENV, None)
    result = subprocess.run([sys.executable, "-c", VERIFY, str(state)], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_clean(found: dict) -> None:
    """Only the active and previous slots exist, no staging, the journal is closed, the model serves."""
    assert found["staging"] == []
    assert sorted(found["slots"]) == sorted(s for s in (found["active_slot"], found["previous_slot"]) if s)
    assert found["journal_step"] == "done"
    if found["active"] is not None:
        assert found["smoke_diff"] >= 0 and found["output_shape"] == [1, 10]


@pytest.mark.slow
@pytest.mark.parametrize("step", CRASH_POINTS)
def test_kill_during_upgrade_leaves_old_or_new_model(step, tmp_path, keys_dir, bundles):
    config = write_config(tmp_path, keys_dir)
    state = tmp_path / "state"
    install_in_process(state, keys_dir, bundles[1])
    crash(["-m", "agent.cli", "install-bundle", str(bundles[2]), "--config", str(config)], step)

    found = verify(state)
    assert_clean(found)
    if step in BEFORE_SWITCH:
        assert (found["active"], found["previous"]) == (1, None), found
        assert any("undone" in a for a in found["recovered"]), found["recovered"]
    else:
        assert (found["active"], found["previous"]) == (2, 1), found
    # The device carries on: installing v2 again works (or is refused as already active).
    retry = run_cli("agent", "install-bundle", str(bundles[2]), "--config", str(config), "--json")
    if step in BEFORE_SWITCH:
        assert retry.returncode == 0, retry.stderr
    else:
        assert retry.returncode == 1 and "(not_newer)" in retry.stderr
    store = json.loads(retry.stdout)["store"]
    assert (store["active"]["version"], store["previous"]["version"]) == (2, 1)
    assert store["journal"]["step"] == "done"


@pytest.mark.slow
@pytest.mark.parametrize("step", ("begin", "staging", "smoke_ok", "switched", "done"))
def test_kill_during_first_install(step, tmp_path, keys_dir, bundles):
    config = write_config(tmp_path, keys_dir)
    crash(["-m", "agent.cli", "install-bundle", str(bundles[1]), "--config", str(config)], step)
    found = verify(tmp_path / "state")
    assert_clean(found)
    assert found["active"] == (None if step in BEFORE_SWITCH else 1)


@pytest.mark.slow
@pytest.mark.parametrize("step", ROLLBACK_POINTS)
def test_kill_during_rollback_leaves_old_or_new_model(step, tmp_path, keys_dir, bundles):
    state = tmp_path / "state"
    install_in_process(state, keys_dir, bundles[1], bundles[2])
    crash(["-c", ROLLBACK, str(state), str(keys_dir)], step)
    found = verify(state)
    assert_clean(found)
    if step in ("begin", "loaded", "smoke_ok"):
        assert (found["active"], found["previous"]) == (2, 1), found
    else:
        assert (found["active"], found["previous"]) == (1, None), found


def test_every_crash_point_is_reached_by_an_upgrade(tmp_path, keys_dir, bundles):
    """Guards the tests above: a point the code never reaches would make its case pass vacuously."""
    state = tmp_path / "state"
    install_in_process(state, keys_dir, bundles[1])
    install_in_process(state, keys_dir, bundles[2])
    steps = [s["step"] for s in ModelStore(state).journal()["steps"]]
    assert steps == ["begin", "staged", "loaded", "smoke_ok", "activated", "done"]
    assert set(CRASH_POINTS) == set(steps) | {"staging", "switched"}
