//! The controller's client-side limit on writes to the API server: a token bucket shared by
//! every write (status patches, conditions, Events), so a first start over 10,000 Services
//! sends its writes concurrently but no faster than the operator allows
//! (`--api-writes-per-second`, 0 for no limit).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Writes allowed per second by default: 10,000 first-start status writes take 20 s, and
/// the API server's own priority and fairness still applies.
pub const DEFAULT_WRITES_PER_SECOND: u32 = 500;
/// Writes in flight at once.
pub const CONCURRENT_WRITES: usize = 16;

#[derive(Debug)]
pub struct WriteLimit {
    /// Time between two writes; `None`: no limit.
    interval: Option<Duration>,
    /// Writes that may go at once after a quiet time: a tenth of a second's worth.
    burst: u32,
    /// The next write's slot; `None` before the first.
    next: Mutex<Option<Instant>>,
}

impl WriteLimit {
    pub fn new(per_second: u32) -> Self {
        Self {
            interval: (per_second > 0).then(|| Duration::from_secs(1) / per_second),
            burst: (per_second / 10).max(1),
            next: Mutex::new(None),
        }
    }

    /// Waits for this write's turn.
    pub async fn wait(&self) {
        if let Some(slot) = self.take(Instant::now()) {
            tokio::time::sleep_until(slot.into()).await;
        }
    }

    /// The slot of a write asked for at `now`: `None` to go at once, else when to go.
    fn take(&self, now: Instant) -> Option<Instant> {
        let interval = self.interval?;
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        // A quiet time earns at most `burst` writes that go at once.
        let earliest = now.checked_sub(interval * (self.burst - 1)).unwrap_or(now);
        let slot = next.map_or(earliest, |n| n.max(earliest));
        *next = Some(slot + interval);
        (slot > now).then_some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_goes_at_once_then_writes_are_spaced_by_the_rate_and_a_quiet_time_earns_a_burst_again(
    ) {
        let limit = WriteLimit::new(100); // 10 ms apart, bursts of 10
        let start = Instant::now() + Duration::from_secs(5);
        let slots: Vec<Option<Instant>> = (0..14).map(|_| limit.take(start)).collect();
        assert!(slots[..10].iter().all(Option::is_none), "{slots:?}");
        for (i, slot) in slots[10..].iter().enumerate() {
            assert_eq!(
                *slot,
                Some(start + Duration::from_millis(10 * (i as u64 + 1)))
            );
        }
        // 14 writes asked for at once have taken slots up to start + 40 ms; a second later
        // the bucket is full again.
        let later = start + Duration::from_secs(1);
        let again: Vec<Option<Instant>> = (0..11).map(|_| limit.take(later)).collect();
        assert!(again[..10].iter().all(Option::is_none));
        assert_eq!(again[10], Some(later + Duration::from_millis(10)));
    }

    #[test]
    fn zero_means_no_limit() {
        let limit = WriteLimit::new(0);
        let now = Instant::now();
        assert!((0..10_000).all(|_| limit.take(now).is_none()));
    }
}
