//! # kybernate-operator
//!
//! Kybernate's cluster layer (see `docs/kubernetes.md`). So far: the mutating admission webhook's
//! decision ([`admission`]), which puts the pods a [`kybernate_api::CheckpointPolicy`] selects on
//! Kybernate (`runtimeClassName: kybernate`, checkpoint on stop) and, when its store holds a pod
//! checkpoint of the same pod identity, has the pod resume from it (`kybernate.io/restore-from`, with
//! `restore-policy: fallback-fresh`). The webhook never blocks a pod: every failure admits it as it is
//! or without the restore, with a warning.
//!
//! Modules: [`selector`] (label selectors), [`identity`] (which pod checkpoints a pod may resume
//! from), [`admission`] (the AdmissionReview answer), [`store_index`] (the store listing it asks).

pub mod admission;
pub mod identity;
pub mod selector;
pub mod store_index;
