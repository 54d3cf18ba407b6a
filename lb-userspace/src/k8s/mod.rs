//! Kubernetes: the custom resources (`crd`), their validation into the shared config model
//! (`validity`), what a Service asks for (`request`), which IPs it gets (`allocate`) and the
//! controller's whole decision (`reconcile`); `manifests` reads them from YAML files;
//! `lease` decides leader election.
//! All pure; the controller and the speaker build on these.

pub mod allocate;
pub mod announce;
pub mod controller;
pub mod crd;
pub mod events;
pub mod lease;
pub mod limit;
pub mod liveness;
pub mod manifests;
pub mod metallb;
pub mod migrate;
pub mod reconcile;
pub mod request;
pub mod shared;
pub mod speaker;
pub mod validity;
pub mod watch;
