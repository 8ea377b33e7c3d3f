-- litefleet fleet store: model quality in the field (drift and feedback, docs/quality.md).
-- Portable SQL for SQLite and PostgreSQL like 0001; keep every ';' at a line end.

-- Per telemetry interval: the device's drift score and its cumulative feedback counts for the
-- model it ran (labels received, labels equal to the prediction), so rollout health rules can
-- compare a model version with the one before it on the same devices.
ALTER TABLE telemetry_raw ADD COLUMN drift_score DOUBLE PRECISION;
ALTER TABLE telemetry_raw ADD COLUMN fb_labels BIGINT;
ALTER TABLE telemetry_raw ADD COLUMN fb_correct BIGINT;

-- One row per device and model version: the latest drift report and the latest cumulative
-- confusion matrix (rows = true label, columns = predicted). Each half is replaced only by a
-- newer report of its own kind; the fleet's field accuracy sums these rows per model version.
CREATE TABLE model_quality (
    device_id      TEXT NOT NULL,
    model_name     TEXT NOT NULL,
    model_version  BIGINT NOT NULL,
    drift_ts       DOUBLE PRECISION,
    drift_score    DOUBLE PRECISION,
    drift_inputs   DOUBLE PRECISION,
    drift_outputs  DOUBLE PRECISION,
    drift_window   BIGINT,
    feedback_ts    DOUBLE PRECISION,
    labels         BIGINT,
    unmatched      BIGINT,
    classes        BIGINT,
    confusion_json TEXT,
    PRIMARY KEY (device_id, model_name, model_version)
);
CREATE INDEX model_quality_model ON model_quality (model_name, model_version);
