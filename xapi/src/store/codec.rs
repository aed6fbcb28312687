//! Conversions between the domain records and SQLite values.
//!
//! Encoders (record -> SQL) return [`StoreError`] naming the bad field;
//! decoders (SQL -> record) return `rusqlite::Error` so that they compose
//! with `query_map`, and a value that does not decode becomes a
//! `FromSqlConversionFailure`, which [`StoreError::sql`] classifies as
//! [`StoreError::Corrupt`].

use std::error::Error as StdError;
use std::path::{Path, PathBuf};

use rusqlite::types::Type;
use rusqlite::Row;
use serde::de::DeserializeOwned;
use serde::Serialize;
use time::OffsetDateTime;

use super::error::StoreError;
use crate::model::{
    Attestation, DiskRecord, EventRecord, HostRecord, ImageRecord, VmId, VmRecord, VmState,
};

/// The columns [`vm_from_row`] reads, in its order.
pub(super) const VM_COLUMNS: &str = "id, owner, host, state, state_reason, spec, \
     expected_measurement, launch_digest, attestation, attestation_reason, runtime, \
     created_at, updated_at";

/// The columns [`host_from_row`] reads, in its order.
pub(super) const HOST_COLUMNS: &str =
    "name, status, capabilities, probed_at, address, cert_fingerprint";

/// The columns [`image_from_row`] reads, in its order.
pub(super) const IMAGE_COLUMNS: &str =
    "id, name, dir, sha256, cmdline, measured_direct_boot, size_bytes, imported_at";

/// The columns [`disk_from_row`] reads, in its order.
pub(super) const DISK_COLUMNS: &str = "vm, name, path, size_mib";

/// The columns [`event_from_row`] reads, in its order.
pub(super) const EVENT_COLUMNS: &str = "seq, vm, kind, detail, at";

// ---- encoders ----------------------------------------------------------

/// A time as unix nanoseconds (1677-09-21 to 2262-04-11 fit).
pub(super) fn nanos(at: OffsetDateTime, field: &'static str) -> Result<i64, StoreError> {
    i64::try_from(at.unix_timestamp_nanos()).map_err(|_| StoreError::Invalid {
        field,
        reason: format!("{at} is outside the years 1678 to 2261"),
    })
}

/// The current time, UTC.
pub(super) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// An unsigned count as a SQLite integer.
pub(super) fn integer(value: u64, field: &'static str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Invalid {
        field,
        reason: format!("{value} is larger than {}", i64::MAX),
    })
}

/// A path as UTF-8 text.
pub(super) fn path_text<'a>(path: &'a Path, field: &'static str) -> Result<&'a str, StoreError> {
    path.to_str().ok_or_else(|| StoreError::Invalid {
        field,
        reason: format!("{} is not UTF-8", path.display()),
    })
}

/// A value as JSON text.
pub(super) fn json<T: Serialize + ?Sized>(
    value: &T,
    field: &'static str,
) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Encode { field, source })
}

/// An attestation as its (state, reason) columns.
pub(super) fn attestation_columns(attestation: &Attestation) -> (&'static str, &str) {
    match attestation {
        Attestation::NotApplicable => ("not_applicable", ""),
        Attestation::Pending => ("pending", ""),
        Attestation::Released => ("released", ""),
        Attestation::Refused(reason) => ("refused", reason),
    }
}

// ---- decoders ----------------------------------------------------------

fn conversion(
    index: usize,
    kind: Type,
    error: impl StdError + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, kind, Box::new(error))
}

/// A value that decoded but means nothing to this build.
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} {value:?}")]
struct Unknown {
    what: &'static str,
    value: String,
}

pub(super) fn time_at(row: &Row<'_>, index: usize) -> rusqlite::Result<OffsetDateTime> {
    let value: i64 = row.get(index)?;
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(value))
        .map_err(|error| conversion(index, Type::Integer, error))
}

fn unsigned_at(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(index)?;
    u64::try_from(value).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, value))
}

fn json_at<T: DeserializeOwned>(row: &Row<'_>, index: usize) -> rusqlite::Result<T> {
    let text = row
        .get_ref(index)?
        .as_str()
        .map_err(|error| conversion(index, Type::Text, error))?;
    serde_json::from_str(text).map_err(|error| conversion(index, Type::Text, error))
}

fn optional_json_at<T: DeserializeOwned>(
    row: &Row<'_>,
    index: usize,
) -> rusqlite::Result<Option<T>> {
    let text = row
        .get_ref(index)?
        .as_str_or_null()
        .map_err(|error| conversion(index, Type::Text, error))?;
    text.map(|text| {
        serde_json::from_str(text).map_err(|error| conversion(index, Type::Text, error))
    })
    .transpose()
}

pub(super) fn state_at(row: &Row<'_>, index: usize) -> rusqlite::Result<VmState> {
    let text = row
        .get_ref(index)?
        .as_str()
        .map_err(|error| conversion(index, Type::Text, error))?;
    VmState::parse(text).ok_or_else(|| {
        conversion(
            index,
            Type::Text,
            Unknown {
                what: "VM state",
                value: text.to_owned(),
            },
        )
    })
}

fn attestation_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Attestation> {
    let reason: String = row.get(index + 1)?;
    let text = row
        .get_ref(index)?
        .as_str()
        .map_err(|error| conversion(index, Type::Text, error))?;
    Ok(match text {
        "not_applicable" => Attestation::NotApplicable,
        "pending" => Attestation::Pending,
        "released" => Attestation::Released,
        "refused" => Attestation::Refused(reason),
        other => {
            return Err(conversion(
                index,
                Type::Text,
                Unknown {
                    what: "attestation state",
                    value: other.to_owned(),
                },
            ))
        }
    })
}

/// A VM from the [`VM_COLUMNS`].
pub(super) fn vm_from_row(row: &Row<'_>) -> rusqlite::Result<VmRecord> {
    Ok(VmRecord {
        id: VmId(row.get(0)?),
        owner: row.get(1)?,
        host: row.get(2)?,
        state: state_at(row, 3)?,
        state_reason: row.get(4)?,
        spec: json_at(row, 5)?,
        expected_measurement: row.get(6)?,
        launch_digest: row.get(7)?,
        attestation: attestation_at(row, 8)?,
        runtime: optional_json_at(row, 10)?,
        created_at: time_at(row, 11)?,
        updated_at: time_at(row, 12)?,
    })
}

/// A host from the [`HOST_COLUMNS`].
pub(super) fn host_from_row(row: &Row<'_>) -> rusqlite::Result<HostRecord> {
    Ok(HostRecord {
        name: row.get(0)?,
        status: row.get(1)?,
        capabilities_json: row.get(2)?,
        probed_at: time_at(row, 3)?,
        address: row.get(4)?,
        cert_fingerprint: row.get(5)?,
    })
}

/// An image from the [`IMAGE_COLUMNS`].
pub(super) fn image_from_row(row: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        dir: PathBuf::from(row.get::<_, String>(2)?),
        sha256: json_at(row, 3)?,
        cmdline: row.get(4)?,
        measured_direct_boot: row.get(5)?,
        size_bytes: unsigned_at(row, 6)?,
        imported_at: time_at(row, 7)?,
    })
}

/// A disk from the [`DISK_COLUMNS`].
pub(super) fn disk_from_row(row: &Row<'_>) -> rusqlite::Result<DiskRecord> {
    Ok(DiskRecord {
        vm: VmId(row.get(0)?),
        name: row.get(1)?,
        path: PathBuf::from(row.get::<_, String>(2)?),
        size_mib: unsigned_at(row, 3)?,
    })
}

/// An event from the [`EVENT_COLUMNS`].
pub(super) fn event_from_row(row: &Row<'_>) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        seq: row.get(0)?,
        vm: row.get::<_, Option<String>>(1)?.map(VmId),
        kind: row.get(2)?,
        detail: row.get(3)?,
        at: time_at(row, 4)?,
    })
}

/// A u64 column that SQL aggregates (SUM, COUNT) produced.
pub(super) fn total_at(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    unsigned_at(row, index)
}
