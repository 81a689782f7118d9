//! The runc-backed implementation of the task service's traits: [`RuncRuntime`] creates
//! [`Container`]s, and each operation of [`Instance`] is one of the container's operation files.

use std::sync::Arc;

use super::create::{create, prepare, CreateContext, Prepared};
use super::pod_checkpoint::PodCheckpoints;
use super::state::Container;
use crate::error::Result;
use crate::events::Events;
use crate::reaper::Reaper;
use crate::task::{
    CheckpointRequest, CreateRequest, Deleted, ExecRequest, Exit, Instance, PidInfo, ProcessState, Runtime,
};

/// Creates the containers of one shim (one containerd namespace) with runc.
pub struct RuncRuntime {
    /// containerd namespace of this shim.
    pub namespace: String,
    /// The shim's reaper.
    pub reaper: Arc<Reaper>,
    /// Where the containers' events go.
    pub events: Events,
    /// The pod checkpoints of checkpoints on stop (one shim serves one pod).
    pub pod_checkpoints: Arc<PodCheckpoints>,
}

impl RuncRuntime {
    fn context(&self) -> CreateContext<'_> {
        CreateContext {
            namespace: &self.namespace,
            reaper: &self.reaper,
            events: &self.events,
            pod_checkpoints: &self.pod_checkpoints,
        }
    }
}

impl Runtime for RuncRuntime {
    type Instance = Container;
    type Prepared = Prepared;

    fn prepare(&self, req: &CreateRequest) -> Result<Prepared> {
        prepare(&self.context(), req)
    }

    fn create(&self, req: &CreateRequest, prepared: Prepared) -> Result<Arc<Container>> {
        create(&self.context(), req, prepared)
    }

    fn added(&self, _container: &Arc<Container>) {
        self.reaper.replay_unclaimed();
    }
}

impl Instance for Container {
    fn pid(&self) -> u32 {
        Container::pid(self)
    }

    fn state(&self, exec_id: &str) -> Result<ProcessState> {
        Container::state(self, exec_id)
    }

    fn start(&self, exec_id: &str) -> Result<u32> {
        if exec_id.is_empty() {
            self.start_init()
        } else {
            self.start_exec(exec_id)
        }
    }

    fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        Container::kill(self, exec_id, signal, all)
    }

    fn exec(&self, req: ExecRequest) -> Result<()> {
        self.add_exec(req)
    }

    fn wait(&self, exec_id: &str) -> Result<Exit> {
        Container::wait(self, exec_id)
    }

    fn delete(&self, exec_id: &str) -> Result<Deleted> {
        if exec_id.is_empty() {
            self.delete_init()
        } else {
            self.delete_exec(exec_id)
        }
    }

    fn pids(&self) -> Result<Vec<PidInfo>> {
        Container::pids(self)
    }

    fn pause(&self) -> Result<()> {
        Container::pause(self)
    }

    fn resume(&self) -> Result<()> {
        Container::resume(self)
    }

    fn checkpoint(&self, req: &CheckpointRequest) -> Result<()> {
        Container::checkpoint(self, req)
    }

    fn update(&self, resources: &[u8]) -> Result<()> {
        Container::update(self, resources)
    }

    fn stats(&self) -> Result<serde_json::Value> {
        Container::stats(self)
    }

    fn resize_pty(&self, exec_id: &str, width: u32, height: u32) -> Result<()> {
        Container::resize_pty(self, exec_id, width, height)
    }

    fn close_io(&self, exec_id: &str, stdin: bool) -> Result<()> {
        Container::close_io(self, exec_id, stdin)
    }
}
