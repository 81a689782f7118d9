//! `containerd-shim-kybernate-v1`: started by containerd for runtime `io.containerd.kybernate.v1`.

use containerd_shim::Config;
use kybernate_shim::{KybernateShim, RUNTIME_ID};

fn main() {
    // CRIU runs this binary as its action script during a restore (checkpoint-core's restore gate).
    if let Some(code) = checkpoint_core::container::restore_gate::action_script_main() {
        std::process::exit(code);
    }
    let config = Config { no_setup_logger: true, no_reaper: true, ..Config::default() };
    containerd_shim::run::<KybernateShim>(RUNTIME_ID, Some(config));
}
