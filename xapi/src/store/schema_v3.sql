-- HyperSEV pool store, schema v3: creates applied once.
--
-- A create may carry its caller's request id (scoped by owner); the VM it
-- made is recorded under it in the same transaction, so that a create
-- retried after a lost answer (its coordinator died, a client timed out)
-- finds that VM instead of making another. The record goes with its VM.

CREATE TABLE create_request (
    id TEXT NOT NULL PRIMARY KEY CHECK (id <> ''),
    vm TEXT NOT NULL REFERENCES vm (id) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;

CREATE INDEX create_request_by_vm ON create_request (vm);
