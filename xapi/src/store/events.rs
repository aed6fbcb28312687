//! The event log.

use super::codec::{self, EVENT_COLUMNS};
use super::{Result, SqliteStore, StoreError};
use crate::model::{EventRecord, VmId};

impl SqliteStore {
    /// Appends an event (about a VM, or about the pool with `None`), stamped
    /// now, and returns it with its sequence number.
    ///
    /// The VM is not checked: events of a deleted VM stay in the log.
    ///
    /// # Errors
    ///
    /// [`StoreError::Constraint`] for an empty kind.
    pub fn append_event(&self, vm: Option<&VmId>, kind: &str, detail: &str) -> Result<EventRecord> {
        let op = "record the event";
        let at = codec::now();
        let at_nanos = codec::nanos(at, "event time")?;
        let connection = self.connection();
        connection
            .prepare_cached("INSERT INTO event (vm, kind, detail, at) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut statement| {
                statement.execute((vm.map(|vm| vm.0.as_str()), kind, detail, at_nanos))
            })
            .map_err(StoreError::sql(op))?;
        Ok(EventRecord {
            seq: connection.last_insert_rowid(),
            vm: vm.cloned(),
            kind: kind.to_owned(),
            detail: detail.to_owned(),
            at,
        })
    }

    /// Appends an event as another store recorded it: its time kept, a new
    /// sequence number given.
    ///
    /// # Errors
    ///
    /// [`StoreError::Constraint`] for an empty kind.
    pub fn import_event(&self, event: &EventRecord) -> Result<()> {
        let at = codec::nanos(event.at, "event time")?;
        self.connection()
            .prepare_cached("INSERT INTO event (vm, kind, detail, at) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut statement| {
                statement.execute((
                    event.vm.as_ref().map(|vm| vm.0.as_str()),
                    &event.kind,
                    &event.detail,
                    at,
                ))
            })
            .map_err(StoreError::sql("import the event"))?;
        Ok(())
    }

    /// The last `limit` events of a VM (or, with `None`, of the whole
    /// pool), oldest first.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn events(&self, vm: Option<&VmId>, limit: usize) -> Result<Vec<EventRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let connection = self.connection();
        let statement = match vm {
            Some(vm) => connection
                .prepare_cached(&format!(
                    "SELECT * FROM (SELECT {EVENT_COLUMNS} FROM event WHERE vm = ?1
                                    ORDER BY seq DESC LIMIT ?2)
                     ORDER BY seq"
                ))
                .and_then(|mut statement| {
                    statement
                        .query_map((&vm.0, limit), codec::event_from_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                }),
            None => connection
                .prepare_cached(&format!(
                    "SELECT * FROM (SELECT {EVENT_COLUMNS} FROM event
                                    ORDER BY seq DESC LIMIT ?1)
                     ORDER BY seq"
                ))
                .and_then(|mut statement| {
                    statement
                        .query_map([limit], codec::event_from_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                }),
        };
        statement.map_err(StoreError::sql("list the events"))
    }

    /// Up to `limit` events of the pool that came after the sequence number
    /// `after`, oldest first: how a watcher follows the log.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::Corrupt`].
    pub fn events_after(&self, after: i64, limit: usize) -> Result<Vec<EventRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.connection()
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM event WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))
            .and_then(|mut statement| {
                statement
                    .query_map((after, limit), codec::event_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(StoreError::sql("follow the events"))
    }
}
