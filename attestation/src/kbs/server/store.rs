//! The broker's durable state: resources, reference-value sets (each in a
//! repository, as `<repository>/<name>`) and the operator's VM
//! announcements in SQLite (`kbs.db` in the state folder, WAL,
//! `synchronous = FULL`: a write is acknowledged only once committed, so
//! `kill -9` loses nothing acknowledged), with every resource's data sealed
//! at rest by AES-256-GCM under the key-encryption key (KEK). The
//! additional authenticated data binds the ciphertext to its path, release
//! policy and reference-value names, so a row copied over another, or a
//! policy edited in the file, no longer opens.
//!
//! A resource registered without data holds none (an empty `sealed`) until
//! [`Store::generate`] makes its secret, once, at its first release.
//!
//! Everything is also held in memory, loaded at start and updated after
//! each commit, so the release path reads no database. Plaintext exists
//! only while a resource is sealed or opened, zeroized after.
//!
//! This module must never write plaintext or the KEK anywhere, and never
//! release anything itself: it stores and opens; the broker decides.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use openssl::symm::Cipher;
use rusqlite::{params, Connection};
use zeroize::Zeroizing;

use crate::kbs::protocol::{Announcement, ResourcePath, ResourceSummary};
use crate::kbs::release_policy::ReleasePolicy;

/// The database's file name in the state folder.
pub const DATABASE_FILE: &str = "kbs.db";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Why the store cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key-encryption key file is missing, of the wrong size, or
    /// readable by others.
    #[error("key-encryption key {path}: {problem}")]
    Kek {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// SQLite failed.
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    /// A stored row that does not parse (the file was edited).
    #[error("stored {what} is corrupt: {problem}")]
    Corrupt {
        /// Which row.
        what: String,
        /// What is wrong.
        problem: String,
    },
    /// Sealing or opening failed (for opening: the row was altered).
    #[error("resource {0}: its sealed data does not authenticate")]
    Unseal(String),
    /// OpenSSL failed while sealing.
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// The 32-byte key-encryption key, zeroized on drop.
pub struct Kek(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// Reads the KEK: exactly 32 bytes, in a file no group or other user
    /// can read or write.
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let problem = |problem: String| StoreError::Kek {
            path: path.display().to_string(),
            problem,
        };
        let metadata = std::fs::metadata(path).map_err(|error| problem(error.to_string()))?;
        if !metadata.is_file() {
            return Err(problem("not a regular file".into()));
        }
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(problem(format!(
                "mode {mode:04o} lets group or others read it: chmod 600"
            )));
        }
        let bytes =
            Zeroizing::new(std::fs::read(path).map_err(|error| problem(error.to_string()))?);
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| problem(format!("{} bytes, expected exactly 32", bytes.len())))?;
        Ok(Kek(Zeroizing::new(key)))
    }

    /// A fresh random KEK, written to `path` with mode 0600 (never over an
    /// existing file).
    pub fn create(path: &Path) -> Result<(), StoreError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let problem = |error: std::io::Error| StoreError::Kek {
            path: path.display().to_string(),
            problem: error.to_string(),
        };
        let mut key = Zeroizing::new([0u8; 32]);
        openssl::rand::rand_bytes(key.as_mut_slice())?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(problem)?;
        file.write_all(key.as_slice())
            .and_then(|()| file.sync_all())
            .map_err(problem)
    }
}

/// One stored resource, as held in memory: its data still sealed.
#[derive(Debug)]
pub struct StoredResource {
    /// Where it lives.
    pub path: ResourcePath,
    /// The release policy.
    pub policy: ReleasePolicy,
    /// The policy as the admin sent it.
    pub policy_toml: String,
    /// Reference-value sets of its repository it also accepts.
    pub reference_values: Vec<String>,
    /// Empty until it holds a secret.
    sealed: Vec<u8>,
}

impl StoredResource {
    /// Whether it holds a secret (false: generated at its first release).
    pub fn has_data(&self) -> bool {
        !self.sealed.is_empty()
    }
}

/// A reference-value set's key: `<repository>/<name>`.
fn set_key(repository: &str, name: &str) -> String {
    format!("{repository}/{name}")
}

/// The AAD that binds sealed data to its row.
fn resource_aad(path: &ResourcePath, policy_toml: &str, reference_values: &[String]) -> Vec<u8> {
    let mut aad = format!("hsev-kbs resource v1\n{path}\n").into_bytes();
    aad.extend_from_slice(policy_toml.as_bytes());
    aad.push(0);
    aad.extend_from_slice(reference_values.join("\n").as_bytes());
    aad
}

/// Resources and reference values: SQLite for durability, memory for reads.
#[derive(Debug)]
pub struct Store {
    database: Mutex<Connection>,
    kek: Kek,
    resources: RwLock<BTreeMap<ResourcePath, Arc<StoredResource>>>,
    reference_values: RwLock<HashMap<String, Arc<Vec<[u8; 48]>>>>,
}

fn corrupt(what: impl Into<String>, problem: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what: what.into(),
        problem: problem.to_string(),
    }
}

fn now_text() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Store {
    /// Opens (or creates) the database in `state_dir` and loads it; a
    /// resource whose sealed data does not authenticate under `kek` is
    /// refused at start.
    pub fn open(state_dir: &Path, kek: Kek) -> Result<Self, StoreError> {
        let database = Connection::open(state_dir.join(DATABASE_FILE))?;
        database.pragma_update(None, "journal_mode", "WAL")?;
        database.pragma_update(None, "synchronous", "FULL")?;
        database.busy_timeout(std::time::Duration::from_secs(5))?;
        database.execute_batch(
            "CREATE TABLE IF NOT EXISTS resources (
                 path TEXT PRIMARY KEY NOT NULL,
                 policy TEXT NOT NULL,
                 reference_values TEXT NOT NULL,
                 sealed BLOB NOT NULL,
                 updated TEXT NOT NULL
             ) STRICT;
             CREATE TABLE IF NOT EXISTS reference_values (
                 name TEXT PRIMARY KEY NOT NULL,
                 measurements TEXT NOT NULL,
                 updated TEXT NOT NULL
             ) STRICT;
             CREATE TABLE IF NOT EXISTS announcements (
                 repository TEXT NOT NULL,
                 vm TEXT NOT NULL,
                 image TEXT NOT NULL,
                 expected_measurement TEXT,
                 announced_by TEXT NOT NULL,
                 updated TEXT NOT NULL,
                 PRIMARY KEY (repository, vm)
             ) STRICT;",
        )?;
        let store = Store {
            database: Mutex::new(database),
            kek,
            resources: RwLock::new(BTreeMap::new()),
            reference_values: RwLock::new(HashMap::new()),
        };
        store.load()?;
        Ok(store)
    }

    fn database(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the connection leaves SQLite's own
        // transaction state, which SQLite keeps consistent.
        self.database
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn load(&self) -> Result<(), StoreError> {
        let database = self.database();
        let mut resources = BTreeMap::new();
        let mut statement =
            database.prepare("SELECT path, policy, reference_values, sealed FROM resources")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let path_text: String = row.get(0)?;
            let path: ResourcePath = path_text
                .parse()
                .map_err(|error| corrupt(format!("resource {path_text:?}"), error))?;
            let policy_toml: String = row.get(1)?;
            let policy = ReleasePolicy::from_toml(&policy_toml)
                .map_err(|error| corrupt(format!("resource {path} policy"), error))?;
            let names: String = row.get(2)?;
            let reference_values: Vec<String> = serde_json::from_str(&names)
                .map_err(|error| corrupt(format!("resource {path} reference_values"), error))?;
            let resource = StoredResource {
                path: path.clone(),
                policy,
                policy_toml,
                reference_values,
                sealed: row.get(3)?,
            };
            // Fail at start, not at the first release, if a row was altered.
            if resource.has_data() {
                self.unseal(&resource)?;
            }
            resources.insert(path, Arc::new(resource));
        }
        let mut sets = HashMap::new();
        let mut statement = database.prepare("SELECT name, measurements FROM reference_values")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let name: String = row.get(0)?;
            if name.split('/').count() != 2 {
                return Err(corrupt(
                    format!("reference values {name:?}"),
                    "not <repository>/<name>",
                ));
            }
            let text: String = row.get(1)?;
            let hexes: Vec<String> = serde_json::from_str(&text)
                .map_err(|error| corrupt(format!("reference values {name}"), error))?;
            let measurements = hexes
                .iter()
                .map(|text| crate::HexBytes::<48>::parse(text).map(|bytes| bytes.0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| corrupt(format!("reference values {name}"), error))?;
            sets.insert(name, Arc::new(measurements));
        }
        *self
            .resources
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = resources;
        *self
            .reference_values
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = sets;
        Ok(())
    }

    fn seal(
        &self,
        path: &ResourcePath,
        policy_toml: &str,
        reference_values: &[String],
        data: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        openssl::rand::rand_bytes(&mut nonce)?;
        let mut tag = [0u8; TAG_LEN];
        let ciphertext = openssl::symm::encrypt_aead(
            Cipher::aes_256_gcm(),
            self.kek.0.as_slice(),
            Some(&nonce),
            &resource_aad(path, policy_toml, reference_values),
            data,
            &mut tag,
        )?;
        Ok([nonce.as_slice(), &ciphertext, &tag].concat())
    }

    /// The plaintext of a stored resource (zeroized when dropped).
    pub fn unseal(&self, resource: &StoredResource) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let sealed = &resource.sealed;
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(StoreError::Unseal(resource.path.to_string()));
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        openssl::symm::decrypt_aead(
            Cipher::aes_256_gcm(),
            self.kek.0.as_slice(),
            Some(nonce),
            &resource_aad(
                &resource.path,
                &resource.policy_toml,
                &resource.reference_values,
            ),
            ciphertext,
            tag,
        )
        .map(Zeroizing::new)
        .map_err(|_| StoreError::Unseal(resource.path.to_string()))
    }

    /// Creates or replaces a resource; durable when this returns. Without
    /// `data`, a resource that exists keeps its secret (sealed again, bound
    /// to the new policy) and a new one holds none until
    /// [`Store::generate`].
    pub fn put_resource(
        &self,
        path: &ResourcePath,
        data: Option<&[u8]>,
        policy: ReleasePolicy,
        policy_toml: String,
        reference_values: Vec<String>,
    ) -> Result<(), StoreError> {
        let names = serde_json::to_string(&reference_values)
            .map_err(|error| corrupt(format!("resource {path}"), error))?;
        let database = self.database();
        let kept = match data {
            Some(_) => None,
            None => self
                .resource(path)
                .filter(|existing| existing.has_data())
                .map(|existing| self.unseal(&existing))
                .transpose()?,
        };
        let sealed = match data.or(kept.as_ref().map(|kept| kept.as_slice())) {
            Some(data) => self.seal(path, &policy_toml, &reference_values, data)?,
            None => Vec::new(),
        };
        drop(kept);
        database.execute(
            "INSERT INTO resources (path, policy, reference_values, sealed, updated)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (path) DO UPDATE SET policy = ?2, reference_values = ?3,
                 sealed = ?4, updated = ?5",
            params![path.to_string(), policy_toml, names, sealed, now_text()],
        )?;
        let resource = StoredResource {
            path: path.clone(),
            policy,
            policy_toml,
            reference_values,
            sealed,
        };
        self.resources
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path.clone(), Arc::new(resource));
        Ok(())
    }

    /// Gives a resource that holds no secret a fresh random one of `length`
    /// bytes, durably; a resource that already holds one (another caller
    /// was first) is answered as it is. `None`: no such resource.
    pub fn generate(
        &self,
        path: &ResourcePath,
        length: usize,
    ) -> Result<Option<Arc<StoredResource>>, StoreError> {
        // The connection's lock orders concurrent callers: the second sees
        // the first one's secret.
        let database = self.database();
        let Some(current) = self.resource(path) else {
            return Ok(None);
        };
        if current.has_data() {
            return Ok(Some(current));
        }
        let mut secret = Zeroizing::new(vec![0u8; length]);
        openssl::rand::rand_bytes(secret.as_mut_slice())?;
        let sealed = self.seal(
            path,
            &current.policy_toml,
            &current.reference_values,
            &secret,
        )?;
        database.execute(
            "UPDATE resources SET sealed = ?2, updated = ?3 WHERE path = ?1",
            params![path.to_string(), sealed, now_text()],
        )?;
        let resource = Arc::new(StoredResource {
            path: path.clone(),
            policy: current.policy.clone(),
            policy_toml: current.policy_toml.clone(),
            reference_values: current.reference_values.clone(),
            sealed,
        });
        self.resources
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path.clone(), resource.clone());
        Ok(Some(resource))
    }

    /// Deletes a resource (if it exists); durable when this returns.
    pub fn delete_resource(&self, path: &ResourcePath) -> Result<(), StoreError> {
        let database = self.database();
        database.execute(
            "DELETE FROM resources WHERE path = ?1",
            params![path.to_string()],
        )?;
        self.resources
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(path);
        Ok(())
    }

    /// Creates or replaces `repository`'s reference-value set `name`;
    /// durable when this returns.
    pub fn put_reference_values(
        &self,
        repository: &str,
        name: &str,
        measurements: Vec<[u8; 48]>,
    ) -> Result<(), StoreError> {
        let key = set_key(repository, name);
        let hexes: Vec<String> = measurements.iter().map(hex::encode).collect();
        let text = serde_json::to_string(&hexes)
            .map_err(|error| corrupt(format!("reference values {key}"), error))?;
        let database = self.database();
        database.execute(
            "INSERT INTO reference_values (name, measurements, updated) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET measurements = ?2, updated = ?3",
            params![key, text, now_text()],
        )?;
        self.reference_values
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, Arc::new(measurements));
        Ok(())
    }

    /// Deletes `repository`'s reference-value set `name` (if it exists);
    /// durable when this returns.
    pub fn delete_reference_values(&self, repository: &str, name: &str) -> Result<(), StoreError> {
        let key = set_key(repository, name);
        let database = self.database();
        database.execute("DELETE FROM reference_values WHERE name = ?1", params![key])?;
        self.reference_values
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&key);
        Ok(())
    }

    /// Records (or replaces) an announcement; durable when this returns.
    pub fn put_announcement(&self, announcement: &Announcement) -> Result<(), StoreError> {
        self.database().execute(
            "INSERT INTO announcements
                 (repository, vm, image, expected_measurement, announced_by, updated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (repository, vm) DO UPDATE SET image = ?3,
                 expected_measurement = ?4, announced_by = ?5, updated = ?6",
            params![
                announcement.repository,
                announcement.vm,
                announcement.image,
                announcement.expected_measurement,
                announcement.announced_by,
                announcement.updated,
            ],
        )?;
        Ok(())
    }

    /// The announcements for `repository` (every one for `None`), by
    /// repository and VM.
    pub fn announcements(&self, repository: Option<&str>) -> Result<Vec<Announcement>, StoreError> {
        let database = self.database();
        let mut statement = database.prepare(
            "SELECT repository, vm, image, expected_measurement, announced_by, updated
             FROM announcements WHERE ?1 IS NULL OR repository = ?1 ORDER BY repository, vm",
        )?;
        let rows = statement.query_map(params![repository], |row| {
            Ok(Announcement {
                repository: row.get(0)?,
                vm: row.get(1)?,
                image: row.get(2)?,
                expected_measurement: row.get(3)?,
                announced_by: row.get(4)?,
                updated: row.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The time as the store writes it.
    pub fn now() -> String {
        now_text()
    }

    /// The resource at `path`.
    pub fn resource(&self, path: &ResourcePath) -> Option<Arc<StoredResource>> {
        self.resources
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(path)
            .cloned()
    }

    /// Whether `repository` has a reference-value set `name`.
    pub fn has_reference_values(&self, repository: &str, name: &str) -> bool {
        self.reference_values
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&set_key(repository, name))
    }

    /// The measurements of `repository`'s sets `names` (missing sets add
    /// none).
    pub fn measurements_of(&self, repository: &str, names: &[String]) -> Vec<[u8; 48]> {
        let sets = self
            .reference_values
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names
            .iter()
            .filter_map(|name| sets.get(&set_key(repository, name)))
            .flat_map(|set| set.iter().copied())
            .collect()
    }

    /// The path, policy and sets of each resource of `repository` (every
    /// one for `None`), in path order (no data).
    pub fn list(&self, repository: Option<&str>) -> Vec<ResourceSummary> {
        self.resources
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|resource| {
                repository.is_none_or(|repository| resource.path.repository == repository)
            })
            .map(|resource| ResourceSummary {
                path: resource.path.clone(),
                policy: resource.policy_toml.clone(),
                reference_values: resource.reference_values.clone(),
                has_data: resource.has_data(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    fn kek_file(dir: &Path, bytes: &[u8], mode: u32) -> std::path::PathBuf {
        let path = dir.join(format!("kek-{mode:o}-{}", bytes.len()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .expect("creates");
        file.write_all(bytes).expect("writes");
        path
    }

    #[test]
    fn kek_file_is_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(Kek::load(&kek_file(dir.path(), &[1; 32], 0o600)).is_ok());
        let error = Kek::load(&kek_file(dir.path(), &[1; 32], 0o640)).expect_err("group");
        assert!(error.to_string().contains("0640"), "{error}");
        let error = Kek::load(&kek_file(dir.path(), &[1; 31], 0o600)).expect_err("size");
        assert!(error.to_string().contains("31 bytes"), "{error}");
        assert!(Kek::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn sealed_rows_cannot_be_swapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kek_path = kek_file(dir.path(), &[7; 32], 0o600);
        let store = Store::open(dir.path(), Kek::load(&kek_path).expect("kek")).expect("opens");
        let a: ResourcePath = "r/k/a".parse().expect("path");
        let b: ResourcePath = "r/k/b".parse().expect("path");
        for (path, data) in [(&a, b"secret-a"), (&b, b"secret-b")] {
            store
                .put_resource(
                    path,
                    Some(data),
                    ReleasePolicy::default(),
                    String::new(),
                    Vec::new(),
                )
                .expect("puts");
        }
        let resource = store.resource(&a).expect("stored");
        assert_eq!(
            store.unseal(&resource).expect("opens").as_slice(),
            b"secret-a"
        );
        drop(store);
        // Copy b's sealed data over a's row: a no longer opens, so the
        // broker refuses to start on the altered database.
        let database = Connection::open(dir.path().join(DATABASE_FILE)).expect("opens");
        database
            .execute(
                "UPDATE resources SET sealed = (SELECT sealed FROM resources WHERE path = 'r/k/b') WHERE path = 'r/k/a'",
                [],
            )
            .expect("swaps");
        drop(database);
        let error =
            Store::open(dir.path(), Kek::load(&kek_path).expect("kek")).expect_err("altered");
        assert!(error.to_string().contains("r/k/a"), "{error}");
    }

    #[test]
    fn a_resource_without_data_gets_one_secret_once_and_keeps_it_across_policy_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kek_path = kek_file(dir.path(), &[9; 32], 0o600);
        let store = Store::open(dir.path(), Kek::load(&kek_path).expect("kek")).expect("opens");
        let path: ResourcePath = "alice/disk-key/vm-1".parse().expect("path");
        let policy = |text: &str| ReleasePolicy::from_toml(text).expect("policy");
        store
            .put_resource(&path, None, policy(""), String::new(), Vec::new())
            .expect("puts");
        assert!(!store.resource(&path).expect("stored").has_data());
        assert!(store.list(Some("alice"))[0].path == path);
        assert!(store.list(Some("bob")).is_empty());
        let first = store
            .generate(&path, 32)
            .expect("generates")
            .expect("exists");
        let secret = store.unseal(&first).expect("opens");
        assert_eq!(secret.len(), 32);
        // A second caller gets the same secret, not a new one.
        let again = store
            .generate(&path, 32)
            .expect("generates")
            .expect("exists");
        assert_eq!(store.unseal(&again).expect("opens"), secret);
        // A new policy without data keeps the secret, bound to the policy.
        let strict = "allow_debug = false";
        store
            .put_resource(&path, None, policy(strict), strict.to_owned(), Vec::new())
            .expect("puts");
        drop(store);
        let store = Store::open(dir.path(), Kek::load(&kek_path).expect("kek")).expect("reopens");
        let kept = store.resource(&path).expect("stored");
        assert_eq!(kept.policy_toml, strict);
        assert_eq!(store.unseal(&kept).expect("opens"), secret);
        assert!(store
            .generate(&"alice/disk-key/none".parse().expect("path"), 32)
            .expect("no error")
            .is_none());
    }
}
