-- litefleet fleet store: staged rollouts (fleet/rollout.py, fleet/rollout_store.py).
-- Portable SQL for SQLite and PostgreSQL like 0001; keep every ';' at a line end.

-- One row per rollout. spec_json is what the operator asked for (fixed); state_json is the
-- machine's state without its devices (stage, timestamps, history). revision is bumped by every
-- save so that the runner and an operator's pause/abort never overwrite each other unseen.
CREATE TABLE rollouts (
    id          TEXT PRIMARY KEY,
    fleet       TEXT NOT NULL,
    model       TEXT NOT NULL DEFAULT '',
    target      TEXT NOT NULL DEFAULT '',
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    created_at  DOUBLE PRECISION NOT NULL,
    updated_at  DOUBLE PRECISION NOT NULL,
    revision    BIGINT NOT NULL DEFAULT 0,
    spec_json   TEXT NOT NULL,
    state_json  TEXT NOT NULL
);
CREATE INDEX rollouts_state ON rollouts (state);
CREATE INDEX rollouts_created ON rollouts (created_at);

-- One row per device of a rollout's frozen target set. owner = 1 while the rollout holds the
-- device (not excluded, rollout not finished): the partial unique index makes the database
-- refuse a second rollout taking a device another one holds.
CREATE TABLE rollout_devices (
    rollout_id          TEXT NOT NULL,
    device_id           TEXT NOT NULL,
    profile             TEXT NOT NULL DEFAULT '',
    ord                 TEXT NOT NULL,
    state               TEXT NOT NULL,
    stage               INTEGER,
    owner               INTEGER NOT NULL DEFAULT 1,
    command_id          TEXT NOT NULL DEFAULT '',
    rollback_command_id TEXT NOT NULL DEFAULT '',
    reason              TEXT NOT NULL DEFAULT '',
    record_json         TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE UNIQUE INDEX rollout_devices_owner ON rollout_devices (device_id) WHERE owner = 1;
CREATE INDEX rollout_devices_command ON rollout_devices (command_id);
