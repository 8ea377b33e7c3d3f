"""Signed commands: the device acts only on commands signed, fresh, new and meant for it."""

from __future__ import annotations

import copy

import pytest

from agent.protocol import keys
from agent.protocol.commands import CommandGuard, CommandRejected, Identity, make_command

ME = Identity(device_id="cam-1", fleet="plant", groups=("line-a",), profile="rpi4-cpu")
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def operator(keys_dir):
    return keys.load_private(keys_dir / "operator.key")


def deploy(operator, **kw):
    args = {"blob": "a" * 64, "profile": kw.pop("profile", "rpi4-cpu"), "name": "digits", "version": 2}
    base = dict(fleet="plant", scope="device", name="cam-1", operator_key=operator, seq=1, now=NOW)
    base.update(kw)
    return make_command("deploy", args, **base)


def test_a_good_command_is_accepted_once(operator, trusted_keys):
    guard = CommandGuard(ME)
    command = deploy(operator)
    checked = guard.check(command, trusted_keys, now=NOW + 1)
    assert checked.action == "deploy" and checked.args["version"] == 2
    guard.accept(checked, now=NOW + 1)
    with pytest.raises(CommandRejected) as info:
        guard.check(command, trusted_keys, now=NOW + 2)
    assert info.value.code == "replayed"


def test_replay_is_caught_after_a_restart(operator, trusted_keys):
    guard = CommandGuard(ME)
    command = deploy(operator)
    guard.accept(guard.check(command, trusted_keys, now=NOW), now=NOW)
    restored = CommandGuard.from_dict(ME, copy.deepcopy(guard.to_dict()))
    with pytest.raises(CommandRejected, match="already accepted"):
        restored.check(command, trusted_keys, now=NOW + 5)


@pytest.mark.parametrize("scope, name, ok", [
    ("device", "cam-1", True), ("device", "cam-2", False), ("group", "line-a", True),
    ("group", "line-b", False), ("profile", "rpi4-cpu", True), ("profile", "x86-cpu", False), ("all", "", True),
])
def test_addressing(operator, trusted_keys, scope, name, ok):
    command = deploy(operator, scope=scope, name=name)
    if ok:
        CommandGuard(ME).check(command, trusted_keys, now=NOW)
    else:
        with pytest.raises(CommandRejected) as info:
            CommandGuard(ME).check(command, trusted_keys, now=NOW)
        assert info.value.code == "misaddressed"


def test_other_fleet_is_misaddressed(operator, trusted_keys):
    with pytest.raises(CommandRejected, match="fleet 'other'"):
        CommandGuard(ME).check(deploy(operator, fleet="other"), trusted_keys, now=NOW)


def test_bundle_for_another_profile_is_rejected(operator, trusted_keys):
    with pytest.raises(CommandRejected) as info:
        CommandGuard(ME).check(deploy(operator, profile="x86-cpu", scope="all", name=""), trusted_keys, now=NOW)
    assert info.value.code == "wrong_profile" and "x86-cpu" in str(info.value)


def test_expired_command(operator, trusted_keys):
    with pytest.raises(CommandRejected) as info:
        CommandGuard(ME).check(deploy(operator, ttl_s=60), trusted_keys, now=NOW + 61)
    assert info.value.code == "expired"


def test_unsigned_and_badly_signed(operator, trusted_keys, release_key):
    command = deploy(operator)
    unsigned = {"v": 1, "body": command["body"], "signature": {}}
    with pytest.raises(CommandRejected) as info:
        CommandGuard(ME).check(unsigned, trusted_keys, now=NOW)
    assert info.value.code == "unsigned"
    tampered = copy.deepcopy(command)
    tampered["body"]["args"]["version"] = 99
    with pytest.raises(CommandRejected, match="altered after signing"):
        CommandGuard(ME).check(tampered, trusted_keys, now=NOW)
    by_release_key = make_command("deploy", command["body"]["args"], fleet="plant", scope="device", name="cam-1",
                                  operator_key=release_key, seq=2, now=NOW)
    with pytest.raises(CommandRejected, match="a release key; it needs an operator key"):
        CommandGuard(ME).check(by_release_key, trusted_keys, now=NOW)


def test_malformed_command(trusted_keys):
    for junk in (None, [], {"body": {"v": 1}}, {"v": 1, "body": {"v": 1}, "signature": {"a": 1}}):
        with pytest.raises(CommandRejected):
            CommandGuard(ME).check(junk, trusted_keys, now=NOW)
