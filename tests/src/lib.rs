//! Helpers shared by Kybernate's end-to-end tests, one module per concern. Everything is also
//! re-exported here, so a test can `use kybernate_tests::{...}` without naming the module.
//!
//! - [`process`]: subreaper, polling, killing and reaping, the test workload, `/proc` scans.
//! - [`images`]: busybox-static bundles and image archives (no registry), the counter workload.
//! - [`runc`]: containers run directly with runc.
//! - [`containerd`]: a private containerd with the Kybernate shim, driven with `ctr`.
//! - [`cri`]: the same with the CRI plugin, and a CRI client.
//! - [`s3`]: a real S3-compatible server (s3s-fs) on loopback.
//! - [`pki`]: CAs and certificates for the mutual-TLS tests.
//! - [`podman`]: Podman with private storage, the peer that writes foreign checkpoint archives.
//! - [`tools`]: required host tools, CRIU, commands with a timeout, the shim binary.
//! - [`gpu_fakes`]: a recording CUDA driver, a GPU inventory and a backend probe (no GPU on CI).

pub mod containerd;
pub mod cri;
pub mod gpu_fakes;
pub mod images;
pub mod keys;
pub mod pki;
pub mod podman;
pub mod process;
pub mod runc;
pub mod s3;
pub mod tools;

pub use containerd::{
    containerd_tool, Containerd, ContainerdOptions, BUSYBOX_IMAGE, CONTAINERD_BIN_ENV, KYBERNATE_RUNTIME,
};
pub use images::{
    busybox_bundle, busybox_oci_image, busybox_oci_image_running, read_counter, wait_counter_past, BUSYBOX,
    COUNTER_SCRIPT,
};
pub use podman::Podman;
pub use process::{
    alive, become_subreaper, kill_and_reap, pids_with_arg, reap_if_exited, spawn_workload, wait_for, zombie_children,
    WorkloadState,
};
pub use runc::RuncContainer;
pub use tools::{
    find_criu, kybernate_shim_binary, kybernate_sidecar_binary, require_tools, run_with_timeout, CmdOutput,
    KYBERNATE_SHIM, KYBERNATE_SIDECAR,
};
