-- HyperSEV pool store, schema v1.
--
-- Conventions: every table is STRICT (SQLite >= 3.37); times are INTEGER
-- unix nanoseconds, UTC; names and ids are TEXT compared byte for byte;
-- JSON columns are checked with json_valid(). Runs inside the migration
-- transaction that then sets `PRAGMA user_version = 1`.

-- The pool this database describes: at most one row.
CREATE TABLE pool (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    name       TEXT    NOT NULL CHECK (name <> ''),
    created_at INTEGER NOT NULL
) STRICT;

-- Hypervisor hosts of the pool.
CREATE TABLE host (
    name         TEXT    PRIMARY KEY CHECK (name <> ''),
    status       TEXT    NOT NULL,
    capabilities TEXT    NOT NULL CHECK (json_valid(capabilities)),
    probed_at    INTEGER NOT NULL
) STRICT;

-- Imported guest images.
CREATE TABLE image (
    id                   TEXT    PRIMARY KEY CHECK (id <> ''),
    name                 TEXT    NOT NULL UNIQUE CHECK (name <> ''),
    dir                  TEXT    NOT NULL,
    -- JSON array of [role, sha256 hex] pairs, in the record's order.
    sha256               TEXT    NOT NULL CHECK (json_valid(sha256)),
    cmdline              TEXT    NOT NULL,
    measured_direct_boot INTEGER NOT NULL CHECK (measured_direct_boot IN (0, 1)),
    size_bytes           INTEGER NOT NULL CHECK (size_bytes >= 0),
    imported_at          INTEGER NOT NULL
) STRICT;

-- Virtual machines. `spec` (the whole VmSpec as JSON) is the source of
-- truth for the spec; `name`, `image`, `vcpus`, `memory_mib` and `mode` are
-- copies of it, written once at insert (a spec never changes), for
-- uniqueness, foreign keys, filters and the placement sums.
CREATE TABLE vm (
    id                   TEXT    PRIMARY KEY CHECK (id <> ''),
    owner                TEXT    NOT NULL CHECK (owner <> ''),
    name                 TEXT    NOT NULL CHECK (name <> ''),
    host                 TEXT    NOT NULL REFERENCES host (name) ON UPDATE CASCADE ON DELETE RESTRICT,
    image                TEXT    NOT NULL REFERENCES image (id) ON DELETE RESTRICT,
    state                TEXT    NOT NULL CHECK (state IN ('creating', 'stopped', 'starting',
                                                           'running', 'stopping', 'failed',
                                                           'deleting')),
    state_reason         TEXT    NOT NULL,
    vcpus                INTEGER NOT NULL CHECK (vcpus >= 0),
    memory_mib           INTEGER NOT NULL CHECK (memory_mib >= 0),
    mode                 TEXT    NOT NULL,
    spec                 TEXT    NOT NULL CHECK (json_valid(spec)),
    expected_measurement BLOB    NOT NULL,
    launch_digest        BLOB    NOT NULL,
    attestation          TEXT    NOT NULL CHECK (attestation IN ('not_applicable', 'pending',
                                                                 'released', 'refused')),
    -- Why the key broker refused; empty otherwise.
    attestation_reason   TEXT    NOT NULL,
    -- VmRuntime as JSON while a VMM process exists.
    runtime              TEXT    CHECK (runtime IS NULL OR json_valid(runtime)),
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    -- Also the index for listing (and ordering) one owner's VMs.
    UNIQUE (owner, name)
) STRICT;

CREATE INDEX vm_by_state ON vm (state);
-- Listing by host, the placement sums, and the host foreign key.
CREATE INDEX vm_by_host ON vm (host);
-- The image foreign key, and `delete_image` while VMs use it.
CREATE INDEX vm_by_image ON vm (image);
-- An admin's lookup by name across owners.
CREATE INDEX vm_by_name ON vm (name);

-- Extra data disks of a VM; they go with it.
CREATE TABLE disk (
    vm       TEXT    NOT NULL REFERENCES vm (id) ON DELETE CASCADE,
    name     TEXT    NOT NULL CHECK (name <> ''),
    path     TEXT    NOT NULL UNIQUE,
    size_mib INTEGER NOT NULL CHECK (size_mib >= 0),
    PRIMARY KEY (vm, name)
) STRICT, WITHOUT ROWID;

-- What happened, for `hsev vm show` and audits. `vm` is deliberately not a
-- foreign key: the audit trail outlives a deleted VM. AUTOINCREMENT: a
-- sequence number is never reused, even after the newest rows are deleted.
CREATE TABLE event (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    vm     TEXT,
    kind   TEXT    NOT NULL CHECK (kind <> ''),
    detail TEXT    NOT NULL,
    at     INTEGER NOT NULL
) STRICT;

CREATE INDEX event_by_vm ON event (vm, seq);
