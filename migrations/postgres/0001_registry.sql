-- The registry as SQLite's migrations 1 to 3 leave it, in PostgreSQL's types:
-- times are unix seconds (BIGINT) as in SQLite, secrets are only their
-- hashes (BYTEA), and text sorts and compares bytewise (COLLATE "C"), as
-- SQLite's does, so both backends list rows in one order.
--
-- Applied by src/auth/registry/postgres.rs in one transaction under an
-- advisory lock, and recorded in registry_migrations. Never edit a file
-- that shipped: add the next one (0002_....sql) beside it.

CREATE TABLE server_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    secret BYTEA NOT NULL
);

CREATE TABLE deployment_tokens (
    hash BYTEA PRIMARY KEY,
    token_id TEXT COLLATE "C" NOT NULL UNIQUE,
    tenant TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    max_activations BIGINT,
    activations BIGINT NOT NULL DEFAULT 0,
    provisioned_only BOOLEAN NOT NULL DEFAULT FALSE,
    allow_restore_to_other_device BOOLEAN NOT NULL DEFAULT TRUE,
    allow_open_in BOOLEAN NOT NULL DEFAULT TRUE,
    revoked_at BIGINT
);

CREATE TABLE devices (
    device_id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    email TEXT COLLATE "C" NOT NULL,
    token_hash BYTEA NOT NULL UNIQUE,
    state TEXT NOT NULL,
    activated_at BIGINT NOT NULL,
    last_seen BIGINT,
    deployment_token_id TEXT COLLATE "C",
    generation BIGINT NOT NULL DEFAULT 0,
    allow_restore_to_other_device BOOLEAN NOT NULL DEFAULT TRUE,
    allow_open_in BOOLEAN NOT NULL DEFAULT TRUE
);

-- The check-in feed. Its numbers become visible in order: every writer
-- takes the feed's advisory lock before its insert (see append_change).
CREATE TABLE changes (
    seq BIGSERIAL PRIMARY KEY,
    device_id TEXT COLLATE "C" NOT NULL,
    tenant TEXT COLLATE "C" NOT NULL,
    state TEXT NOT NULL,
    generation BIGINT
);
CREATE INDEX changes_device ON changes (device_id);

CREATE TABLE users (
    tenant TEXT COLLATE "C" NOT NULL,
    email TEXT COLLATE "C" NOT NULL,
    added_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, email)
);

CREATE TABLE admin_tokens (
    token_id TEXT COLLATE "C" PRIMARY KEY,
    hash BYTEA NOT NULL UNIQUE,
    role TEXT NOT NULL,
    tenant TEXT COLLATE "C",
    label TEXT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE audit (
    seq BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    tenant TEXT COLLATE "C",
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_tenant ON audit (tenant, seq);

CREATE TABLE tenants (
    tenant TEXT COLLATE "C" PRIMARY KEY,
    quota_bytes BIGINT NOT NULL DEFAULT 0,
    stored_bytes BIGINT,
    snapshots BIGINT,
    reported_at BIGINT
);
