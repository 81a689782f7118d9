//! # kybernate-operator
//!
//! Kybernate's cluster layer (see `docs/kubernetes.md`). So far: the mutating admission webhook. Its
//! decision ([`admission`]) puts the pods a [`kybernate_api::CheckpointPolicy`] selects on Kybernate
//! (`runtimeClassName: kybernate`, checkpoint on stop) and, when its store holds a pod checkpoint of
//! the same pod identity, has the pod resume from it (`kybernate.io/restore-from`, with
//! `restore-policy: fallback-fresh`). The webhook never blocks a pod: every failure admits it as it is
//! or without the restore, with a warning. The binary `kybernate-operator` serves it over HTTPS
//! ([`webhook_server`]).
//!
//! The [`checkpoint_controller`] carries out `Checkpoint` resources through the node agents
//! ([`agents`]). The [`policy_controller`] keeps each CheckpointPolicy's pods annotated, creates its
//! periodic Checkpoints and applies its retention ([`retention`]) to the store and the nodes. The
//! [`restore_controller`] makes each `Restore` a new pod, from its template, that the shim restores
//! from the bundle or pod checkpoint it names. They report through [`status`] (conditions, status
//! writes, Events) and retry with a [`backoff`]. [`leader`] elects, over a Lease, the one replica
//! that runs the controllers.
//!
//! Modules: [`selector`] (label selectors), [`identity`] (which pod checkpoints a pod may resume
//! from), [`admission`] (the AdmissionReview answer), [`store_index`] (the store listing it asks),
//! [`policies`] (where the policies come from: the API server through a reflector), [`webhook_server`]
//! (the HTTPS server), [`metrics`] (its Prometheus counters).

pub mod admission;
pub mod agents;
pub mod backoff;
pub mod checkpoint_controller;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod policies;
pub mod policy_controller;
pub mod restore_controller;
pub mod retention;
pub mod selector;
pub mod status;
pub mod store_index;
pub mod webhook_server;
