//! Kubernetes: the custom resources (`crd`) and their validation into the shared config model
//! (`validity`). The controller and the speaker build on these.

pub mod crd;
pub mod validity;
