//! Kybernate's Kubernetes device plugin: advertises each NVIDIA GPU of a node as one or more
//! *seats* (shares of one GPU) under an extended resource (default `kybernate.io/gpu-seat`).
//!
//! Library first: the binary only parses flags, sets up logging and wires these parts together.
//! - [`config`] / [`cli`]: TOML file and flags.
//! - [`inventory`]: GPU discovery and health ([`inventory::NvmlInventory`], [`inventory::FakeInventory`]).
//! - [`seats`]: the seat model, allocation and preferred allocation.
//! - [`service`]: the kubelet's `DevicePlugin` gRPC service.
//! - [`registration`]: registering with the kubelet over its Unix socket.
//! - [`daemon`]: serving, registering again after kubelet restarts, clean shutdown.
//! - [`metrics`]: Prometheus metrics.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod inventory;
pub mod metrics;
pub mod registration;
pub mod seats;
pub mod service;

pub use config::Config;
pub use daemon::{Daemon, DaemonError};
