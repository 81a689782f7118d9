//! The containers a shim serves, with runc: one file per operation (`create.rs`, `start.rs`,
//! `exec.rs`, `kill.rs`, `stop.rs` (with `diskless.rs`), `checkpoint.rs`, `control.rs`, `delete.rs`) on the [`Container`]
//! of `state.rs`, restore-from resolution in `restore_from.rs`, the pod checkpoints of checkpoints on
//! stop in `pod_checkpoint.rs`, and the [`RuncRuntime`] that plugs
//! them into the task service (`runtime.rs`). Nothing here sees protobuf.

mod checkpoint;
mod control;
mod create;
mod delete;
mod diskless;
mod exec;
mod kill;
mod pod_checkpoint;
mod restore_from;
mod runtime;
mod start;
mod state;
mod stop;

pub use create::{CreateContext, Prepared, CONSOLE_TIMEOUT, INIT_PID_FILE};
pub use pod_checkpoint::PodCheckpoints;
pub use runtime::RuncRuntime;
pub use state::{Container, CreateFlags, Lifecycle, Processes};
pub use stop::is_stop_signal;
