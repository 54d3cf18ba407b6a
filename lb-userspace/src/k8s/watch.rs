//! Watches kept in reflector stores, shared by the controller and the speaker: every change
//! wakes the owner's loop, which then reads whole stores.

use std::{fmt::Debug, sync::Arc};

use futures::StreamExt;
use kube::{
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Api, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::warn;

/// Starts a watch of `api` into a store (retrying with backoff); every event wakes `notify`.
pub fn store<K>(api: Api<K>, notify: &Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
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
