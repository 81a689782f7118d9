//! `containerd-shim-kybernate-v1`: started by containerd for runtime `io.containerd.kybernate.v1`.

use containerd_shim::Config;
use kybernate_shim::{KybernateShim, RUNTIME_ID};

fn main() {
    let config = Config { no_setup_logger: true, no_reaper: true, ..Config::default() };
    containerd_shim::run::<KybernateShim>(RUNTIME_ID, Some(config));
}
