//! The audit log: `audit.jsonl` in the state folder, append-only JSON
//! Lines, one entry per auth, attestation (accepted or refused, with every
//! failed check), release, refusal and admin change.
//!
//! Each entry carries `seq` (from 1), `time`, `event`, the event's fields,
//! `prev` (hex SHA-256 of the previous entry's whole line; 64 zeros for the
//! first) and last `hash` (hex SHA-256 of the line as it would read without
//! its `,"hash":"..."` member). Changing, removing or inserting a byte
//! anywhere breaks the chain at that line ([`verify`]).
//!
//! Entries are durable before the broker answers: a single writer thread
//! takes every entry waiting, writes them with one `write` and one
//! `fdatasync` (group commit) and only then completes their
//! [`AuditTicket`]s, so throughput holds under concurrency. After a crash,
//! a torn last line is cut off at start (with a warning). A failed write
//! stops the log for good: the broker then refuses everything rather than
//! act without a trail. An admin change is logged before it is applied.
//!
//! This module must never be handed a secret (resource data, keys, tokens):
//! callers pass names, paths, measurements and reasons only.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc;

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use tokio::sync::oneshot;

/// The log's file name in the state folder.
pub const AUDIT_FILE: &str = "audit.jsonl";
/// The `prev` of the first entry.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;
/// Most entries written by one write + fdatasync.
const MAX_BATCH: usize = 4096;

/// Why the audit log cannot be opened, written or trusted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The file cannot be read, written or synced.
    #[error("audit log {path}: {problem}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        problem: String,
    },
    /// A line breaks the chain.
    #[error("audit log {path} line {line}: {problem}")]
    Broken {
        /// The file.
        path: String,
        /// The first bad line, from 1.
        line: u64,
        /// What is wrong with it.
        problem: String,
    },
    /// The writer stopped after a failed write; nothing more is logged.
    #[error("the audit log stopped after a failed write: {0}")]
    Stopped(String),
}

fn io_error(path: &Path, error: &std::io::Error) -> AuditError {
    AuditError::Io {
        path: path.display().to_string(),
        problem: error.to_string(),
    }
}

/// One event, before the writer numbers and chains it.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    event: &'static str,
    fields: Map<String, Value>,
}

impl AuditEvent {
    /// An event of kind `event` (`auth`, `attestation`, `release`,
    /// `refusal`, `admin`).
    pub fn new(event: &'static str) -> Self {
        AuditEvent {
            event,
            fields: Map::new(),
        }
    }

    /// Adds a field (never a secret).
    #[must_use]
    pub fn field(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(name.to_owned(), value.into());
        self
    }
}

/// Completes when the entry is on disk.
#[derive(Debug)]
pub struct AuditTicket(oneshot::Receiver<Result<u64, AuditError>>);

impl AuditTicket {
    /// Waits (async) until the entry is durable; its `seq`.
    pub async fn committed(self) -> Result<u64, AuditError> {
        self.0
            .await
            .unwrap_or_else(|_| Err(AuditError::Stopped("the writer is gone".into())))
    }

    /// Waits (blocking; not on an async worker) until the entry is durable.
    pub fn wait(self) -> Result<u64, AuditError> {
        self.0
            .blocking_recv()
            .unwrap_or_else(|_| Err(AuditError::Stopped("the writer is gone".into())))
    }
}

struct Pending {
    event: AuditEvent,
    done: oneshot::Sender<Result<u64, AuditError>>,
}

/// The open audit log; cheap to share (`&AuditLog` from every request).
#[derive(Debug)]
pub struct AuditLog {
    queue: mpsc::Sender<Pending>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(openssl::sha::sha256(bytes))
}

/// The chained line of `event` (no newline), its `hash` computed.
fn chained_line(seq: u64, event: AuditEvent, prev: &str) -> String {
    let mut entry = Map::new();
    entry.insert("seq".into(), seq.into());
    let time = time::OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    entry.insert("time".into(), time.into());
    entry.insert("event".into(), event.event.into());
    for (name, value) in event.fields {
        // The chain fields are the writer's own.
        if !matches!(name.as_str(), "seq" | "time" | "event" | "prev" | "hash") {
            entry.insert(name, value);
        }
    }
    entry.insert("prev".into(), prev.into());
    let body = Value::Object(entry).to_string();
    let hash = sha256_hex(body.as_bytes());
    let mut line = body;
    line.pop(); // the closing brace
    line.push_str(",\"hash\":\"");
    line.push_str(&hash);
    line.push_str("\"}");
    line
}

/// Checks one line against the chain: its `seq`, `prev` and `hash`.
fn check_line(line: &[u8], expected_seq: u64, expected_prev: &str) -> Result<String, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned())?;
    let entry: Map<String, Value> =
        serde_json::from_str(text).map_err(|error| format!("not a JSON object: {error}"))?;
    let hash = entry.get("hash").and_then(Value::as_str).ok_or("no hash")?;
    let suffix = format!(",\"hash\":\"{hash}\"}}");
    if hash.len() != 64 || suffix.len() != HASH_SUFFIX_LEN || !text.ends_with(&suffix) {
        return Err("hash is not the last member, as 64 hex digits".into());
    }
    let body = format!("{}}}", &text[..text.len() - HASH_SUFFIX_LEN]);
    if sha256_hex(body.as_bytes()) != hash {
        return Err("hash does not match the entry (the entry was changed)".into());
    }
    let seq = entry.get("seq").and_then(Value::as_u64).ok_or("no seq")?;
    if seq != expected_seq {
        return Err(format!("seq {seq}, expected {expected_seq}"));
    }
    let prev = entry.get("prev").and_then(Value::as_str).ok_or("no prev")?;
    if prev != expected_prev {
        return Err(
            "prev is not the hash of the line before (a line was changed, removed or inserted)"
                .into(),
        );
    }
    Ok(hash.to_owned())
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// Number of entries.
    pub entries: u64,
    /// The last entry's `hash` (64 zeros for an empty log).
    pub head: String,
}

/// Checks the whole chain of the log at `path`; the first bad line is named.
pub fn verify(path: &Path) -> Result<ChainSummary, AuditError> {
    let file = File::open(path).map_err(|error| io_error(path, &error))?;
    let mut reader = BufReader::new(file);
    let mut prev = GENESIS.to_owned();
    let mut head = GENESIS.to_owned();
    let mut line = Vec::new();
    let mut number: u64 = 0;
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|error| io_error(path, &error))?;
        if read == 0 {
            break;
        }
        number += 1;
        let broken = |problem: String| AuditError::Broken {
            path: path.display().to_string(),
            line: number,
            problem,
        };
        if line.last() != Some(&b'\n') {
            return Err(broken("torn: no newline at its end".into()));
        }
        let content = &line[..line.len() - 1];
        head = check_line(content, number, &prev).map_err(broken)?;
        prev = sha256_hex(content);
    }
    Ok(ChainSummary {
        entries: number,
        head,
    })
}

/// Where the log ends: the last complete line (if any) and the length of
/// the file up to its newline, read backwards from the end.
fn tail(file: &mut File, path: &Path) -> Result<(Option<Vec<u8>>, u64), AuditError> {
    let length = file
        .seek(SeekFrom::End(0))
        .map_err(|error| io_error(path, &error))?;
    let mut window: u64 = 64 * 1024;
    loop {
        let start = length.saturating_sub(window);
        file.seek(SeekFrom::Start(start))
            .map_err(|error| io_error(path, &error))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|error| io_error(path, &error))?;
        let Some(last_newline) = bytes.iter().rposition(|&byte| byte == b'\n') else {
            if start == 0 {
                return Ok((None, 0));
            }
            window *= 4;
            continue;
        };
        let kept = start + last_newline as u64 + 1;
        match bytes[..last_newline]
            .iter()
            .rposition(|&byte| byte == b'\n')
        {
            Some(previous) => {
                return Ok((Some(bytes[previous + 1..last_newline].to_vec()), kept));
            }
            None if start == 0 => return Ok((Some(bytes[..last_newline].to_vec()), kept)),
            None => window *= 4,
        }
    }
}

impl AuditLog {
    /// Opens (or creates) `<state_dir>/audit.jsonl`, cuts a torn last line,
    /// and starts the writer after its last entry.
    pub fn open(state_dir: &Path) -> Result<Self, AuditError> {
        let path = state_dir.join(AUDIT_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|error| io_error(&path, &error))?;
        let (last, kept) = tail(&mut file, &path)?;
        let length = file
            .metadata()
            .map_err(|error| io_error(&path, &error))?
            .len();
        if kept < length {
            tracing::warn!(
                path = %path.display(),
                bytes = length - kept,
                "the audit log ends with a torn line (a crash while writing it): cut off"
            );
            file.set_len(kept)
                .map_err(|error| io_error(&path, &error))?;
            file.sync_all().map_err(|error| io_error(&path, &error))?;
        }
        let (seq, prev) =
            match last {
                None => (0, GENESIS.to_owned()),
                Some(line) => {
                    let entry: Map<String, Value> =
                        serde_json::from_slice(&line).map_err(|error| AuditError::Broken {
                            path: path.display().to_string(),
                            line: 0,
                            problem: format!(
                            "the last line is not an entry ({error}); run `hsev-kbs audit verify`"
                        ),
                        })?;
                    let seq = entry.get("seq").and_then(Value::as_u64).ok_or_else(|| {
                        AuditError::Broken {
                            path: path.display().to_string(),
                            line: 0,
                            problem: "the last entry has no seq; run `hsev-kbs audit verify`"
                                .into(),
                        }
                    })?;
                    (seq, sha256_hex(&line))
                }
            };
        drop(file);
        let append = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|error| io_error(&path, &error))?;
        let (queue, receiver) = mpsc::channel();
        let writer_path = path.clone();
        std::thread::Builder::new()
            .name("hsev-kbs-audit".into())
            .spawn(move || write_loop(append, &writer_path, &receiver, seq, prev))
            .map_err(|error| io_error(&path, &error))?;
        Ok(AuditLog { queue })
    }

    /// Queues `event`; the ticket completes once it is on disk.
    pub fn record(&self, event: AuditEvent) -> AuditTicket {
        let (done, receiver) = oneshot::channel();
        if let Err(mpsc::SendError(pending)) = self.queue.send(Pending { event, done }) {
            let _closed = pending
                .done
                .send(Err(AuditError::Stopped("the writer is gone".into())));
        }
        AuditTicket(receiver)
    }
}

/// The writer thread: batches whatever waits into one write + fdatasync.
fn write_loop(
    mut file: File,
    path: &Path,
    queue: &mpsc::Receiver<Pending>,
    mut seq: u64,
    mut prev: String,
) {
    let mut stopped: Option<String> = None;
    let mut batch: Vec<Pending> = Vec::new();
    let mut buffer: Vec<u8> = Vec::new();
    while let Ok(first) = queue.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        if let Some(reason) = &stopped {
            for pending in batch.drain(..) {
                let _gone = pending.done.send(Err(AuditError::Stopped(reason.clone())));
            }
            continue;
        }
        buffer.clear();
        let mut numbered = Vec::with_capacity(batch.len());
        let (mut next_seq, mut next_prev) = (seq, prev.clone());
        for pending in batch.drain(..) {
            next_seq += 1;
            let line = chained_line(next_seq, pending.event, &next_prev);
            next_prev = sha256_hex(line.as_bytes());
            buffer.extend_from_slice(line.as_bytes());
            buffer.push(b'\n');
            numbered.push((next_seq, pending.done));
        }
        match file.write_all(&buffer).and_then(|()| file.sync_data()) {
            Ok(()) => {
                seq = next_seq;
                prev = next_prev;
                for (entry_seq, done) in numbered {
                    let _gone = done.send(Ok(entry_seq));
                }
            }
            Err(error) => {
                let reason = format!("{}: {error}", path.display());
                tracing::error!(%reason, "audit log write failed: the broker refuses everything from now on");
                for (_, done) in numbered {
                    let _gone = done.send(Err(AuditError::Stopped(reason.clone())));
                }
                stopped = Some(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_all(log: &AuditLog, count: usize) {
        let tickets: Vec<AuditTicket> = (0..count)
            .map(|index| log.record(AuditEvent::new("auth").field("session", index)))
            .collect();
        for ticket in tickets {
            ticket.wait().expect("committed");
        }
    }

    #[test]
    fn chain_verifies_and_resumes_after_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::open(dir.path()).expect("opens");
        record_all(&log, 50);
        drop(log);
        let log = AuditLog::open(dir.path()).expect("reopens");
        let seq = log
            .record(AuditEvent::new("admin").field("seq", 999))
            .wait()
            .expect("committed");
        assert_eq!(seq, 51);
        drop(log);
        let summary = verify(&dir.path().join(AUDIT_FILE)).expect("verifies");
        assert_eq!(summary.entries, 51);
        let text = std::fs::read_to_string(dir.path().join(AUDIT_FILE)).expect("reads");
        let last: Map<String, Value> =
            serde_json::from_str(text.lines().last().expect("line")).expect("json");
        assert_eq!(last["hash"], summary.head.as_str());
        assert_eq!(last["seq"], 51, "a field cannot override the chain");
    }

    #[test]
    fn torn_line_is_cut_and_flipped_byte_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(AUDIT_FILE);
        let log = AuditLog::open(dir.path()).expect("opens");
        record_all(&log, 5);
        drop(log);
        let mut file = OpenOptions::new().append(true).open(&path).expect("opens");
        file.write_all(b"{\"seq\":6,\"ti").expect("writes");
        drop(file);
        assert!(matches!(
            verify(&path),
            Err(AuditError::Broken { line: 6, .. })
        ));
        let log = AuditLog::open(dir.path()).expect("reopens and cuts");
        record_all(&log, 1);
        drop(log);
        assert_eq!(verify(&path).expect("verifies").entries, 6);

        let mut bytes = std::fs::read(&path).expect("reads");
        let third_line_start = bytes
            .iter()
            .enumerate()
            .filter(|(_, &byte)| byte == b'\n')
            .nth(1)
            .map(|(index, _)| index + 1)
            .expect("three lines");
        bytes[third_line_start + 12] ^= 0x01;
        std::fs::write(&path, &bytes).expect("writes");
        let error = verify(&path).expect_err("flipped byte");
        assert!(
            matches!(error, AuditError::Broken { line: 3, .. }),
            "{error}"
        );
    }
}
