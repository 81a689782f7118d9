//! Pause, resume, resource updates and statistics of a running container.

use super::state::Container;
use crate::error::{Result, ShimError};
use crate::events::TaskEvent;
use crate::task::TaskStatus;

impl Container {
    /// Freezes the container.
    pub fn pause(&self) -> Result<()> {
        let _ops = self.ops();
        self.require_status(&[TaskStatus::Running], "paused")?;
        self.runc.pause(&self.id)?;
        self.procs().init.status = TaskStatus::Paused;
        self.events.send(TaskEvent::Paused { container_id: self.id.clone() });
        Ok(())
    }

    /// Thaws the container.
    pub fn resume(&self) -> Result<()> {
        let _ops = self.ops();
        self.require_status(&[TaskStatus::Paused], "resumed")?;
        self.runc.resume(&self.id)?;
        {
            let mut procs = self.procs();
            if procs.init.exit.is_none() {
                procs.init.status = TaskStatus::Running;
            }
        }
        self.events.send(TaskEvent::Resumed { container_id: self.id.clone() });
        Ok(())
    }

    /// Applies new resource limits (an OCI `LinuxResources` JSON document).
    pub fn update(&self, resources: &[u8]) -> Result<()> {
        let _ops = self.ops();
        serde_json::from_slice::<serde_json::Value>(resources).map_err(|e| {
            ShimError::InvalidArgument(format!("resources are not an OCI LinuxResources document: {e}"))
        })?;
        let path = self.bundle.join("update-resources.json");
        std::fs::write(&path, resources).map_err(|e| ShimError::io(format!("writing {}", path.display()), e))?;
        let result = self.runc.update(&self.id, &path);
        let _ = std::fs::remove_file(&path);
        Ok(result?)
    }

    /// One snapshot of the container's cgroup statistics, as runc reports them (`data` of its
    /// `stats` event).
    pub fn stats(&self) -> Result<serde_json::Value> {
        let mut event = self.runc.stats(&self.id)?;
        if event["type"] != "stats" {
            return Err(ShimError::Internal(format!("runc events --stats sent a {} event", event["type"])));
        }
        Ok(event["data"].take())
    }
}
