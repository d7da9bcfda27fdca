-- One-off maintenance jobs that ran to completion (PostgreSQL), so that each runs once per
-- database however many times or replicas start. name says the job and the version of its rule
-- (e.g. `screen-encapsulation-keys-v1`); details is a short summary for operators.
CREATE TABLE maintenance_runs (
    name         TEXT   PRIMARY KEY,
    completed_at BIGINT NOT NULL,
    details      TEXT   NOT NULL
);
