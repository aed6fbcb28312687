-- HyperSEV pool store, schema v4: VMs lost with their host.
--
-- A VM that ran on a host declared failed, and was not restarted elsewhere,
-- is `lost`. Only the vm table's CHECK on its state changes, and it only
-- accepts one value more: every stored row stays valid, so the table's
-- declaration is rewritten in place (SQLite's documented procedure for
-- loosening a constraint) instead of rebuilding a table other tables point
-- to. RESET makes this connection read the new declaration at once.

PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql, '''deleting'')),', '''deleting'', ''lost'')),')
 WHERE type = 'table' AND name = 'vm';
PRAGMA writable_schema = RESET;
