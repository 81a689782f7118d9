//! A runc container and its bundle, in both directions: [`checkpoint_container_bundle`] takes the
//! GPU locks, dumps with runc and CRIU, captures the writable layer and metadata, and seals the
//! bundle; [`open_container_bundle`] verifies a bundle and checks this node (CPU, CRIU, GPUs) before
//! anything is created, [`RestorableBundle::apply_writable_layer`] re-applies its writable layer onto
//! the new rootfs, [`RestorableBundle::fit_spec`] fits the new container's spec to the
//! checkpoint (the mounts it expects), and [`restore_container_bundle`] runs `runc restore`, restores the GPU state and
//! unlocks it, taking the container down again if any of it fails.
//!
//! A containerd shim makes one call per step: checkpoint on stop and `ctr` checkpoints are one
//! [`checkpoint_container_bundle`] each; a restore is [`open_container_bundle`] at Create, then
//! [`RestorableBundle::apply_writable_layer`] and [`RestorableBundle::fit_spec`] once the
//! rootfs is mounted, then
//! [`restore_container_bundle`] at Start. A full restore hashes the page images while CRIU restores
//! them and holds the restored tasks until they match ([`restore_gate`]).

mod checkpoint;
mod criu_config;
mod mounts;
mod restore;
pub mod restore_gate;

pub use checkpoint::{checkpoint_container_bundle, BundleReport, ConfigDump, ContainerCheckpoint};
pub use criu_config::CRIU_CONFIG_ANNOTATION;
pub use mounts::{MappedMount, DEVSHM_TAR, PLACEHOLDER_DIR};
pub use restore::{
    check_host, open_container_bundle, restore_container_bundle, LazyFill, OpenOptions, PageFeed, RestorableBundle,
    RestoreTarget, Restored, TenantCheck, FOREIGN_CRIU_CONFIG,
};
