//! Whether a peer (the master, hsevd) answers, said once when it stops and
//! once when it is back, never once per pass; and how long to wait before
//! trying again: the pass interval, doubled at each failure in a row up to
//! a minute.

use std::time::{Duration, Instant};

/// The longest wait between two tries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A change worth saying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It just stopped answering.
    WentAway,
    /// It answers again after this long.
    CameBack(Duration),
}

/// One peer's availability.
#[derive(Debug, Default)]
pub struct Availability {
    down_since: Option<Instant>,
    failures: u32,
}

impl Availability {
    /// A failed call; `Some(WentAway)` the first time in a row.
    pub fn failed(&mut self) -> Option<Change> {
        self.failures = self.failures.saturating_add(1);
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            return Some(Change::WentAway);
        }
        None
    }

    /// A call that worked; `Some(CameBack)` after failures.
    pub fn succeeded(&mut self) -> Option<Change> {
        self.failures = 0;
        self.down_since
            .take()
            .map(|since| Change::CameBack(since.elapsed()))
    }

    /// How long to wait before the next try, from the pass `interval`.
    pub fn backoff(&self, interval: Duration) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(16);
        interval
            .saturating_mul(1u32 << doublings)
            .min(MAX_BACKOFF.max(interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_said_once_and_backs_off() {
        let mut peer = Availability::default();
        let interval = Duration::from_secs(2);
        assert_eq!(peer.backoff(interval), interval);
        assert_eq!(peer.failed(), Some(Change::WentAway));
        assert_eq!(peer.backoff(interval), interval);
        assert_eq!(peer.failed(), None);
        assert_eq!(peer.backoff(interval), Duration::from_secs(4));
        for _ in 0..20 {
            assert_eq!(peer.failed(), None);
        }
        assert_eq!(peer.backoff(interval), MAX_BACKOFF);
        assert!(matches!(peer.succeeded(), Some(Change::CameBack(_))));
        assert_eq!(peer.succeeded(), None);
        assert_eq!(peer.backoff(interval), interval);
    }
}
