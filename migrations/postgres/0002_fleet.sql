-- What the console charts and lists (src/auth/registry/fleet.rs), as
-- SQLite's migration 4 leaves it: snapshots as storage nodes report them
-- (never paths or contents), each tenant's stored bytes per day (day
-- numbers since the unix epoch, UTC), and the storage nodes' check-ins.
-- "user" is a reserved word here, so the snapshot's user is user_name;
-- time_ms is the snapshot's time in milliseconds since the epoch.

CREATE TABLE snapshots (
    tenant TEXT COLLATE "C" NOT NULL,
    snapshot_id TEXT COLLATE "C" NOT NULL,
    device_id TEXT COLLATE "C",
    user_name TEXT,
    time_ms BIGINT NOT NULL,
    files BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    removed_at BIGINT,
    stale BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (tenant, snapshot_id)
);
CREATE INDEX snapshots_device ON snapshots (tenant, device_id, time_ms);
CREATE INDEX snapshots_time ON snapshots (tenant, time_ms);

CREATE TABLE usage_days (
    tenant TEXT COLLATE "C" NOT NULL,
    day BIGINT NOT NULL,
    stored_bytes BIGINT NOT NULL,
    PRIMARY KEY (tenant, day)
);

CREATE TABLE storage_nodes (
    name TEXT COLLATE "C" PRIMARY KEY,
    auth_unreachable TEXT NOT NULL,
    checkin_interval_secs BIGINT NOT NULL,
    version TEXT NOT NULL,
    cursor BIGINT NOT NULL,
    checked_in_at BIGINT NOT NULL
);
