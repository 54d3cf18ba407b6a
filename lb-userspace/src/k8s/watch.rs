//! Watches kept in reflector stores, shared by the controller and the speaker: every change
//! wakes the owner's loop, which then reads whole stores.

use std::{fmt::Debug, sync::Arc, time::Duration};

use futures::StreamExt;
use kube::{
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::{
        reflector::{self, Store},
        utils::Backoff,
        watcher, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::metallb;

/// Seconds a watch request lasts before it is made again: a connection that died without a
/// word (a frozen or partitioned API server) is noticed within this, plus kube's 5 s margin.
const WATCH_SECONDS: u32 = 10;

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

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
    store_of(api, (), notify)
}

/// [`store`] for a kind known at run time (`DynamicObject` with its `ApiResource`).
fn store_of<K>(api: Api<K>, dyntype: K::DynamicType, notify: &Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
{
    let kind = K::kind(&dyntype).to_string();
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let config = watcher::Config::default().timeout(WATCH_SECONDS);
    // The caches keep what Sluice reads: not the server-side-apply bookkeeping nor kubectl's
    // copy of the last applied object, which are most of an object's size in a real cluster.
    let trimmed = watcher(api, config).modify(|object: &mut K| {
        object.managed_fields_mut().clear();
        object.annotations_mut().remove(LAST_APPLIED);
    });
    let stream = reflector::reflector(writer, trimmed).backoff(QuickBackoff::default());
    let notify = notify.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => notify.notify_one(),
                Err(e) => warn!(kind = %kind, error = %e, "watchFailed"),
            }
        }
    });
    reader
}

/// Watches of MetalLB's objects (`metallb.io`) in one namespace: the kinds the API server
/// serves, found once at start (MetalLB's CRDs installed later need a restart).
pub struct MetallbStores {
    stores: Vec<(ApiResource, Store<DynamicObject>)>,
}

impl MetallbStores {
    /// Starts a watch per metallb.io kind the API server serves in `namespace` (BGPPeer:
    /// v1beta2, else v1beta1). `None` when it serves none of them.
    pub async fn start(client: &Client, namespace: &str, notify: &Arc<Notify>) -> Option<Self> {
        let mut stores = Vec::new();
        for (kind, plural, version) in metallb::KINDS {
            let versions: &[&str] = if kind == "BGPPeer" {
                &[version, "v1beta1"]
            } else {
                &[version]
            };
            for version in versions {
                let gvk = GroupVersionKind::gvk(metallb::GROUP, version, kind);
                let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), namespace, &resource);
                match api.list(&ListParams::default().limit(1)).await {
                    Err(kube::Error::Api(e)) if e.code == 404 => continue,
                    // Not allowed (RBAC from before this version): a watch would never sync
                    // and hold everything else up. Said once; the kind is not read.
                    Err(kube::Error::Api(e)) if e.code == 403 => {
                        warn!(kind, version, namespace, reason = %e.message, "metallbNotReadable: add list and watch on metallb.io to the RBAC (deploy/*/rbac.yaml) to read it");
                        break;
                    }
                    // Served (or the API server is away: the watch will retry).
                    _ => {
                        info!(kind, version, namespace, "metallbWatched");
                        let store = store_of(api, resource.clone(), notify);
                        stores.push((resource, store));
                        break;
                    }
                }
            }
        }
        if stores.is_empty() {
            info!(
                namespace,
                "metallbNotInstalled: no metallb.io kinds are served; reading sluice.dev objects only"
            );
            return None;
        }
        Some(Self { stores })
    }

    pub async fn wait_until_ready(&self) {
        for (_, store) in &self.stores {
            let _ = store.wait_until_ready().await;
        }
    }

    /// Every object, as JSON with its apiVersion and kind (list items may lack them), sorted
    /// by kind and name.
    pub fn objects(&self) -> Vec<serde_json::Value> {
        let mut all: Vec<(String, String, serde_json::Value)> = Vec::new();
        for (resource, store) in &self.stores {
            for o in store.state() {
                let Ok(mut value) = serde_json::to_value(&*o) else {
                    continue;
                };
                value["apiVersion"] = resource.api_version.clone().into();
                value["kind"] = resource.kind.clone().into();
                all.push((resource.kind.clone(), o.name_any(), value));
            }
        }
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all.into_iter().map(|(_, _, v)| v).collect()
    }
}

/// The store's objects, owned, sorted by name.
/// The store's objects by name, shared with it (not copied).
pub fn shared_sorted<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<Arc<K>> {
    let mut all = store.state();
    // Compared in place: no name is copied (10,000 Services and as many slices each pass).
    all.sort_by(|a, b| a.meta().name.cmp(&b.meta().name));
    all
}

/// The store's objects by name, copied.
pub fn sorted<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
    shared_sorted(store)
        .into_iter()
        .map(|o| (*o).clone())
        .collect()
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
