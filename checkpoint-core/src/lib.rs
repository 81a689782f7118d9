//! # checkpoint-core
//!
//! Checkpoint and restore of live workloads for Kybernate: CRIU for process trees, runc for containers,
//! the CUDA checkpoint API for GPU state, and the self-describing checkpoint bundle.
//!
//! Modules, from the bottom up (no module imports one above it):
//! - [`trust`]: ed25519 keys and manifest signatures; [`bundle`]: the bundle format (layout, manifest,
//!   seal, verify) — no tools; [`tenant`]: whose a bundle is and the grants between tenants;
//!   [`reference`]: where a bundle is (node directory, filesystem store, S3); [`roots`]: where a node
//!   may restore from;
//! - [`criu`] and [`runc`]: the two tools, each with one client ([`Criu`], [`Runc`]) that spawns through
//!   the embedder's [`SpawnHook`];
//! - [`gpu`]: the CUDA checkpoint API, GPU discovery and compatibility, no containers;
//! - [`pod`]: pod checkpoints — which bundle each container of a pod restores;
//! - [`process`]: checkpoint/restore of a process tree with CRIU;
//! - [`container`]: a runc container and its bundle in both directions, GPU steps included.
//!
//! The library knows nothing about containerd, Kubernetes or object stores: it takes typed options and
//! paths. Every operation either succeeds and reports timings and sizes, or fails with an error that
//! names the object and the fix while the workload keeps running.
//!
//! ```no_run
//! use checkpoint_core::{checkpoint_process, restore_process, CheckpointOptions, Criu, RestoreOptions};
//! # fn main() -> Result<(), checkpoint_core::Error> {
//! let criu = Criu::from_path();
//! criu.probe()?; // version, `criu check`, optional kernel features
//! let opts = CheckpointOptions::default();
//! let report = checkpoint_process(&criu, 4242, "/tmp/images".as_ref(), &opts)?;
//! println!("froze for {:?}, wrote {} bytes", report.timings.frozen, report.image_bytes);
//! let restored = restore_process(&criu, "/tmp/images".as_ref(), &RestoreOptions::matching(&opts))?;
//! println!("running again as pid {}", restored.pid);
//! # Ok(()) }
//! ```

pub mod bundle;
pub mod container;
pub mod criu;
mod error;
mod exec;
mod fsutil;
pub mod gpu;
mod options;
pub mod pod;
pub mod process;
pub mod reference;
mod report;
pub mod rootfs;
pub mod roots;
pub mod runc;
pub mod tenant;
pub mod trust;

pub use container::{
    check_host, checkpoint_container_bundle, open_container_bundle, restore_container_bundle, BundleReport, ConfigDump,
    ContainerCheckpoint, LazyFill, OpenOptions, PageFeed, RestorableBundle, RestoreTarget, Restored, TenantCheck,
};
pub use criu::{Criu, CriuInfo, CriuVersion, Feature};
pub use error::{Error, GpuStep, Result, ToolFailure};
pub use exec::{pass_fd, SpawnHook, Spawner};
pub use options::{CgroupsMode, CheckpointOptions, CriuFlags, EmptyNamespace, RestoreOptions, DEFAULT_RESTORE_TIMEOUT};
pub use process::{checkpoint_process, restore_process};
pub use report::{CheckpointReport, CheckpointTimings, RestoreReport, RestoreTimings};
pub use runc::{checkpoint_container, restore_container, ChildStdio, ContainerRestore, Runc, SpawnOpts};
