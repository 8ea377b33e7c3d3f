"""Rollout state in the fleet store, on SQLite and a real PostgreSQL: created atomically, saved,
reloaded by a "restarted server" exactly as it was, conflicts detected, one owner per device."""

from __future__ import annotations

import threading

import pytest

from fleet import rollout as ro
from fleet.rollout import DeviceObs, Observations, RolloutError, RolloutMachine, RolloutSpec
from fleet.rollout_store import RolloutConflict, RolloutNotFound, RolloutStore

BUNDLES = {"x86-cpu": {"blob": "a" * 64, "name": "digits", "version": 2, "profile": "x86-cpu"}}


@pytest.fixture(scope="session")
def pg_database():
    from tests.support.postgres import TempPostgres
    pg = TempPostgres.create()
    yield pg
    pg.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    pg = request.getfixturevalue("pg_database")
    pg.reset()
    return pg.url


def open_migrated(url: str):
    from fleet.store import open_store
    store = open_store(url)
    store.migrate()
    return store


@pytest.fixture
def store(url):
    s = open_migrated(url)
    yield s
    s.close()


def targets(n: int, prefix: str = "dev") -> list[DeviceObs]:
    return [DeviceObs(f"{prefix}-{i}", "x86-cpu", True, 100.0, "digits", 1) for i in range(n)]


def spec(rid: str, **kw) -> RolloutSpec:
    return RolloutSpec(id=rid, fleet="f", target="all", bundles=BUNDLES, stages="1,100%", soak_s=10, **kw)


def test_migration_creates_the_tables_and_is_idempotent(store):
    version = store.migrate()
    assert version >= 10
    assert store.migrate() == version
    assert RolloutStore(store).list() == []


def test_a_restarted_server_carries_on_where_it_was(url):
    first = open_migrated(url)
    rs = RolloutStore(first)
    state = rs.create(spec("r1"), targets(4), now=1000.0)
    machine = RolloutMachine(state)
    result = machine.step(Observations(1001.0))
    assert [a.kind for a in result.actions] == ["deploy"]
    rs.save(state)                           # saved with the deploy still owed (crash before sending)
    first.close()

    second = open_migrated(url)              # the "restarted server"
    try:
        rs2 = RolloutStore(second)
        again = rs2.load("r1")
        assert again.to_dict() == state.to_dict()
        m2 = RolloutMachine(again)
        owed = m2.step(Observations(1002.0)).actions
        assert [(a.device_id, a.command_id) for a in owed] == [(a.device_id, a.command_id) for a in result.actions]
        m2.mark_sent(owed[0])
        rs2.save(again)
        assert rs2.load("r1").devices[owed[0].device_id].unsent == ""
        assert rs2.active_ids() == ["r1"]
        (summary,) = rs2.list()
        assert summary["state"] == ro.DEPLOYING and summary["devices_by_state"] == {"deploying": 1, "waiting": 3}
    finally:
        second.close()


def test_two_rollouts_never_share_a_device(store):
    rs = RolloutStore(store)
    rs.create(spec("r1"), targets(3), now=1.0)
    second = rs.create(spec("r2"), targets(5), now=2.0)
    excluded = {d for d, r in second.devices.items() if r.state == ro.D_EXCLUDED}
    assert excluded == {"dev-0", "dev-1", "dev-2"}
    assert "already in active rollout r1" in second.devices["dev-0"].reason
    assert rs.busy_devices() == {"dev-0": "r1", "dev-1": "r1", "dev-2": "r1", "dev-3": "r2", "dev-4": "r2"}
    # once r1 ends, its devices are free for a new rollout
    rs.update("r1", lambda m: m.abort(3.0))
    rs.update("r1", lambda m: m.step(Observations(4.0)))
    assert rs.load("r1").state == ro.ABORTED
    third = rs.create(spec("r3"), targets(3), now=5.0)
    assert all(r.state != ro.D_EXCLUDED for r in third.devices.values())
    with pytest.raises(RolloutError, match="already exists"):
        rs.create(spec("r3"), targets(1), now=6.0)


def test_concurrent_creates_split_the_devices(url):
    """Two server threads (own connections) create rollouts over the same devices at once."""
    stores = [open_migrated(url) for _ in range(2)]
    results: dict[str, ro.RolloutState] = {}
    barrier = threading.Barrier(2)

    def create(i: int) -> None:
        barrier.wait()
        results[f"c{i}"] = RolloutStore(stores[i]).create(spec(f"c{i}"), targets(20), now=float(i))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        owned = [set(results[k].owned_devices()) for k in ("c0", "c1")]
        assert owned[0] | owned[1] == {f"dev-{i}" for i in range(20)}
        assert not owned[0] & owned[1]
        assert sorted(len(o) for o in owned) == [0, 20]   # the second one saw every device taken
    finally:
        for s in stores:
            s.close()


def test_a_stale_save_is_refused_and_update_retries(store):
    rs = RolloutStore(store)
    rs.create(spec("r1"), targets(2), now=1.0)
    runner_copy = rs.load("r1")
    rs.update("r1", lambda m: m.pause(2.0))           # the operator pauses meanwhile
    RolloutMachine(runner_copy).step(Observations(3.0))
    with pytest.raises(RolloutConflict):
        rs.save(runner_copy)                           # the runner's stale step must not undo the pause
    assert rs.load("r1").state == ro.PAUSED
    with pytest.raises(RolloutError, match="only a paused rollout can be resumed"):
        rs.update("r1", lambda m: (m.resume(4.0), m.resume(4.0)))
    with pytest.raises(RolloutNotFound):
        rs.load("nope")


def test_api_handlers_create_read_act_and_refuse_with_reasons(store):
    """The pure HTTP handlers over the real store (the server mounts them behind its token)."""
    from fleet.api_rollouts import RolloutApi
    from fleet.store import IngestBatch
    store.write_batch(IngestBatch(statuses=[(f"dev-{i}", {
        "v": 1, "state": "online", "device_id": f"dev-{i}", "ts": 100.0, "fleet": "f", "groups": ["g"],
        "labels": {}, "profile": "x86-cpu", "agent_version": "0.1.0", "runtime": {}, "delegates_available": [],
        "engine": {}, "active_model": None, "hardware": {}}) for i in range(3)], telemetry=[], events=[]))
    api = RolloutApi(store, fleet="f", clock=lambda: 200.0)
    status, doc = api.handle("POST", "/api/v1/rollouts", {"id": "r1", "bundles": BUNDLES, "target": "group:g",
                                                          "stages": "1,100%", "soak_s": "30s"})
    assert status == 201, doc
    assert doc["rollout"]["target_devices"] == 3 and doc["rollout"]["spec"]["soak_s"] == 30.0
    assert api.handle("GET", "/api/v1/rollouts")[1]["rollouts"][0]["id"] == "r1"
    assert api.handle("GET", "/api/v1/rollouts/r1")[1]["rollout"]["state"] == ro.PENDING
    status, doc = api.handle("POST", "/api/v1/rollouts/r1/pause", b'{"reason": "lunch"}')
    assert status == 200 and doc["rollout"]["state"] == ro.PAUSED and doc["rollout"]["reason"] == "lunch"
    assert api.handle("POST", "/api/v1/rollouts/r1/pause")[0] == 409
    assert api.handle("POST", "/api/v1/rollouts/r1/resume")[1]["rollout"]["state"] == ro.DEPLOYING
    assert api.handle("GET", "/api/v1/rollouts/nope")[0] == 404
    assert api.handle("DELETE", "/api/v1/rollouts/r1")[0] == 405
    for body, fragment in (({"bundles": BUNDLES, "target": "group:g", "stages": "1,50%"}, "100%"),
                           ({"bundles": BUNDLES, "target": "group:g", "health": "p95<=2"}, "unknown metric"),
                           ({"bundles": BUNDLES, "target": "nowhere"}, "target"),
                           ({"target": "all"}, "bundles: required"),
                           ({"bundles": BUNDLES, "target": "all", "colour": "red"}, "unknown field 'colour'"),
                           (b"{not json", "not JSON")):
        status, doc = api.handle("POST", "/api/v1/rollouts", body)
        assert status == 400 and fragment in doc["error"], (body, doc)
