//! Single-instance leases: for a resource whose release policy has
//! `[single_instance]`, which launch holds it now.
//!
//! A launch is named by its report's REPORT_ID, which the Secure Processor
//! chooses at LAUNCH_START and the host cannot set or reuse. The launch a
//! resource is released to holds it for `lease_seconds`; its agent renews
//! the lease with fresh evidence of the same launch. While the lease lives,
//! every other launch is refused, naming the holder. Once it lapses (or the
//! tenant ends it), the next launch that passes the release policy takes
//! the resource over, and the launch it replaced is retired for good: it is
//! refused even after its successor's lease lapses in turn, so an old
//! instance that comes back after an isolation never gets the key again.
//!
//! Leases and retirements are in `kbs.db` (table `leases`,
//! `retired_instances`), written before the broker answers: a restart of
//! the broker does not let a second instance in.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::store::{StoreError, DATABASE_FILE};

/// The launch that asks: what its attested report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// REPORT_ID, hex.
    pub report_id: String,
    /// CHIP_ID, hex (which machine it runs on, for people).
    pub chip_id: String,
    /// MEASUREMENT, hex.
    pub measurement: String,
}

/// The launch that holds a resource, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// REPORT_ID, hex.
    pub report_id: String,
    /// CHIP_ID, hex.
    pub chip_id: String,
    /// MEASUREMENT, hex.
    pub measurement: String,
    /// When it was first given the resource.
    pub since: OffsetDateTime,
    /// When its lease lapses unless renewed.
    pub expires: OffsetDateTime,
}

impl Holder {
    /// A short name for messages: the first 16 hex digits of REPORT_ID and
    /// of CHIP_ID.
    pub fn describe(&self, now: OffsetDateTime) -> String {
        let left = (self.expires - now).whole_milliseconds().max(0) as f64 / 1000.0;
        format!(
            "report_id {}… on chip {}…, its lease renewed until {} ({left:.1} s from now)",
            short(&self.report_id),
            short(&self.chip_id),
            time_text(self.expires)
        )
    }
}

fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

/// What a claim did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The instance holds the resource now, for the first time; `replaced`
    /// is the launch whose lapsed lease it took over (now retired).
    Granted {
        /// The previous holder, if any.
        replaced: Option<Holder>,
        /// The new lease's end.
        expires: OffsetDateTime,
    },
    /// The instance already held it; its lease now ends later.
    Renewed {
        /// The new lease's end.
        expires: OffsetDateTime,
    },
}

/// Why a claim is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Another launch holds a live lease.
    Held(Holder),
    /// A renewal from a launch that does not hold the resource (it was
    /// never released it).
    NotHolder,
    /// This launch held the resource once and was replaced (or the tenant
    /// ended its lease): it must stop.
    Retired {
        /// Who replaced it: a REPORT_ID, or "the tenant".
        by: String,
        /// When.
        at: OffsetDateTime,
    },
}

impl Refused {
    /// The refusal for a person, about `resource`.
    pub fn describe(&self, resource: &str, now: OffsetDateTime) -> String {
        match self {
            Refused::Held(holder) => format!(
                "{resource} is single-instance and held by the live instance {}: another launch may take it once that lease lapses or the tenant ends it",
                holder.describe(now)
            ),
            Refused::NotHolder => format!(
                "this instance does not hold {resource}: a lease is renewed by the launch the resource was released to (fetch it first)"
            ),
            Refused::Retired { by, at } => format!(
                "this instance held {resource} and was superseded by {by} at {}: it must stop, and its host destroy it",
                time_text(*at)
            ),
        }
    }
}

/// A retired launch: who replaced it and when.
#[derive(Debug, Clone)]
struct Retirement {
    by: String,
    at: OffsetDateTime,
}

#[derive(Debug, Default)]
struct Lease {
    holder: Option<Holder>,
    retired: HashMap<String, Retirement>,
}

/// Every single-instance resource's lease; one lock orders the claims.
#[derive(Debug)]
pub struct Leases {
    state: Mutex<(Connection, HashMap<String, Lease>)>,
}

/// `at` as RFC 3339, as the tables, the audit log and the API write it.
pub(crate) fn time_text(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

fn parse_time(text: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|error| StoreError::Corrupt {
        what: "lease time".into(),
        problem: error.to_string(),
    })
}

impl Leases {
    /// Opens (or creates) the lease tables in `state_dir`'s `kbs.db` and
    /// loads them.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let database = Connection::open(state_dir.join(DATABASE_FILE))?;
        database.pragma_update(None, "synchronous", "FULL")?;
        database.busy_timeout(std::time::Duration::from_secs(5))?;
        database.execute_batch(
            "CREATE TABLE IF NOT EXISTS leases (
                 path TEXT PRIMARY KEY NOT NULL,
                 report_id TEXT NOT NULL,
                 chip_id TEXT NOT NULL,
                 measurement TEXT NOT NULL,
                 since TEXT NOT NULL,
                 expires TEXT NOT NULL
             ) STRICT;
             CREATE TABLE IF NOT EXISTS retired_instances (
                 path TEXT NOT NULL,
                 report_id TEXT NOT NULL,
                 retired_by TEXT NOT NULL,
                 retired_at TEXT NOT NULL,
                 PRIMARY KEY (path, report_id)
             ) STRICT;",
        )?;
        let mut leases: HashMap<String, Lease> = HashMap::new();
        {
            let mut statement = database.prepare(
                "SELECT path, report_id, chip_id, measurement, since, expires FROM leases",
            )?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let path: String = row.get(0)?;
                let holder = Holder {
                    report_id: row.get(1)?,
                    chip_id: row.get(2)?,
                    measurement: row.get(3)?,
                    since: parse_time(&row.get::<_, String>(4)?)?,
                    expires: parse_time(&row.get::<_, String>(5)?)?,
                };
                leases.entry(path).or_default().holder = Some(holder);
            }
            let mut statement = database
                .prepare("SELECT path, report_id, retired_by, retired_at FROM retired_instances")?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let path: String = row.get(0)?;
                let retirement = Retirement {
                    by: row.get(2)?,
                    at: parse_time(&row.get::<_, String>(3)?)?,
                };
                leases
                    .entry(path)
                    .or_default()
                    .retired
                    .insert(row.get(1)?, retirement);
            }
        }
        Ok(Leases {
            state: Mutex::new((database, leases)),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (Connection, HashMap<String, Lease>)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `instance` claims `path` for `lease` from `now`: renewed if it holds
    /// it, else granted if `acquire` (a release, not a renewal) and no live
    /// lease stands in the way, else refused. What is granted is on disk
    /// before this returns.
    pub fn claim(
        &self,
        path: &str,
        instance: &Instance,
        lease: time::Duration,
        now: OffsetDateTime,
        acquire: bool,
    ) -> Result<Result<Claimed, Refused>, StoreError> {
        let mut guard = self.state();
        let (database, leases) = &mut *guard;
        let entry = leases.entry(path.to_owned()).or_default();
        if let Some(retirement) = entry.retired.get(&instance.report_id) {
            return Ok(Err(Refused::Retired {
                by: retirement.by.clone(),
                at: retirement.at,
            }));
        }
        let expires = now + lease;
        let replaced = match &entry.holder {
            Some(holder) if holder.report_id == instance.report_id => {
                database.execute(
                    "UPDATE leases SET expires = ?2 WHERE path = ?1",
                    params![path, time_text(expires)],
                )?;
                if let Some(holder) = &mut entry.holder {
                    holder.expires = expires;
                }
                return Ok(Ok(Claimed::Renewed { expires }));
            }
            Some(holder) if holder.expires > now => return Ok(Err(Refused::Held(holder.clone()))),
            _ if !acquire => return Ok(Err(Refused::NotHolder)),
            lapsed => lapsed.clone(),
        };
        let holder = Holder {
            report_id: instance.report_id.clone(),
            chip_id: instance.chip_id.clone(),
            measurement: instance.measurement.clone(),
            since: now,
            expires,
        };
        let successor = format!("report_id {}…", short(&holder.report_id));
        let transaction = database.transaction()?;
        if let Some(old) = &replaced {
            retire(&transaction, path, &old.report_id, &successor, now)?;
        }
        transaction.execute(
            "INSERT OR REPLACE INTO leases (path, report_id, chip_id, measurement, since, expires)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                path,
                holder.report_id,
                holder.chip_id,
                holder.measurement,
                time_text(now),
                time_text(expires)
            ],
        )?;
        transaction.commit()?;
        if let Some(old) = &replaced {
            entry.retired.insert(
                old.report_id.clone(),
                Retirement {
                    by: successor,
                    at: now,
                },
            );
        }
        entry.holder = Some(holder);
        Ok(Ok(Claimed::Granted { replaced, expires }))
    }

    /// The holder of `path`, if a launch holds or held it.
    pub fn holder(&self, path: &str) -> Option<Holder> {
        self.state()
            .1
            .get(path)
            .and_then(|lease| lease.holder.clone())
    }

    /// The tenant ends `path`'s lease at `now`: its holder is retired, and
    /// the next launch that passes the policy takes the resource. Answers
    /// the holder it ended, if any.
    pub fn end(&self, path: &str, now: OffsetDateTime) -> Result<Option<Holder>, StoreError> {
        let mut guard = self.state();
        let (database, leases) = &mut *guard;
        let Some(holder) = leases.get(path).and_then(|lease| lease.holder.clone()) else {
            return Ok(None);
        };
        let transaction = database.transaction()?;
        retire(&transaction, path, &holder.report_id, "the tenant", now)?;
        transaction.execute("DELETE FROM leases WHERE path = ?1", params![path])?;
        transaction.commit()?;
        let lease = leases.entry(path.to_owned()).or_default();
        lease.retired.insert(
            holder.report_id.clone(),
            Retirement {
                by: "the tenant".into(),
                at: now,
            },
        );
        lease.holder = None;
        Ok(Some(holder))
    }

    /// Forgets `path` (its resource was deleted).
    pub fn forget(&self, path: &str) -> Result<(), StoreError> {
        let mut guard = self.state();
        let (database, leases) = &mut *guard;
        let transaction = database.transaction()?;
        transaction.execute("DELETE FROM leases WHERE path = ?1", params![path])?;
        transaction.execute(
            "DELETE FROM retired_instances WHERE path = ?1",
            params![path],
        )?;
        transaction.commit()?;
        leases.remove(path);
        Ok(())
    }
}

fn retire(
    transaction: &rusqlite::Transaction<'_>,
    path: &str,
    report_id: &str,
    by: &str,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    transaction.execute(
        "INSERT OR REPLACE INTO retired_instances (path, report_id, retired_by, retired_at)
         VALUES (?1, ?2, ?3, ?4)",
        params![path, report_id, by, time_text(at)],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(tag: u8) -> Instance {
        Instance {
            report_id: hex::encode([tag; 32]),
            chip_id: hex::encode([0xc0 + tag; 64]),
            measurement: hex::encode([0x42; 48]),
        }
    }

    const LEASE: time::Duration = time::Duration::seconds(30);

    #[test]
    fn one_live_instance_then_takeover_then_the_old_one_is_retired_for_good() {
        let dir = tempfile::tempdir().expect("dir");
        let leases = Leases::open(dir.path()).expect("open");
        let t0 = OffsetDateTime::now_utc();
        let path = "alice/disk-key/vm-1";
        assert!(matches!(
            leases
                .claim(path, &instance(1), LEASE, t0, true)
                .expect("claim"),
            Ok(Claimed::Granted { replaced: None, .. })
        ));
        // Renewed by the holder; a second launch is refused, naming it.
        let renewed = leases
            .claim(
                path,
                &instance(1),
                LEASE,
                t0 + time::Duration::seconds(10),
                false,
            )
            .expect("claim");
        assert_eq!(
            renewed,
            Ok(Claimed::Renewed {
                expires: t0 + time::Duration::seconds(40)
            })
        );
        let at = t0 + time::Duration::seconds(39);
        match leases
            .claim(path, &instance(2), LEASE, at, true)
            .expect("claim")
        {
            Err(refused @ Refused::Held(_)) => {
                let said = refused.describe(path, at);
                assert!(said.contains(&hex::encode([1u8; 8])), "{said}");
                assert!(said.contains("1.0 s from now"), "{said}");
            }
            other => panic!("expected Held, got {other:?}"),
        }
        // Lapsed: the second launch takes over; the first is retired, also
        // after a restart of the broker, and after the second lapses too.
        let later = t0 + time::Duration::seconds(41);
        assert_eq!(
            leases
                .claim(path, &instance(2), LEASE, later, false)
                .expect("claim"),
            Err(Refused::NotHolder)
        );
        match leases
            .claim(path, &instance(2), LEASE, later, true)
            .expect("claim")
        {
            Ok(Claimed::Granted {
                replaced: Some(old),
                ..
            }) => assert_eq!(old.report_id, instance(1).report_id),
            other => panic!("expected a takeover, got {other:?}"),
        }
        drop(leases);
        let leases = Leases::open(dir.path()).expect("reopen");
        let much_later = later + time::Duration::seconds(300);
        match leases
            .claim(path, &instance(1), LEASE, much_later, true)
            .expect("claim")
        {
            Err(refused @ Refused::Retired { .. }) => {
                let said = refused.describe(path, much_later);
                assert!(said.contains("superseded by report_id 0202"), "{said}");
            }
            other => panic!("expected Retired, got {other:?}"),
        }
        assert_eq!(
            leases.holder(path).map(|holder| holder.report_id),
            Some(instance(2).report_id)
        );
    }

    #[test]
    fn the_tenant_ends_a_lease_and_its_holder_may_not_come_back() {
        let dir = tempfile::tempdir().expect("dir");
        let leases = Leases::open(dir.path()).expect("open");
        let t0 = OffsetDateTime::now_utc();
        let path = "alice/disk-key/vm-1";
        leases
            .claim(path, &instance(1), LEASE, t0, true)
            .expect("claim")
            .expect("granted");
        let ended = leases.end(path, t0).expect("end").expect("a holder");
        assert_eq!(ended.report_id, instance(1).report_id);
        assert!(matches!(
            leases.claim(path, &instance(1), LEASE, t0, true).expect("claim"),
            Err(Refused::Retired { ref by, .. }) if by == "the tenant"
        ));
        assert!(matches!(
            leases
                .claim(path, &instance(3), LEASE, t0, true)
                .expect("claim"),
            Ok(Claimed::Granted { replaced: None, .. })
        ));
        assert_eq!(leases.end("alice/disk-key/none", t0).expect("end"), None);
        leases.forget(path).expect("forget");
        assert_eq!(leases.holder(path), None);
        assert!(matches!(
            leases
                .claim(path, &instance(1), LEASE, t0, true)
                .expect("claim"),
            Ok(Claimed::Granted { replaced: None, .. })
        ));
    }
}
