//! # kybernate-shim
//!
//! `containerd-shim-kybernate-v1`, the containerd runtime v2 shim of Kybernate (runtime type
//! `io.containerd.kybernate.v1`). It runs containers with runc like containerd's runc shim — the whole
//! task API, stdio over FIFOs or a terminal, exit/OOM/exec events, and correct reaping as the child
//! subreaper — and checkpoints and restores them through `checkpoint-core`:
//!
//! - Checkpoint (`ctr c checkpoint --task`, `ctr t checkpoint`) writes the CRIU image into the path
//!   containerd names, plus Kybernate's manifest (`kybernate.json`: versions, identity, report, hashes),
//!   which travels with containerd's checkpoint image.
//! - Create with a checkpoint (`ctr c restore --live`, `ctr run --checkpoint`) verifies the image; Start
//!   then runs `runc restore --detach` with stdio wired as for a fresh start.
//!
//! The library holds everything; `main.rs` only hands [`service::KybernateShim`] to `containerd-shim`.
//! See `docs/shim.md` for configuration and operation.

pub mod annotations;
pub mod checkpoint;
pub mod config;
pub mod container;
pub mod create;
pub mod delete;
pub mod error;
pub mod events;
pub mod exec;
pub mod gpu;
pub mod io;
pub mod logging;
pub mod mount;
pub mod oom;
pub mod process;
pub mod reaper;
pub mod restore_from;
pub mod runc;
pub mod service;
pub mod settings;
pub mod start;
pub mod stats;
pub mod stop;

pub use config::ShimConfig;
pub use error::{Result, ShimError};
pub use service::{KybernateShim, TaskService, RUNTIME_ID};
