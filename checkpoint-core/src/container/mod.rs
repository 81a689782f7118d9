//! A runc container and its bundle, in both directions: [`checkpoint_container_bundle`] takes the
//! GPU locks, dumps with runc and CRIU, captures the writable layer and metadata, and seals the
//! bundle; [`open_container_bundle`] verifies a bundle and checks this node (CPU, CRIU, GPUs) before
//! anything is created, [`RestorableBundle::apply_writable_layer`] re-applies its writable layer onto
//! the new rootfs, and [`restore_container_bundle`] runs `runc restore`, restores the GPU state and
//! unlocks it, taking the container down again if any of it fails.
//!
//! A containerd shim makes one call per step: checkpoint on stop and `ctr` checkpoints are one
//! [`checkpoint_container_bundle`] each; a restore is [`open_container_bundle`] at Create, then
//! [`RestorableBundle::apply_writable_layer`] once the rootfs is mounted, then
//! [`restore_container_bundle`] at Start.

mod checkpoint;
mod restore;

pub use checkpoint::{checkpoint_container_bundle, BundleReport, ConfigDump, ContainerCheckpoint};
pub use restore::{
    check_host, open_container_bundle, restore_container_bundle, OpenOptions, RestorableBundle, RestoreTarget,
    TenantCheck,
};
