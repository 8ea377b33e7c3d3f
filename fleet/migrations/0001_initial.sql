-- litefleet fleet store, schema version 1.
-- Portable SQL that SQLite (>= 3.35) and PostgreSQL (>= 12) both accept: TEXT, BIGINT,
-- DOUBLE PRECISION, JSON kept as TEXT, timestamps as epoch seconds. Keep every ';' at a line end.

-- One row per device: its last status (birth or last will) and a copy of its latest telemetry
-- figures, so the fleet table never scans telemetry.
CREATE TABLE devices (
    device_id        TEXT PRIMARY KEY,
    fleet            TEXT NOT NULL DEFAULT '',
    profile          TEXT NOT NULL DEFAULT '',
    groups_json      TEXT NOT NULL DEFAULT '[]',
    labels_json      TEXT NOT NULL DEFAULT '{}',
    online           INTEGER NOT NULL DEFAULT 0,
    status_ts        DOUBLE PRECISION,
    status_received  DOUBLE PRECISION,
    offline_reason   TEXT NOT NULL DEFAULT '',
    last_seen        DOUBLE PRECISION,
    agent_version    TEXT NOT NULL DEFAULT '',
    model_ts         DOUBLE PRECISION,
    model_name       TEXT,
    model_version    BIGINT,
    model_sha256     TEXT,
    runtime          TEXT,
    runtime_version  TEXT,
    delegate         TEXT,
    delegates_json   TEXT NOT NULL DEFAULT '[]',
    birth_json       TEXT,
    latest_ts        DOUBLE PRECISION,
    latest_seq       BIGINT,
    p50_ms           DOUBLE PRECISION,
    p95_ms           DOUBLE PRECISION,
    p99_ms           DOUBLE PRECISION,
    inferences_per_s DOUBLE PRECISION,
    inf_count        BIGINT,
    inf_errors       BIGINT,
    cpu_percent      DOUBLE PRECISION,
    temperature_c    DOUBLE PRECISION,
    memory_percent   DOUBLE PRECISION
);
CREATE INDEX devices_profile ON devices (profile);

-- Raw telemetry, kept for the raw retention window; (device_id, seq) dedupes QoS 1 redelivery.
CREATE TABLE telemetry_raw (
    device_id        TEXT NOT NULL,
    seq              BIGINT NOT NULL,
    ts               DOUBLE PRECISION NOT NULL,
    model_version    TEXT NOT NULL DEFAULT '',
    p50_ms           DOUBLE PRECISION,
    p95_ms           DOUBLE PRECISION,
    p99_ms           DOUBLE PRECISION,
    inferences_per_s DOUBLE PRECISION,
    inf_count        BIGINT,
    inf_errors       BIGINT,
    cpu_percent      DOUBLE PRECISION,
    temperature_c    DOUBLE PRECISION,
    memory_percent   DOUBLE PRECISION,
    data             TEXT,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX telemetry_raw_ts ON telemetry_raw (ts);
CREATE INDEX telemetry_raw_device_ts ON telemetry_raw (device_id, ts);

-- Rollups keep sums and non-null counts (not averages) so that minute rows merge into hour
-- rows, and late rows into existing buckets, exactly.
CREATE TABLE telemetry_minute (
    device_id     TEXT NOT NULL,
    bucket        DOUBLE PRECISION NOT NULL,
    model_version TEXT NOT NULL DEFAULT '',
    samples       BIGINT NOT NULL,
    inf_count     BIGINT,
    inf_errors    BIGINT,
    ips_sum       DOUBLE PRECISION, ips_n  BIGINT NOT NULL DEFAULT 0,
    p50_sum       DOUBLE PRECISION, p50_n  BIGINT NOT NULL DEFAULT 0,
    p95_sum       DOUBLE PRECISION, p95_n  BIGINT NOT NULL DEFAULT 0, p95_max DOUBLE PRECISION,
    p99_sum       DOUBLE PRECISION, p99_n  BIGINT NOT NULL DEFAULT 0, p99_max DOUBLE PRECISION,
    cpu_sum       DOUBLE PRECISION, cpu_n  BIGINT NOT NULL DEFAULT 0,
    temp_sum      DOUBLE PRECISION, temp_n BIGINT NOT NULL DEFAULT 0, temp_max DOUBLE PRECISION,
    mem_sum       DOUBLE PRECISION, mem_n  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, bucket, model_version)
);
CREATE INDEX telemetry_minute_bucket ON telemetry_minute (bucket);

CREATE TABLE telemetry_hour (
    device_id     TEXT NOT NULL,
    bucket        DOUBLE PRECISION NOT NULL,
    model_version TEXT NOT NULL DEFAULT '',
    samples       BIGINT NOT NULL,
    inf_count     BIGINT,
    inf_errors    BIGINT,
    ips_sum       DOUBLE PRECISION, ips_n  BIGINT NOT NULL DEFAULT 0,
    p50_sum       DOUBLE PRECISION, p50_n  BIGINT NOT NULL DEFAULT 0,
    p95_sum       DOUBLE PRECISION, p95_n  BIGINT NOT NULL DEFAULT 0, p95_max DOUBLE PRECISION,
    p99_sum       DOUBLE PRECISION, p99_n  BIGINT NOT NULL DEFAULT 0, p99_max DOUBLE PRECISION,
    cpu_sum       DOUBLE PRECISION, cpu_n  BIGINT NOT NULL DEFAULT 0,
    temp_sum      DOUBLE PRECISION, temp_n BIGINT NOT NULL DEFAULT 0, temp_max DOUBLE PRECISION,
    mem_sum       DOUBLE PRECISION, mem_n  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, bucket, model_version)
);
CREATE INDEX telemetry_hour_bucket ON telemetry_hour (bucket);

CREATE TABLE events (
    device_id  TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    ts         DOUBLE PRECISION NOT NULL,
    kind       TEXT NOT NULL,
    reason     TEXT NOT NULL DEFAULT '',
    command_id TEXT NOT NULL DEFAULT '',
    details    TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_device_ts ON events (device_id, ts);
CREATE INDEX events_command ON events (command_id);
CREATE INDEX events_kind_device_seq ON events (kind, device_id, seq);

-- Per device: the range of sequence numbers seen and how many distinct ones arrived.
-- lost = (max_seq - min_seq + 1) - received.
CREATE TABLE device_seq (
    device_id TEXT PRIMARY KEY,
    min_seq   BIGINT NOT NULL,
    max_seq   BIGINT NOT NULL,
    received  BIGINT NOT NULL
);

CREATE TABLE alerts (
    id         TEXT PRIMARY KEY,
    device_id  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    opened_at  DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    closed_at  DOUBLE PRECISION,
    message    TEXT NOT NULL DEFAULT '',
    details    TEXT NOT NULL DEFAULT '{}'
);
-- At most one open alert per (device, kind).
CREATE UNIQUE INDEX alerts_open ON alerts (device_id, kind) WHERE closed_at IS NULL;
CREATE INDEX alerts_opened ON alerts (opened_at);
