//! When to try an unreachable key broker again: exponential backoff
//! (0.5 s doubling up to 8 s) within an overall deadline.
//!
//! This module only computes waits and sleeps through a [`Clock`]; it never
//! decides what is worth retrying (the unlock flow does: only an
//! unreachable broker, never a refusal).

use std::time::{Duration, Instant};

/// The first wait after a failed attempt.
pub const FIRST_WAIT: Duration = Duration::from_millis(500);

/// The longest wait between two attempts.
pub const MAX_WAIT: Duration = Duration::from_secs(8);

/// Waits that double from a first one up to a ceiling, forever.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Waits `first`, `2 * first`, ... up to `max`, then `max` forever.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            next: first.min(max),
            max,
        }
    }
}

impl Default for Backoff {
    /// [`FIRST_WAIT`] doubling up to [`MAX_WAIT`].
    fn default() -> Self {
        Backoff::new(FIRST_WAIT, MAX_WAIT)
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next;
        self.next = wait.saturating_mul(2).min(self.max);
        Some(wait)
    }
}

/// Time as the retries see it: real in the agent, simulated in tests.
pub trait Clock {
    /// Now.
    fn now(&self) -> Instant;
    /// Waits `duration`.
    fn sleep(&mut self, duration: Duration);
}

/// The system's monotonic clock and `thread::sleep`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// The retries of one operation: a [`Backoff`] cut off at a deadline.
#[derive(Debug)]
pub struct Retries<C> {
    backoff: Backoff,
    started: Instant,
    deadline: Instant,
    clock: C,
}

impl<C: Clock> Retries<C> {
    /// Retries that end `timeout` from now.
    pub fn new(timeout: Duration, backoff: Backoff, clock: C) -> Self {
        let started = clock.now();
        Retries {
            backoff,
            started,
            deadline: started + timeout,
            clock,
        }
    }

    /// How long to wait after a failed attempt before the next: the next
    /// backoff step, shortened to end at the deadline; `None` when the
    /// deadline has passed (give up).
    pub fn next_wait(&mut self) -> Option<Duration> {
        let left = self.deadline.checked_duration_since(self.clock.now())?;
        if left.is_zero() {
            return None;
        }
        self.backoff.next().map(|wait| wait.min(left))
    }

    /// Waits `duration` on this clock.
    pub fn sleep(&mut self, duration: Duration) {
        self.clock.sleep(duration);
    }

    /// Time since these retries began.
    pub fn elapsed(&self) -> Duration {
        self.clock.now().saturating_duration_since(self.started)
    }

    /// Time left before the deadline (zero once past).
    pub fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(self.clock.now())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A clock that only moves when slept on (or told to).
    #[derive(Debug)]
    pub(crate) struct FakeClock {
        pub(crate) now: Instant,
        pub(crate) slept: Vec<Duration>,
    }

    impl FakeClock {
        pub(crate) fn new() -> Self {
            FakeClock {
                now: Instant::now(),
                slept: Vec::new(),
            }
        }
    }

    impl Clock for &mut FakeClock {
        fn now(&self) -> Instant {
            self.now
        }

        fn sleep(&mut self, duration: Duration) {
            self.now += duration;
            self.slept.push(duration);
        }
    }

    fn millis(values: &[u64]) -> Vec<Duration> {
        values.iter().copied().map(Duration::from_millis).collect()
    }

    #[test]
    fn doubles_from_half_a_second_up_to_eight() {
        let waits: Vec<Duration> = Backoff::default().take(8).collect();
        assert_eq!(
            waits,
            millis(&[500, 1000, 2000, 4000, 8000, 8000, 8000, 8000])
        );
        let capped: Vec<Duration> = Backoff::new(Duration::from_secs(10), MAX_WAIT)
            .take(2)
            .collect();
        assert_eq!(capped, millis(&[8000, 8000]));
    }

    #[test]
    fn the_last_wait_ends_at_the_deadline_then_it_gives_up() {
        let mut clock = FakeClock::new();
        let mut retries = Retries::new(Duration::from_secs(10), Backoff::default(), &mut clock);
        let mut waits = Vec::new();
        while let Some(wait) = retries.next_wait() {
            waits.push(wait);
            retries.sleep(wait);
        }
        assert_eq!(waits, millis(&[500, 1000, 2000, 4000, 2500]));
        assert_eq!(retries.elapsed(), Duration::from_secs(10));
        assert_eq!(retries.left(), Duration::ZERO);
        assert_eq!(
            clock.slept.iter().sum::<Duration>(),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn time_spent_in_attempts_counts_against_the_deadline() {
        let mut clock = FakeClock::new();
        let start = clock.now;
        let mut retries = Retries::new(Duration::from_secs(3), Backoff::default(), &mut clock);
        assert_eq!(retries.next_wait(), Some(Duration::from_millis(500)));
        // An attempt that hangs until its own timeout.
        retries.clock.now = start + Duration::from_secs(5);
        assert_eq!(retries.next_wait(), None);
    }
}
