//! Events on Kubernetes objects, published in the background by one task per process: a
//! few at a time, in order of arrival, under a write limit, so that a pass that decides
//! thousands of Events (a first start over 10,000 Services) neither waits for them nor floods
//! the API server with them. Both the controller and the speaker send theirs here.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use tokio::sync::mpsc;
use tracing::warn;

use super::limit::{WriteLimit, CONCURRENT_WRITES};

/// Where a pass sends its Events.
pub type EventSender = mpsc::UnboundedSender<(Event, ObjectReference)>;

/// Starts the publishing task (on the current Tokio runtime); each Event gets `timeout`.
pub fn publisher(recorder: Recorder, limit: WriteLimit, timeout: Duration) -> EventSender {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Event, ObjectReference)>();
    tokio::spawn(async move {
        let (recorder, limit) = (&recorder, &limit);
        futures::stream::poll_fn(|cx| rx.poll_recv(cx))
            .map(|(event, reference)| async move {
                limit.wait().await;
                let object = reference.name.clone().unwrap_or_default();
                match tokio::time::timeout(timeout, recorder.publish(&event, &reference)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        warn!(%object, reason = %event.reason, error = %e, "eventRecordFailed")
                    }
                    Err(_) => warn!(
                        %object,
                        reason = %event.reason,
                        "eventRecordFailed: the API server did not answer"
                    ),
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .for_each(|()| async {})
            .await;
    });
    tx
}
