//! Checkpoint and restore of a plain process tree, identified by the pid of its root, with CRIU.
//!
//! The tree must be a session of its own (e.g. started with `setsid`) unless
//! [`CheckpointOptions::shell_job`](crate::CheckpointOptions::shell_job) is set.

mod checkpoint;
mod restore;

pub(crate) use checkpoint::prepare_checkpoint;
pub use checkpoint::{checkpoint_process, PRE_DUMP_DIR};
pub use restore::restore_process;
