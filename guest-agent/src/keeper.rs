//! Keeping the lease of a single-instance disk key (`hsev-agent
//! keep-lease`), and fencing the guest when it cannot.
//!
//! The key broker gives a single-instance key to one launch at a time: the
//! one that holds its lease. Another launch of the same VM (an HA restart
//! elsewhere, after this host was cut off) gets the key only once this
//! lease lapsed, so this guest must have stopped writing by then. The
//! timing argument, enforced here:
//!
//! - a renewal sent at `s` on this guest's monotonic clock is answered with
//!   a lease of `L` seconds, which the broker started when it received the
//!   request, no earlier than `s`: it lapses no earlier than `s + L`;
//! - the watchdog fences the guest at `s + L - margin`, with margin
//!   [`fence_margin`] = max(2 s, L / 4): the guest is off before the broker
//!   could give the key to another launch, as long as unmounting and
//!   powering off take less than the margin and the two clocks' rates
//!   differ by less than margin / L (25 %; real clocks differ by parts per
//!   million);
//! - the watchdog runs on its own thread: a renewal stuck in the network
//!   does not hold it back;
//! - a renewal is sent every L / 3, and again every second after a failed
//!   one, so one or two lost renewals do not fence a healthy guest;
//! - a refusal (another launch took over, the tenant ended the lease or
//!   changed the release policy so that this guest no longer passes) fences
//!   at once.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hsev_attestation::kbs::client::Lease;

use crate::disk::MAPPED_NAME;
use crate::say;
use crate::unlock::{EvidenceFn, FetchError, KbsBroker};

/// The console line a fenced guest prints before it powers off.
pub const FENCED_MARKER: &str = "HSEV-FENCED";

/// The most each tidy step of the fence (unmount, close the mapping) may
/// take before the guest powers off regardless.
const FENCE_STEP_LIMIT: Duration = Duration::from_millis(500);

/// How long before the earliest possible end of the broker's lease the
/// guest fences itself.
pub fn fence_margin(lease: Duration) -> Duration {
    (lease / 4).max(Duration::from_secs(2))
}

/// When to fence, given the lease a request sent at `lease.requested_at`
/// got.
pub fn fence_time(lease: &Lease) -> Instant {
    let length = lease.duration();
    lease.requested_at + length.saturating_sub(fence_margin(length))
}

/// Pause after a failed renewal (after a good one: a third of the lease).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The fence: stops the guest (in a real guest, it never returns).
pub trait Fence: Send {
    /// Stops the guest, for `reason`.
    fn fence(&mut self, reason: &str);
}

/// Renews the lease.
pub trait Renew {
    /// One renewal with fresh evidence.
    fn renew(&mut self, evidence: &mut EvidenceFn<'_>) -> Result<Lease, FetchError>;
}

/// The watchdog's state: when it fences, or why it already must.
#[derive(Debug)]
struct Deadline {
    fence_at: Instant,
    tripped: Option<String>,
    fenced: bool,
}

/// The guest's fence: unmounts the data disk and closes its mapping (each
/// given at most [`FENCE_STEP_LIMIT`], so that a hung disk cannot hold it
/// back), then powers off at once, as a hardware watchdog would.
#[derive(Debug)]
pub struct GuestFence {
    /// Where the data disk is mounted.
    pub mount: PathBuf,
}

impl Fence for GuestFence {
    fn fence(&mut self, reason: &str) {
        println!("{FENCED_MARKER} {}", reason.replace(['\n', '\r'], " "));
        run_bounded(Command::new("umount").arg(&self.mount));
        run_bounded(Command::new("cryptsetup").args(["close", MAPPED_NAME]));
        // `poweroff -f` stops the machine without asking init; should it
        // fail, the kernel's own way.
        let _ = Command::new("poweroff").arg("-f").status();
        let _ = std::fs::write("/proc/sysrq-trigger", "o");
    }
}

/// Runs `command` for at most [`FENCE_STEP_LIMIT`].
fn run_bounded(command: &mut Command) {
    let Ok(mut child) = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return;
    };
    let deadline = Instant::now() + FENCE_STEP_LIMIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
}

impl Renew for KbsBroker {
    fn renew(&mut self, evidence: &mut EvidenceFn<'_>) -> Result<Lease, FetchError> {
        self.renew_lease(evidence)
    }
}

/// Fences when the deadline passes unless it is pushed back first.
#[derive(Debug)]
struct Watchdog {
    state: Mutex<Deadline>,
    changed: Condvar,
}

impl Watchdog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Deadline> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push_back(&self, to: Instant) {
        let mut state = self.lock();
        if to > state.fence_at {
            state.fence_at = to;
        }
    }

    fn trip(&self, reason: String) {
        self.lock().tripped.get_or_insert(reason);
        self.changed.notify_all();
    }

    fn fenced(&self) -> bool {
        self.lock().fenced
    }

    /// Waits for the deadline or a trip; answers why it fences.
    fn wait(&self) -> String {
        let mut state = self.lock();
        loop {
            if let Some(reason) = state.tripped.clone() {
                return reason;
            }
            let now = Instant::now();
            if now >= state.fence_at {
                return "the lease could not be renewed in time (the key broker is unreachable): \
                        another launch may soon be given the key"
                    .to_owned();
            }
            let wait = state.fence_at - now;
            state = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

/// Keeps the lease the unlock got (`lease` long, to be fenced at
/// `fence_at` unless renewed) alive with `renewer` and evidence from
/// `evidence`, until the watchdog fences with `fence`; answers why it
/// fenced. In a guest the fence powers off and this never returns.
pub fn keep(
    fence_at: Instant,
    lease: Duration,
    renewer: &mut dyn Renew,
    evidence: &mut EvidenceFn<'_>,
    fence: Box<dyn Fence>,
) -> String {
    let watchdog = Arc::new(Watchdog {
        state: Mutex::new(Deadline {
            fence_at,
            tripped: None,
            fenced: false,
        }),
        changed: Condvar::new(),
    });
    let guard = Arc::clone(&watchdog);
    let fencer = std::thread::spawn(move || {
        let mut fence = fence;
        let reason = guard.wait();
        say(&format!("FENCING: {reason}"));
        fence.fence(&reason);
        guard.lock().fenced = true;
        reason
    });
    let mut interval = lease / 3;
    let mut failing = false;
    while !watchdog.fenced() {
        std::thread::sleep(interval);
        if watchdog.fenced() {
            break;
        }
        match renewer.renew(evidence) {
            Ok(lease) => {
                watchdog.push_back(fence_time(&lease));
                if failing {
                    say(&format!(
                        "lease of {} renewed again, until {}",
                        lease.grant.resource, lease.grant.expires_at
                    ));
                }
                failing = false;
                interval = lease.duration() / 3;
            }
            Err(FetchError::Unreachable(reason) | FetchError::Protocol(reason)) => {
                say(&format!("cannot renew the lease: {reason}; retrying"));
                failing = true;
                interval = RETRY_AFTER_FAILURE;
            }
            Err(refused) => {
                watchdog.trip(format!("the key broker refused the lease: {refused}"));
                break;
            }
        }
    }
    fencer
        .join()
        .unwrap_or_else(|_| "the fence panicked".to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hsev_attestation::kbs::protocol::LeaseGrant;

    use super::*;

    fn lease(seconds: u32, requested_at: Instant) -> Lease {
        Lease {
            grant: LeaseGrant {
                resource: "alice/disk-key/vm-1".into(),
                report_id: "00".repeat(32),
                lease_seconds: seconds,
                expires_at: "2026-01-01T00:00:00Z".into(),
            },
            requested_at,
        }
    }

    /// Records when and why it fenced.
    struct Recorder(Arc<Mutex<Option<(Instant, String)>>>);

    impl Fence for Recorder {
        fn fence(&mut self, reason: &str) {
            *self.0.lock().expect("lock") = Some((Instant::now(), reason.to_owned()));
        }
    }

    /// Answers renewals as `answer` says, counting them.
    struct Broker<F: FnMut(usize) -> Result<Lease, FetchError>> {
        answer: F,
        calls: Arc<AtomicUsize>,
    }

    impl<F: FnMut(usize) -> Result<Lease, FetchError>> Renew for Broker<F> {
        fn renew(&mut self, evidence: &mut EvidenceFn<'_>) -> Result<Lease, FetchError> {
            evidence(&[0; 64]).map_err(FetchError::Protocol)?;
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            (self.answer)(call)
        }
    }

    fn run(
        first: &Lease,
        answer: impl FnMut(usize) -> Result<Lease, FetchError>,
    ) -> (Option<(Instant, String)>, usize) {
        let fenced = Arc::new(Mutex::new(None));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut broker = Broker {
            answer,
            calls: Arc::clone(&calls),
        };
        keep(
            fence_time(first),
            first.duration(),
            &mut broker,
            &mut |_| Ok(serde_json::json!({})),
            Box::new(Recorder(Arc::clone(&fenced))),
        );
        let fenced = fenced.lock().expect("lock").clone();
        (fenced, calls.load(Ordering::SeqCst))
    }

    #[test]
    fn the_margin_is_a_quarter_of_the_lease_and_at_least_two_seconds() {
        let seconds = Duration::from_secs;
        assert_eq!(fence_margin(seconds(40)), seconds(10));
        assert_eq!(fence_margin(seconds(6)), seconds(2));
        let start = Instant::now();
        assert_eq!(fence_time(&lease(40, start)), start + seconds(30));
    }

    #[test]
    fn renewals_keep_the_guest_up_and_a_silent_broker_fences_it_before_its_lease_lapses() {
        let start = Instant::now();
        let first = lease(6, start);
        // Two renewals answered, then none: the broker's last lease
        // started no earlier than the last answered request was sent.
        let last_sent = Arc::new(Mutex::new(start));
        let noted = Arc::clone(&last_sent);
        let (fenced, calls) = run(&first, move |call| {
            if call < 2 {
                let now = Instant::now();
                *noted.lock().expect("lock") = now;
                Ok(lease(6, now))
            } else {
                Err(FetchError::Unreachable("connection refused".into()))
            }
        });
        let (at, reason) = fenced.expect("fenced");
        let lapses = *last_sent.lock().expect("lock") + Duration::from_secs(6);
        assert!(
            at < lapses,
            "fenced {:?} after the lease lapsed",
            at - lapses
        );
        assert!(
            at + Duration::from_millis(2200) >= lapses,
            "fenced {:?} before the lease lapsed: too early",
            lapses - at
        );
        assert!(at > start + Duration::from_secs(6), "renewals held it up");
        assert!(reason.contains("could not be renewed in time"), "{reason}");
        assert!(calls > 3, "retried after the first failure ({calls})");
    }

    #[test]
    fn a_refusal_fences_at_once() {
        let start = Instant::now();
        let (fenced, calls) = run(&lease(6, start), |_| {
            Err(FetchError::Refused {
                status: 401,
                error_type: "PolicyDeny".into(),
                detail: "this instance held alice/disk-key/vm-1 and was superseded".into(),
            })
        });
        let (at, reason) = fenced.expect("fenced");
        // The first renewal is due after a third of the lease, 2 s; its
        // refusal fences then, not 2 s before the lease's end.
        assert!(at < start + Duration::from_millis(2500), "{:?}", at - start);
        assert!(reason.contains("superseded"), "{reason}");
        assert_eq!(calls, 1);
    }
}
