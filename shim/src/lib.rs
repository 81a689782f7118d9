//! # kybernate-shim
//!
//! `containerd-shim-kybernate-v1`, the containerd runtime v2 shim of Kybernate (runtime type
//! `io.containerd.kybernate.v1`). It runs containers with runc like containerd's runc shim — the whole
//! task API, stdio over FIFOs or a terminal, exit/OOM/exec events, and correct reaping as the child
//! subreaper — and checkpoints and restores them through `checkpoint-core`, one call per step.
//!
//! Layers, each importing only those below it (see `docs/architecture.md`):
//! 1. the edge — [`shim`] (containerd's shim lifecycle and the wiring), [`service`] (the task API over
//!    any [`task::Runtime`]), [`convert`] and [`stats`] (protobuf ⇄ domain), [`publisher`] (events to
//!    containerd);
//! 2. [`container`]: the runc-backed containers, one file per operation, in domain types ([`task`],
//!    [`events`]);
//! 3. the parts they use: [`spec`], [`annotations`], [`config`], [`runc`], [`gpu`], [`mount`], [`io`],
//!    [`process`], [`oom`], [`reaper`], [`logging`], [`error`].
//!
//! `main.rs` only hands [`shim::KybernateShim`] to `containerd-shim`. See `docs/shim.md` for
//! configuration and operation.

pub mod annotations;
pub mod config;
pub mod container;
pub mod convert;
pub mod error;
pub mod events;
pub mod gpu;
pub mod io;
pub mod keys;
pub mod logging;
pub mod mount;
pub mod oom;
pub mod process;
pub mod publisher;
pub mod reaper;
pub mod runc;
pub mod service;
pub mod shim;
pub mod sidecar;
pub mod spec;
pub mod stats;
pub mod task;

pub use config::ShimConfig;
pub use error::{Result, ShimError};
pub use shim::KybernateShim;

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.kybernate.v1";
