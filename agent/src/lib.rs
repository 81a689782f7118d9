//! # kybernate-agent
//!
//! Kybernate's node agent. It serves `kybernate.agent.v1.Agent` (`kybernate-proto`) on a Unix socket
//! (`/run/kybernate/agent.sock`, mode 0600) for the operator and the node's admins, and optionally on
//! TCP with mutual TLS ([`tls`]) for an operator off the node:
//!
//! - **Checkpoint** a running container, named by pod (CRI labels in containerd namespace `k8s.io`)
//!   or by containerd namespace and id: [`resolve`] finds it with containerd's gRPC API and checks it
//!   is Kybernate's with a running task; [`shim`] asks its shim for a node bundle under the shim
//!   config's `checkpoint_dir` (the same bundle a checkpoint on stop writes), one checkpoint per
//!   container at a time; [`push`] hands it to `kybernate-sidecar push` when a store is given;
//! - **List** and **Delete** the node's bundles ([`bundles`]), never outside `checkpoint_dir`;
//! - **Status** of the node, and a stream of checkpoint **Events**.
//!
//! [`service`] is the service, [`server`] serves it on the socket, [`tls`] on TCP (and connects to
//! it, for the operator), [`metrics`] counts checkpoints for Prometheus, [`error`] maps failures to
//! gRPC codes. See `docs/agent.md`.

pub mod bundles;
pub mod error;
pub mod metrics;
pub mod push;
pub mod resolve;
pub mod server;
pub mod service;
pub mod shim;
pub mod tls;

pub use error::{AgentError, Result, TlsError};
pub use service::{AgentConfig, AgentService};
