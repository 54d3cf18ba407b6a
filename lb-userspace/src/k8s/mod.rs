//! Kubernetes: the custom resources (`crd`), their validation into the shared config model
//! (`validity`), what a Service asks for (`request`) and which IPs it gets (`allocate`).
//! All pure; the controller and the speaker build on these.

pub mod allocate;
pub mod crd;
pub mod request;
pub mod validity;
