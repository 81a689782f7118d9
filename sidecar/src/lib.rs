//! Kybernate's sidecar: ships finished checkpoint bundles from the node checkpoint directory to a
//! store (a shared filesystem by default, or S3) as one streamed tar (optionally zstd), and fetches
//! them back — verified and safely extracted — for restore.
//!
//! - [`daemon`]: watch the checkpoint directory and ship every bundle whose `COMPLETE` appears.
//! - [`ship`]: ship one bundle and record it durably.
//! - [`archive`]: the streaming tar/zstd producer.
//! - [`crypt`]: encryption at rest of the archives (XChaCha20-Poly1305 STREAM) and its keys.
//! - [`store`]: the [`store::Store`] trait with [`store::FsStore`] and [`store::S3Store`].
//! - [`fetch`]: [`fetch_bundle`], the library entry of `kybernate-sidecar pull`, for
//!   `kybernate.io/restore-from` references (checkpoint-core's
//!   [`BundleRef`](checkpoint_core::reference::BundleRef)). The shim runs `pull` as a
//!   separate process, so the async runtime and the S3 client never live in the shim's memory.
//! - [`extract`]: extraction that never writes outside its destination.
//! - [`gc`]: per-container retention.

pub mod archive;
pub mod config;
pub mod crypt;
pub mod daemon;
pub mod error;
pub mod extract;
pub mod fetch;
mod fsutil;
pub mod gc;
mod key_id;
pub mod lazy;
pub mod metrics;
pub mod retry;
pub mod ship;
pub mod store;

pub use error::{Error, Result};
pub use fetch::{fetch_bundle, fetch_bundle_blocking, parse_reference, FetchOptions};

/// Exit status of `kybernate-sidecar pull --container` when the pod checkpoint does not cover the
/// container (the shim then starts it fresh, or fails it when `restore-policy: fail` says so).
pub const NOT_COVERED_EXIT: u8 = 3;
