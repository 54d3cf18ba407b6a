//! Watches kept in reflector stores, shared by the controller and the speaker: every change
//! wakes the owner's loop, which then reads whole stores.

use std::{fmt::Debug, sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    runtime::{
        reflector::{self, Store},
        utils::Backoff,
        watcher, WatchStreamExt,
    },
    Api, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::warn;

/// Seconds a watch request lasts before it is made again: a connection that died without a
/// word (a frozen or partitioned API server) is noticed within this, plus kube's 5 s margin.
const WATCH_SECONDS: u32 = 10;

/// Retries of a failed watch or list: 250 ms, then 500 ms, then every second, never more. When
/// the API server comes back after an outage the watches resume within a second; an expired
/// resource version (410) re-lists at once (kube's watcher), not after a long back-off.
#[derive(Debug, Clone, Default)]
pub struct QuickBackoff {
    failures: u32,
}

impl Iterator for QuickBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        Some(Duration::from_millis(match self.failures {
            1 => 250,
            2 => 500,
            _ => 1000,
        }))
    }
}

impl Backoff for QuickBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Starts a watch of `api` into a store (retrying quickly, see [`QuickBackoff`]); every event
/// wakes `notify`. While the API server cannot be reached the store keeps the last objects.
pub fn store<K>(api: Api<K>, notify: &Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().timeout(WATCH_SECONDS);
    let stream =
        reflector::reflector(writer, watcher(api, config)).backoff(QuickBackoff::default());
    let notify = notify.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => notify.notify_one(),
                Err(e) => warn!(kind = K::kind(&()).as_ref(), error = %e, "watchFailed"),
            }
        }
    });
    reader
}

/// The store's objects, owned, sorted by name.
pub fn sorted<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
    let mut all: Vec<K> = store.state().iter().map(|o| (**o).clone()).collect();
    all.sort_by_key(|o| o.name_any());
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_retries_wait_at_most_a_second_and_start_over_after_a_success() {
        let mut b = QuickBackoff::default();
        let first: Vec<u64> = b.by_ref().take(5).map(|d| d.as_millis() as u64).collect();
        assert_eq!(first, [250, 500, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(250)));
    }
}
