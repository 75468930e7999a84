//! The pause between failed attempts, for everything that retries: the inventory refresher,
//! the ECS source asking its agent again, the Mackerel sender.
//!
//! Exponential, `min` doubling up to `max`, without jitter: the platform APIs are node-local,
//! so nodes cannot stampede one server, and Mackerel says when to come back (Retry-After).
//!
//! Generic over the clock (`std::time::Instant` by default, `tokio::time::Instant` for code
//! tested with paused time): callers pass `now`, so tests can use made-up instants.

use std::{ops::Add, time::Duration};

/// Exponential backoff with a cap, and when the current pause ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff<I = std::time::Instant> {
    min: Duration,
    max: Duration,
    next: Duration,
    until: Option<I>,
}

impl<I> Backoff<I> {
    /// `min` doubling up to `max`; a `min` above `max` is `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.min(max);
        Self {
            min,
            max,
            next: min,
            until: None,
        }
    }

    /// The delay before the next retry; each call doubles the following one, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to `min`, with no pause, after a success.
    pub fn succeeded(&mut self) {
        self.next = self.min;
        self.until = None;
    }
}

impl<I: Copy + Ord + Add<Duration, Output = I>> Backoff<I> {
    /// True when an attempt may be made at `now`.
    pub fn ready(&self, now: I) -> bool {
        self.until.is_none_or(|t| now >= t)
    }

    /// When the current pause ends; None unless the last attempt failed.
    pub fn until(&self) -> Option<I> {
        self.until
    }

    /// A failure at `now`: pauses for `retry_after` if the server gave one (the backoff does
    /// not grow then), else for the next step of the backoff. Returns the pause.
    pub fn failed(&mut self, now: I, retry_after: Option<Duration>) -> Duration {
        let wait = retry_after.unwrap_or_else(|| self.next_delay());
        self.until = Some(now + wait);
        wait
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b: Backoff = Backoff::new(S, 8 * S);
        let delays: Vec<u64> = (0..6).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
        b.succeeded();
        assert_eq!(b.next_delay(), S);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_honours_retry_after() {
        let t0 = Instant::now();
        let mut bo = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        assert!(bo.ready(t0));
        let waits: Vec<_> = (0..5).map(|_| bo.failed(t0, None).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5]);
        assert!(!bo.ready(t0 + Duration::from_secs(4)));
        assert!(bo.ready(t0 + Duration::from_secs(5)));
        assert_eq!(
            bo.failed(t0, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(bo.until(), Some(t0 + Duration::from_secs(30)));
        bo.succeeded();
        assert!(bo.ready(t0));
        assert_eq!(bo.failed(t0, None), Duration::from_secs(1));
    }

    #[test]
    fn a_minimum_above_the_cap_is_the_cap() {
        let mut b: Backoff = Backoff::new(5 * S, S);
        assert_eq!(b.next_delay(), S);
        assert_eq!(b.next_delay(), S);
    }
}
