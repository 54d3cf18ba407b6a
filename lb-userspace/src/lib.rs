//! Sluice: a load balancer for bare-metal Kubernetes clusters and plain Linux hosts.
//!
//! One module per concern (see DESIGN.md): `config` is the model and its validation (pure),
//! `dataplane` is the only code that touches the kernel's BPF subsystem.

pub mod bfd;
pub mod bgp;
pub mod config;
pub mod dataplane;
pub mod election;
pub mod health;
pub mod ipam;
pub mod k8s;
pub mod l2;
pub mod maglev;
pub mod mesh;
pub mod metrics;
pub mod onlink;
pub mod signals;
pub mod sockopt;
pub mod standalone;
pub mod trace;
