//! `hsev-agent unlock`: the guest side of the attested disk-key release.
//!
//! Finds the data disk (serial `hsev-data`), attests to the key broker
//! through the Trustee RCAR exchange with evidence from the Secure
//! Processor, receives the disk key (JWE-wrapped to an ephemeral key, in
//! the KBS client), opens the LUKS2 disk with it, makes ext4 on a first
//! boot, mounts it, appends to its boot log, and tells the console and the
//! host ([`StatusPort`]) each step.
//!
//! An `https://` broker is trusted by the pin of its public key from the
//! measured command line, and by nothing else: a server presenting another
//! key (a host standing in for the broker) is refused at once, both
//! fingerprints named, and nothing is sent to it. An unreachable key broker
//! is retried with [`Backoff`] until the deadline; a refusal is final (no
//! retry: the broker said no, and why). The
//! key lives in a [`Zeroizing`] buffer from the client to cryptsetup's
//! standard input and nowhere else: never in a file, a log line, a status
//! line or an error.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use hsev_attestation::agent_status::AgentPhase;
use hsev_attestation::firmware::guest::GuestReporter;
use hsev_attestation::kbs::client::Lease;
use hsev_attestation::kbs::tls::{PinMismatch, SpkiPin};
use zeroize::Zeroizing;

use crate::backoff::{Backoff, Clock, Retries, SystemClock};
use crate::boot_log::{append_boot, BootLogError};
use crate::disk::{
    find_disk_by_serial, has_ext_filesystem, DiskError, DATA_DISK_SERIAL, MAPPED_NAME,
};
use crate::luks::{disk_content, luks_format, luks_open, DiskContent, LuksError};
use crate::settings::UnlockSettings;
use crate::status::StatusPort;
use crate::{evidence, open_chosen_reporter, say, AgentError, Device};

/// How long one HTTP request to the key broker may take (so the last
/// attempt may end this much after `hsev.kbs.timeout`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The console marker of a refusal: `HSEV-KBS-REFUSED <status> <detail>`.
pub const REFUSED_MARKER: &str = "HSEV-KBS-REFUSED";

/// The console marker of a broker that is not the pinned one:
/// `HSEV-KBS-WRONG-BROKER expected=<pin> presented=<pin>`.
pub const WRONG_BROKER_MARKER: &str = "HSEV-KBS-WRONG-BROKER";

/// The console marker of success: `HSEV-DISK-UNLOCKED <mount> boot=<N>`.
pub const UNLOCKED_MARKER: &str = "HSEV-DISK-UNLOCKED";

/// The exit status of `hsev-agent unlock` when the key broker refused, or
/// the agent refused a broker that is not the pinned one.
pub const EXIT_REFUSED: i32 = 3;

/// The exit status of `hsev-agent unlock` on any other failure.
pub const EXIT_FAILED: i32 = 1;

/// Why one exchange with the key broker gave no key, as the unlock flow
/// acts on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// No answer (connection refused, timed out, 5xx): try again.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The key is another live instance's (single-instance): try again,
    /// once its lease may have lapsed.
    #[error("held by another live instance: {0}")]
    Held(String),
    /// The broker said no: final.
    #[error("refused ({status} {error_type}): {detail}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The RFC 7807 error type.
        error_type: String,
        /// The broker's reason.
        detail: String,
    },
    /// The server is not the pinned broker: final.
    #[error("{0}")]
    WrongBroker(PinMismatch),
    /// An answer that makes no sense (or evidence that could not be made).
    #[error("{0}")]
    Protocol(String),
}

/// Evidence for a report bound to the 64 bytes given: Trustee JSON SNP
/// evidence, or why none.
pub type EvidenceFn<'a> = dyn FnMut(&[u8; 64]) -> Result<serde_json::Value, String> + 'a;

/// What the flow needs of a key broker: one attested fetch of the disk key.
pub trait KeyBroker {
    /// Runs the RCAR exchange with `evidence` and fetches the key, and its
    /// lease if the key is single-instance.
    fn fetch_key(&mut self, evidence: &mut EvidenceFn<'_>) -> Result<Fetched, FetchError>;
}

/// A key as the broker answered it.
#[derive(Debug)]
pub struct Fetched {
    /// The disk key.
    pub key: Zeroizing<Vec<u8>>,
    /// Its lease, when one launch at a time may hold it.
    pub lease: Option<Lease>,
}

/// A released disk key and the measurement of the report that got it.
#[derive(Debug)]
pub struct Released {
    /// The disk key.
    pub key: Zeroizing<Vec<u8>>,
    /// Its lease, when one launch at a time may hold it.
    pub lease: Option<Lease>,
    /// The launch measurement in the evidence the broker accepted.
    pub measurement: [u8; 48],
}

/// What an unlock did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlocked {
    /// The mapped (unlocked) device.
    pub device: PathBuf,
    /// Where it is mounted.
    pub mount: PathBuf,
    /// This boot's number in the boot log.
    pub boot: u64,
    /// The key's lease, when one launch at a time may hold it: the agent
    /// must keep it ([`crate::keeper`]) or stop the guest.
    pub lease: Option<Lease>,
}

/// Why the unlock did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    /// The settings are unusable.
    #[error("{0}")]
    Settings(String),
    /// No data disk.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// No way to the Secure Processor.
    #[error(transparent)]
    Device(#[from] AgentError),
    /// The key broker refused the key.
    #[error("the key broker refused the key ({status} {error_type}): {detail}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The RFC 7807 error type.
        error_type: String,
        /// The broker's reason, verbatim.
        detail: String,
    },
    /// The server at the broker's address presented another public key
    /// than the command line pins: not the tenant's broker.
    #[error("{url} is not the pinned key broker: {mismatch}; nothing was sent to it")]
    WrongBroker {
        /// The broker's URL.
        url: String,
        /// The pin held and the key presented.
        mismatch: PinMismatch,
    },
    /// The key broker stayed unreachable until the deadline.
    #[error(
        "the key broker {url} stayed unreachable for {waited:.0?} ({attempts} attempts): {last}"
    )]
    Unreachable {
        /// The broker.
        url: String,
        /// How long the agent tried.
        waited: Duration,
        /// How many attempts.
        attempts: u32,
        /// The last reason.
        last: String,
    },
    /// The key stayed another live instance's until the deadline.
    #[error(
        "the key broker {url} kept the key for another live instance for {waited:.0?} \
         ({attempts} attempts): {last}"
    )]
    Held {
        /// The broker.
        url: String,
        /// How long the agent tried.
        waited: Duration,
        /// How many attempts.
        attempts: u32,
        /// The broker's last reason (naming the live instance).
        last: String,
    },
    /// The exchange went wrong.
    #[error("the exchange with the key broker failed: {0}")]
    Protocol(String),
    /// cryptsetup failed.
    #[error(transparent)]
    Luks(#[from] LuksError),
    /// The data disk holds something other than LUKS2 or zeros.
    #[error(
        "the data disk {0} is neither LUKS2 nor empty: it is not formatted over (it may hold \
         data)"
    )]
    UnknownDisk(String),
    /// A command (mke2fs, mount) failed.
    #[error("{what} failed: {reason}")]
    Command {
        /// What was run.
        what: String,
        /// Its error output or why it did not run.
        reason: String,
    },
    /// The mount point cannot be made.
    #[error("cannot create the mount point {path}: {source}")]
    MountPoint {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The boot log cannot be written.
    #[error(transparent)]
    BootLog(#[from] BootLogError),
}

impl UnlockError {
    /// The phase the host is told.
    pub fn phase(&self) -> AgentPhase {
        match self {
            UnlockError::Refused { .. }
            | UnlockError::WrongBroker { .. }
            | UnlockError::Held { .. } => AgentPhase::Refused,
            _ => AgentPhase::Failed,
        }
    }

    /// The detail the host is told: for a refusal, the broker's reason
    /// verbatim; otherwise the whole message.
    pub fn detail(&self) -> String {
        match self {
            UnlockError::Refused { detail, .. } => detail.clone(),
            other => other.to_string(),
        }
    }

    /// The exit status of `hsev-agent unlock`.
    pub fn exit_code(&self) -> i32 {
        match self {
            UnlockError::Refused { .. }
            | UnlockError::WrongBroker { .. }
            | UnlockError::Held { .. } => EXIT_REFUSED,
            _ => EXIT_FAILED,
        }
    }
}

/// Fetches the key from `broker` with evidence from `reporter`, retrying an
/// unreachable broker, or a key another live instance holds, as `retries`
/// allows and telling each step on the console and to `status`.
pub fn fetch_key<C: Clock>(
    broker: &mut dyn KeyBroker,
    reporter: &mut dyn GuestReporter,
    retries: &mut Retries<C>,
    status: &mut StatusPort,
    url: &str,
) -> Result<Released, UnlockError> {
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let mut measurement = None;
        let mut make_evidence = |report_data: &[u8; 64]| {
            let evidence = evidence(reporter, report_data, 0).map_err(|error| error.to_string())?;
            measurement = Some(evidence.report.measurement);
            Ok(evidence.to_json())
        };
        let fetched = broker.fetch_key(&mut make_evidence);
        match fetched {
            Ok(Fetched { key, lease }) => {
                let measurement = measurement.ok_or_else(|| {
                    UnlockError::Protocol(
                        "a key came back without evidence being asked for".to_owned(),
                    )
                })?;
                return Ok(Released {
                    key,
                    lease,
                    measurement,
                });
            }
            Err(FetchError::Refused {
                status,
                error_type,
                detail,
            }) => {
                return Err(UnlockError::Refused {
                    status,
                    error_type,
                    detail,
                })
            }
            Err(FetchError::WrongBroker(mismatch)) => {
                return Err(UnlockError::WrongBroker {
                    url: url.to_owned(),
                    mismatch,
                })
            }
            Err(FetchError::Protocol(reason)) => return Err(UnlockError::Protocol(reason)),
            Err(FetchError::Unreachable(reason)) => {
                retry_later(
                    retries,
                    status,
                    url,
                    attempts,
                    AgentPhase::Unreachable,
                    reason,
                )?;
            }
            Err(FetchError::Held(reason)) => {
                retry_later(retries, status, url, attempts, AgentPhase::Held, reason)?;
            }
        }
    }
}

/// After a broker's answer that a later attempt may change (`phase`:
/// unreachable, or the key held by another live instance, for `reason`):
/// tells it and waits for the next attempt, or gives up at the deadline.
fn retry_later<C: Clock>(
    retries: &mut Retries<C>,
    status: &mut StatusPort,
    url: &str,
    attempts: u32,
    phase: AgentPhase,
    reason: String,
) -> Result<(), UnlockError> {
    let held = phase == AgentPhase::Held;
    let Some(wait) = retries.next_wait() else {
        let (url, waited, last) = (url.to_owned(), retries.elapsed(), reason);
        return Err(if held {
            UnlockError::Held {
                url,
                waited,
                attempts,
                last,
            }
        } else {
            UnlockError::Unreachable {
                url,
                waited,
                attempts,
                last,
            }
        });
    };
    let what = if held {
        "holds the key for another live instance"
    } else {
        "unreachable"
    };
    say(&format!(
        "key broker {url} {what} (attempt {attempts}, {:.1} s in): {reason}; retrying in {:.1} s",
        retries.elapsed().as_secs_f64(),
        wait.as_secs_f64()
    ));
    status.report(phase, &reason);
    retries.sleep(wait);
    Ok(())
}

/// The real key broker: [`hsev_attestation::kbs::client::KbsClient`].
#[derive(Debug)]
pub struct KbsBroker {
    client: hsev_attestation::kbs::client::KbsClient,
    resource: hsev_attestation::kbs::client::ResourcePath,
}

impl KbsBroker {
    /// The broker at `url`, pinned by `pin` (none: a plain-HTTP
    /// development broker), for `resource`.
    pub fn new(url: &str, pin: Option<SpkiPin>, resource: &str) -> Result<Self, UnlockError> {
        let resource = resource
            .parse()
            .map_err(|error| UnlockError::Settings(format!("hsev.kbs.resource: {error}")))?;
        let client = hsev_attestation::kbs::client::KbsClient::new(url, pin, REQUEST_TIMEOUT)
            .map_err(|error| UnlockError::Settings(format!("hsev.kbs={url}: {error}")))?;
        Ok(KbsBroker { client, resource })
    }
}

impl KeyBroker for KbsBroker {
    fn fetch_key(&mut self, evidence: &mut EvidenceFn<'_>) -> Result<Fetched, FetchError> {
        use hsev_attestation::kbs::jwe::KeyAlgorithm;
        self.client
            .fetch_resource_and_lease(&self.resource, KeyAlgorithm::EcdhEsA256kwP256, evidence)
            .map(|(key, lease)| Fetched { key, lease })
            .map_err(FetchError::from)
    }
}

impl KbsBroker {
    /// Renews the lease of the key, attested afresh with `evidence`.
    pub fn renew_lease(&self, evidence: &mut EvidenceFn<'_>) -> Result<Lease, FetchError> {
        self.client
            .renew_lease(&self.resource, evidence)
            .map_err(FetchError::from)
    }
}

impl From<hsev_attestation::kbs::client::ClientError> for FetchError {
    fn from(error: hsev_attestation::kbs::client::ClientError) -> Self {
        use hsev_attestation::kbs::client::ClientError;
        match error {
            ClientError::Unreachable(reason) => FetchError::Unreachable(reason),
            ClientError::Held(reason) => FetchError::Held(reason),
            ClientError::Refused {
                status,
                error_type,
                detail,
            } => FetchError::Refused {
                status,
                error_type,
                detail,
            },
            ClientError::WrongBroker(mismatch) => FetchError::WrongBroker(mismatch),
            ClientError::Protocol(reason) => FetchError::Protocol(reason),
        }
    }
}

/// The whole unlock, as `hsev-agent unlock` runs it: every step on the
/// console and to `status`, the final verdict included.
pub fn run(
    settings: &UnlockSettings,
    device: Device,
    tsm_root: &Path,
    status: &mut StatusPort,
) -> Result<Unlocked, UnlockError> {
    let result = unlock(settings, device, tsm_root, status);
    match &result {
        Ok(unlocked) => {
            println!(
                "{UNLOCKED_MARKER} {} boot={}",
                unlocked.mount.display(),
                unlocked.boot
            );
            status.report(
                AgentPhase::Unlocked,
                &format!(
                    "mounted {} at {}, boot {}",
                    unlocked.device.display(),
                    unlocked.mount.display(),
                    unlocked.boot
                ),
            );
        }
        Err(error) => {
            match error {
                UnlockError::Refused { status, detail, .. } => {
                    println!("{REFUSED_MARKER} {status} {}", one_line(detail));
                }
                UnlockError::Held { last, .. } => {
                    println!("{REFUSED_MARKER} 503 {}", one_line(last));
                }
                UnlockError::WrongBroker { mismatch, .. } => {
                    println!(
                        "{WRONG_BROKER_MARKER} expected={} presented={}",
                        mismatch.expected, mismatch.presented
                    );
                }
                _ => {}
            }
            say(&format!(
                "no disk unlocked: {}",
                one_line(&error.to_string())
            ));
            status.report(error.phase(), &error.detail());
        }
    }
    result
}

fn unlock(
    settings: &UnlockSettings,
    device: Device,
    tsm_root: &Path,
    status: &mut StatusPort,
) -> Result<Unlocked, UnlockError> {
    say(&format!(
        "unlocking the data disk: key broker {}, resource {}, mount point {}",
        settings.kbs_url,
        settings.resource,
        settings.mount.display()
    ));
    let disk = find_disk_by_serial(Path::new(crate::disk::SYS_BLOCK), DATA_DISK_SERIAL)?;
    say(&format!(
        "data disk: {} (serial {DATA_DISK_SERIAL})",
        disk.display()
    ));
    let (chosen, mut reporter) = open_chosen_reporter(device, tsm_root)?;
    say(&format!("evidence from {}", chosen.describe()));
    match settings.pin {
        Some(pin) => say(&format!(
            "the key broker is trusted by its public key {pin} alone (hsev.kbs.pin)"
        )),
        None => say(
            "WARNING: plain-HTTP key broker (development only): nothing proves that it is the \
             tenant's, and the host could stand in for it",
        ),
    }
    let mut broker = KbsBroker::new(&settings.kbs_url, settings.pin, &settings.resource)?;

    status.report(AgentPhase::Attesting, "");
    say(&format!(
        "attesting to {} for {} (an unreachable broker is retried for {} s)",
        settings.kbs_url,
        settings.resource,
        settings.timeout.as_secs()
    ));
    let mut retries = Retries::new(settings.timeout, Backoff::default(), SystemClock);
    let released = fetch_key(
        &mut broker,
        reporter.as_mut(),
        &mut retries,
        status,
        &settings.kbs_url,
    )?;
    say(&format!(
        "key released for measurement {}",
        hex::encode(released.measurement)
    ));

    match disk_content(&disk).map_err(|source| UnlockError::Command {
        what: format!("reading {}", disk.display()),
        reason: source.to_string(),
    })? {
        DiskContent::Luks => {}
        DiskContent::Empty => {
            say(&format!(
                "first boot: {} is empty; formatting it as LUKS2 with the released key (the \
                 host never had it)",
                disk.display()
            ));
            luks_format(&disk, &released.key)?;
        }
        DiskContent::Unknown => return Err(UnlockError::UnknownDisk(disk.display().to_string())),
    }
    let mapped = luks_open(&disk, MAPPED_NAME, &released.key)?;
    let measurement = released.measurement;
    let lease = released.lease.clone();
    drop(released); // the key is zeroized here
    say(&format!(
        "opened {} as {}",
        disk.display(),
        mapped.display()
    ));

    if has_ext_filesystem(&mapped)? {
        say(&format!("{} has an ext4 filesystem", mapped.display()));
    } else {
        say(&format!(
            "no filesystem on {}: first boot, making ext4",
            mapped.display()
        ));
        run_command(
            Command::new("mke2fs")
                .args(["-q", "-t", "ext4", "-L", "hsev-data"])
                .arg(&mapped),
            "mke2fs",
        )?;
    }

    std::fs::create_dir_all(&settings.mount).map_err(|source| UnlockError::MountPoint {
        path: settings.mount.display().to_string(),
        source,
    })?;
    run_command(
        Command::new("mount")
            .args(["-t", "ext4", "-o", "nosuid,nodev"])
            .arg(&mapped)
            .arg(&settings.mount),
        "mount",
    )?;
    say(&format!(
        "mounted {} at {}",
        mapped.display(),
        settings.mount.display()
    ));

    let appended = append_boot(&settings.mount, &measurement, SystemTime::now())?;
    for line in appended.contents.lines() {
        say(&format!("boot log: {line}"));
    }
    Ok(Unlocked {
        device: mapped,
        mount: settings.mount.clone(),
        boot: appended.boot,
        lease,
    })
}

/// Runs `command` (no key material ever goes through here), its output
/// kept for the error.
fn run_command(command: &mut Command, what: &str) -> Result<(), UnlockError> {
    let shown = format!(
        "{what} {}",
        command
            .get_args()
            .map(|arg| arg.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|error| UnlockError::Command {
            what: shown.clone(),
            reason: error.to_string(),
        })?;
    if output.status.success() {
        return Ok(());
    }
    let mut reason = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if reason.is_empty() {
        reason = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    Err(UnlockError::Command {
        what: shown,
        reason: format!("{} ({reason})", output.status),
    })
}

/// `text` on one console line: control characters (newlines included)
/// become spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::fs::File;

    use hsev_attestation::agent_status::AgentStatus;
    use hsev_attestation::firmware::{FirmwareError, GuestRequest, GuestResponse};

    use super::*;
    use crate::backoff::tests::FakeClock;

    /// A reporter that signs nothing but answers a well-formed report with
    /// the asked report_data and a fixed measurement.
    #[derive(Debug)]
    struct FakeSp;

    const MEASUREMENT: [u8; 48] = [7; 48];

    impl GuestReporter for FakeSp {
        fn request(&mut self, request: &GuestRequest) -> Result<GuestResponse, FirmwareError> {
            let GuestRequest::ExtendedReport { report_data, .. } = request else {
                return Err(FirmwareError::Device("not asked for".to_owned()));
            };
            Ok(GuestResponse::ExtendedReport {
                report: crate::unsigned_report(report_data, &MEASUREMENT),
                certificates: Vec::new(),
            })
        }
    }

    /// A broker that plays scripted answers, asking for evidence first as
    /// the real exchange does.
    #[derive(Debug)]
    struct Scripted {
        answers: VecDeque<Result<Vec<u8>, FetchError>>,
        evidence_seen: Vec<serde_json::Value>,
    }

    impl Scripted {
        fn new(answers: Vec<Result<Vec<u8>, FetchError>>) -> Self {
            Scripted {
                answers: answers.into(),
                evidence_seen: Vec::new(),
            }
        }
    }

    impl KeyBroker for Scripted {
        fn fetch_key(&mut self, evidence: &mut EvidenceFn<'_>) -> Result<Fetched, FetchError> {
            let answer = self
                .answers
                .pop_front()
                .unwrap_or_else(|| Err(FetchError::Protocol("script ran out".to_owned())));
            if !matches!(answer, Err(FetchError::Unreachable(_))) {
                let json = evidence(&[0x11; 64]).map_err(FetchError::Protocol)?;
                self.evidence_seen.push(json);
            }
            answer.map(|key| Fetched {
                key: Zeroizing::new(key),
                lease: None,
            })
        }
    }

    fn unreachable(reason: &str) -> Result<Vec<u8>, FetchError> {
        Err(FetchError::Unreachable(reason.to_owned()))
    }

    struct Run {
        result: Result<Released, UnlockError>,
        slept: Vec<Duration>,
        statuses: Vec<AgentStatus>,
        broker: Scripted,
    }

    fn play(answers: Vec<Result<Vec<u8>, FetchError>>, timeout: Duration) -> Run {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = dir.path().join("port");
        let mut status = StatusPort::to_writer(File::create(&port).expect("port"));
        let mut clock = FakeClock::new();
        let mut retries = Retries::new(timeout, Backoff::default(), &mut clock);
        let mut broker = Scripted::new(answers);
        let result = fetch_key(
            &mut broker,
            &mut FakeSp,
            &mut retries,
            &mut status,
            "http://10.0.2.2:1",
        );
        let statuses = std::fs::read_to_string(&port)
            .expect("port")
            .lines()
            .map(|line| AgentStatus::from_line(line).expect("status"))
            .collect();
        Run {
            result,
            slept: clock.slept,
            statuses,
            broker,
        }
    }

    #[test]
    fn retries_an_unreachable_broker_with_backoff_then_gets_the_key() {
        let run = play(
            vec![
                unreachable("connection refused"),
                unreachable("connection refused"),
                unreachable("timed out"),
                Ok(vec![0xaa; 32]),
            ],
            Duration::from_secs(300),
        );
        let released = run.result.expect("released");
        assert_eq!(released.key.as_slice(), [0xaa; 32]);
        assert_eq!(released.measurement, MEASUREMENT);
        assert_eq!(
            run.slept,
            [500, 1000, 2000].map(Duration::from_millis).to_vec()
        );
        // One status per change of reason, never the key.
        let details: Vec<&str> = run.statuses.iter().map(|s| s.detail.as_str()).collect();
        assert_eq!(details, ["connection refused", "timed out"]);
        assert!(run
            .statuses
            .iter()
            .all(|status| status.phase == AgentPhase::Unreachable));
        // The evidence is the report the SP made for the broker's 64 bytes.
        let evidence = &run.broker.evidence_seen[0];
        assert_eq!(
            evidence["attestation_report"]["report_data"],
            serde_json::json!([0x11_u8; 64].to_vec())
        );
    }

    #[test]
    fn a_key_another_live_instance_holds_is_waited_for_and_given_up_as_held() {
        let held = || {
            Err(FetchError::Held(
                "alice/disk-key/vm-1 is held by launch 0a0b.. until 12:00:08".to_owned(),
            ))
        };
        let run = play(
            vec![held(), held(), Ok(vec![7; 32])],
            Duration::from_secs(300),
        );
        assert_eq!(run.result.expect("released").key.as_slice(), [7; 32]);
        assert_eq!(run.slept, [500, 1000].map(Duration::from_millis).to_vec());
        assert_eq!(run.statuses.len(), 1, "one status for one reason");
        assert_eq!(run.statuses[0].phase, AgentPhase::Held);
        assert!(run.statuses[0].detail.contains("held by launch 0a0b"));

        let run = play(
            std::iter::repeat_with(held).take(100).collect(),
            Duration::from_secs(20),
        );
        let error = run.result.expect_err("gave up");
        assert_eq!(error.phase(), AgentPhase::Refused);
        assert_eq!(error.exit_code(), EXIT_REFUSED);
        let message = error.to_string();
        assert!(
            message.contains("kept the key for another live instance for 20s (7 attempts)")
                && message.contains("held by launch 0a0b"),
            "{message}"
        );
    }

    #[test]
    fn a_refusal_is_final_at_once() {
        let run = play(
            vec![
                Err(FetchError::Refused {
                    status: 401,
                    error_type: "PolicyDeny".to_owned(),
                    detail: "measurement 0707.. is not a reference value".to_owned(),
                }),
                Ok(vec![1; 32]),
            ],
            Duration::from_secs(300),
        );
        let error = run.result.expect_err("refused");
        assert_eq!(error.phase(), AgentPhase::Refused);
        assert_eq!(
            error.detail(),
            "measurement 0707.. is not a reference value"
        );
        assert_eq!(error.exit_code(), EXIT_REFUSED);
        assert!(run.slept.is_empty(), "no retry");
        assert_eq!(run.broker.answers.len(), 1, "never asked again");
    }

    #[test]
    fn an_unreachable_broker_is_given_up_at_the_deadline() {
        let run = play(
            std::iter::repeat_with(|| unreachable("connection refused"))
                .take(100)
                .collect(),
            Duration::from_secs(20),
        );
        let error = run.result.expect_err("gave up");
        assert_eq!(error.phase(), AgentPhase::Failed);
        assert_eq!(error.exit_code(), EXIT_FAILED);
        let message = error.to_string();
        assert!(
            message.contains("unreachable for 20s (7 attempts)")
                && message.contains("connection refused"),
            "{message}"
        );
        assert_eq!(run.slept.iter().sum::<Duration>(), Duration::from_secs(20));
        assert_eq!(run.statuses.len(), 1, "one status for one reason");
    }

    #[test]
    fn a_broker_that_is_not_the_pinned_one_is_refused_at_once_naming_both_keys() {
        let mismatch = PinMismatch {
            expected: SpkiPin([1; 32]),
            presented: SpkiPin([2; 32]),
        };
        let run = play(
            vec![
                Err(FetchError::WrongBroker(mismatch.clone())),
                Ok(vec![1; 32]),
            ],
            Duration::from_secs(300),
        );
        let error = run.result.expect_err("refused");
        assert_eq!(error.phase(), AgentPhase::Refused);
        assert_eq!(error.exit_code(), EXIT_REFUSED);
        let detail = error.detail();
        assert!(
            detail.contains(&mismatch.expected.to_string())
                && detail.contains(&mismatch.presented.to_string()),
            "{detail}"
        );
        assert!(run.slept.is_empty(), "no retry");
        assert_eq!(run.broker.answers.len(), 1, "never asked again");
    }

    /// The real client against a real TLS server with another key: the
    /// flow ends with the wrong-broker refusal, evidence never asked for.
    #[test]
    fn the_real_client_refuses_a_tls_server_with_another_key() {
        let server = tls_server_with_fresh_key();
        let pinned = SpkiPin([9; 32]);
        let mut broker =
            KbsBroker::new(&server, Some(pinned), "alice/disk-key/vm-1").expect("broker");
        let mut asked = false;
        let result = broker.fetch_key(&mut |_| {
            asked = true;
            Err("not asked".to_owned())
        });
        match result {
            Err(FetchError::WrongBroker(mismatch)) => {
                assert_eq!(mismatch.expected, pinned);
                assert_ne!(mismatch.presented, pinned);
            }
            other => panic!("expected a wrong-broker refusal, got {other:?}"),
        }
        assert!(!asked, "no evidence for an impostor");
    }

    /// `https://127.0.0.1:PORT` of a TLS 1.3 server (a fresh P-256 key)
    /// that accepts connections in a thread.
    fn tls_server_with_fresh_key() -> String {
        let output = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=impostor",
                "-keyout",
                "/dev/stdout",
                "-out",
                "/dev/stdout",
            ])
            .output()
            .expect("openssl runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let pem = output.stdout;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pair.pem");
        std::fs::write(&path, &pem).expect("written");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let port = listener.local_addr().expect("address").port();
        drop(listener);
        let mut server = Command::new("openssl")
            .args(["s_server", "-quiet", "-tls1_3", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&path)
            .arg("-key")
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "s_server did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::spawn(move || {
            let _dir = dir;
            std::thread::sleep(Duration::from_secs(30));
            let _ = server.kill();
            let _ = server.wait();
        });
        format!("https://127.0.0.1:{port}")
    }

    #[test]
    fn protocol_errors_fail_without_retry() {
        let run = play(
            vec![Err(FetchError::Protocol("bad JWE".to_owned()))],
            Duration::from_secs(300),
        );
        let error = run.result.expect_err("failed");
        assert_eq!(error.phase(), AgentPhase::Failed);
        assert!(error.detail().contains("bad JWE"));
        assert!(run.slept.is_empty());
    }

    #[test]
    fn console_lines_stay_one_line() {
        assert_eq!(one_line("a\nb\r\tc"), "a b  c");
    }
}
