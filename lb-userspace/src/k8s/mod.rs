//! Kubernetes: the custom resources (`crd`), their validation into the shared config model
//! (`validity`), and what a Service asks for (`request`). All pure; the controller and the
//! speaker build on these.

pub mod crd;
pub mod request;
pub mod validity;
