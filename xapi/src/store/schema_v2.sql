-- HyperSEV pool store, schema v2: pools of several hosts.
--
-- Hosts gain the address the coordinator reaches their agent at (empty for
-- the coordinator's own host, reached in-process) and the fingerprint of the
-- certificate the pool's CA issued them. Join tokens are kept by the
-- SHA-256 of their secret, single use; ejected hosts' certificates are
-- revoked by fingerprint. Cold migrations in flight are recorded so that a
-- coordinator that dies half-way finishes or undoes each one: a VM is never
-- both here and there, never neither.

ALTER TABLE host ADD COLUMN address TEXT NOT NULL DEFAULT '';
ALTER TABLE host ADD COLUMN cert_fingerprint TEXT NOT NULL DEFAULT '';

CREATE TABLE join_token (
    secret_sha256 TEXT    PRIMARY KEY CHECK (length(secret_sha256) = 64),
    created_by    TEXT    NOT NULL,
    expires_at    INTEGER NOT NULL,
    -- The host that used it; empty while unused.
    used_by       TEXT    NOT NULL DEFAULT '',
    used_at       INTEGER
) STRICT;

CREATE TABLE revoked_cert (
    fingerprint TEXT    PRIMARY KEY CHECK (fingerprint <> ''),
    host        TEXT    NOT NULL,
    revoked_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE migration (
    vm         TEXT    PRIMARY KEY REFERENCES vm (id) ON DELETE CASCADE,
    from_host  TEXT    NOT NULL,
    to_host    TEXT    NOT NULL,
    -- copying: the disks go to to_host, the VM is still from_host's;
    -- moved: the VM is to_host's, from_host's copy is to be removed.
    phase      TEXT    NOT NULL CHECK (phase IN ('copying', 'moved')),
    -- 1 if the VM ran before it left: it is started where it ends up.
    restart    INTEGER NOT NULL CHECK (restart IN (0, 1)),
    started_at INTEGER NOT NULL
) STRICT;
