//! The boot log on the unlocked data disk, `<mount>/hsev-boot-log`: one
//! line per boot that got the disk key, so a guest (and a test) sees that
//! what an earlier boot wrote survived, encrypted, across reboots.
//!
//! A line reads `boot=<N> time=<RFC 3339 UTC> measurement=<96 hex digits>`,
//! the measurement being the one in the report that got the key. This
//! module owns that format and the durable append (file and directory
//! fsync'd); it never writes anything secret: a measurement is public.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::SystemTime;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The log's file name in the data disk's root.
pub const BOOT_LOG_NAME: &str = "hsev-boot-log";

/// Why the boot log could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootLogError {
    /// Reading, writing or syncing failed.
    #[error("boot log {path}: cannot {operation}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// What was being done.
        operation: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// One boot in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    /// The boot's number, from 1.
    pub boot: u64,
    /// When, as written (RFC 3339).
    pub time: String,
    /// The launch measurement, lower-case hex.
    pub measurement: String,
}

impl BootEntry {
    /// Parses one line; `None` for anything else.
    pub fn parse(line: &str) -> Option<Self> {
        let mut boot = None;
        let mut time = None;
        let mut measurement = None;
        for field in line.split_whitespace() {
            match field.split_once('=')? {
                ("boot", value) => boot = Some(value.parse().ok()?),
                ("time", value) => time = Some(value.to_owned()),
                ("measurement", value) => measurement = Some(value.to_owned()),
                _ => return None,
            }
        }
        let measurement = measurement?;
        if measurement.len() != 96 || !measurement.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(BootEntry {
            boot: boot?,
            time: time?,
            measurement,
        })
    }

    /// The line, without its newline.
    pub fn to_line(&self) -> String {
        format!(
            "boot={} time={} measurement={}",
            self.boot, self.time, self.measurement
        )
    }
}

/// The boots a log's text records, and how many of its lines are not boots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootLog {
    /// The boots, in the order written.
    pub entries: Vec<BootEntry>,
    /// Non-empty lines that are not boot entries.
    pub unreadable: usize,
}

impl BootLog {
    /// Parses a log's text.
    pub fn parse(text: &str) -> Self {
        let mut log = BootLog::default();
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            match BootEntry::parse(line) {
                Some(entry) => log.entries.push(entry),
                None => log.unreadable += 1,
            }
        }
        log
    }

    /// The number of the next boot: one more than the highest so far.
    pub fn next_boot(&self) -> u64 {
        self.entries
            .iter()
            .map(|entry| entry.boot)
            .max()
            .unwrap_or(0)
            .saturating_add(1)
    }
}

/// What [`append_boot`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The boot's number.
    pub boot: u64,
    /// The whole log after the append.
    pub contents: String,
}

/// Appends this boot to `dir/hsev-boot-log`, created if absent, and makes
/// it durable: the file, then the folder (a new file's name) are fsync'd.
pub fn append_boot(
    dir: &Path,
    measurement: &[u8; 48],
    now: SystemTime,
) -> Result<Appended, BootLogError> {
    let path = dir.join(BOOT_LOG_NAME);
    let io = |operation, target: &Path| {
        let path = target.display().to_string();
        move |source| BootLogError::Io {
            path,
            operation,
            source,
        }
    };
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&path)
        .map_err(io("open", &path))?;
    let mut contents = String::new();
    file.read_to_string(&mut contents)
        .map_err(io("read", &path))?;
    let entry = BootEntry {
        boot: BootLog::parse(&contents).next_boot(),
        time: OffsetDateTime::from(now)
            .replace_nanosecond(0)
            .unwrap_or_else(|_| OffsetDateTime::from(now))
            .format(&Rfc3339)
            .unwrap_or_else(|_| "unknown".to_owned()),
        measurement: hex::encode(measurement),
    };
    let mut line = String::new();
    if !contents.is_empty() && !contents.ends_with('\n') {
        line.push('\n');
    }
    line.push_str(&entry.to_line());
    line.push('\n');
    file.write_all(line.as_bytes())
        .map_err(io("append to", &path))?;
    file.sync_all().map_err(io("fsync", &path))?;
    File::open(dir)
        .and_then(|folder| folder.sync_all())
        .map_err(io("fsync", dir))?;
    contents.push_str(&line);
    Ok(Appended {
        boot: entry.boot,
        contents,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const M1: &str = "11111111111111111111111111111111111111111111111111111111111111111111111111111111111111111111abcd";

    #[test]
    fn parses_its_own_lines_and_counts_the_rest() {
        let text = format!(
            "boot=1 time=2025-01-01T00:00:00Z measurement={M1}\n\
             \n\
             garbage\n\
             boot=x time=t measurement={M1}\n\
             boot=2 time=t measurement=12\n\
             boot=7 time=2025-01-02T00:00:00Z measurement={M1} extra=1\n\
             boot=3 time=2025-01-03T00:00:00Z measurement={M1}\n"
        );
        let log = BootLog::parse(&text);
        assert_eq!(log.entries.len(), 2);
        assert_eq!(log.unreadable, 4);
        assert_eq!(log.entries[1].boot, 3);
        assert_eq!(log.next_boot(), 4);
        assert_eq!(
            BootEntry::parse(&log.entries[0].to_line()).as_ref(),
            Some(&log.entries[0])
        );
        assert_eq!(BootLog::parse("").next_boot(), 1);
    }

    #[test]
    fn appends_one_numbered_line_per_boot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_760_000_000);
        let first = append_boot(dir.path(), &[0xab; 48], when).expect("first");
        assert_eq!(first.boot, 1);
        assert_eq!(
            first.contents,
            format!(
                "boot=1 time=2025-10-09T08:53:20Z measurement={}\n",
                "ab".repeat(48)
            )
        );
        let second = append_boot(dir.path(), &[0xcd; 48], when).expect("second");
        assert_eq!(second.boot, 2);
        assert!(second.contents.starts_with(&first.contents));
        let on_disk = std::fs::read_to_string(dir.path().join(BOOT_LOG_NAME)).expect("log");
        assert_eq!(on_disk, second.contents);
        assert_eq!(BootLog::parse(&on_disk).entries.len(), 2);
    }

    #[test]
    fn a_log_cut_mid_line_gets_its_newline_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(BOOT_LOG_NAME),
            format!("boot=4 time=t measurement={M1}\nboot=5 ti"),
        )
        .expect("written");
        let appended = append_boot(dir.path(), &[0; 48], SystemTime::now()).expect("appended");
        assert_eq!(appended.boot, 5);
        let log = BootLog::parse(&appended.contents);
        assert_eq!((log.entries.len(), log.unreadable), (2, 1));
    }

    #[test]
    fn an_unwritable_folder_is_an_error() {
        let error = append_boot(Path::new("/nonexistent/dir"), &[0; 48], SystemTime::now())
            .expect_err("fails");
        assert!(error.to_string().contains("cannot open"), "{error}");
    }
}
