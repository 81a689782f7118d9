//! One process of a container (its init, or an exec'd process): pid, status, exit and stdio.

use std::sync::Arc;
use std::time::SystemTime;

use crate::io::{ProcessIo, StdioPaths};
use crate::task::{Exit, ProcessState, TaskStatus};

/// A container process as the shim tracks it.
pub struct Process {
    /// Exec id; empty for the init process.
    pub exec_id: String,
    /// Host pid; 0 until the process exists.
    pub pid: i32,
    /// Lifecycle status.
    pub status: TaskStatus,
    /// Set once the process exited (or was deleted before it could).
    pub exit: Option<Exit>,
    /// What containerd asked for as stdio.
    pub stdio: StdioPaths,
    /// The shim's side of the stdio, once set up.
    pub io: Option<Arc<ProcessIo>>,
    /// The OCI process spec of an exec'd process (JSON).
    pub spec: Option<serde_json::Value>,
}

impl Process {
    /// A process that does not run yet.
    pub fn new(exec_id: &str, stdio: StdioPaths, spec: Option<serde_json::Value>) -> Self {
        Process { exec_id: exec_id.into(), pid: 0, status: TaskStatus::Created, exit: None, stdio, io: None, spec }
    }

    /// Whether the process exists and has not exited.
    pub fn is_alive(&self) -> bool {
        self.pid > 0 && self.exit.is_none()
    }

    /// Records the exit (the first one wins).
    pub fn set_exited(&mut self, status: u32) {
        if self.exit.is_none() {
            self.exit = Some(Exit { status, at: SystemTime::now() });
        }
        self.status = TaskStatus::Stopped;
    }

    /// The State answer for this process.
    pub fn state(&self, container_id: &str, bundle: &str) -> ProcessState {
        ProcessState {
            id: if self.exec_id.is_empty() { container_id.to_string() } else { self.exec_id.clone() },
            exec_id: self.exec_id.clone(),
            bundle: bundle.to_string(),
            pid: self.pid.max(0) as u32,
            status: self.status,
            stdio: self.stdio.clone(),
            exit: self.exit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_is_recorded_once() {
        let mut p = Process::new("", StdioPaths::default(), None);
        assert!(!p.is_alive());
        p.pid = 42;
        p.status = TaskStatus::Running;
        assert!(p.is_alive());
        p.set_exited(7);
        p.set_exited(9);
        assert_eq!(p.exit.map(|e| e.status), Some(7));
        let s = p.state("c1", "/b");
        assert_eq!((s.id.as_str(), s.pid, s.exit.map(|e| e.status)), ("c1", 42, Some(7)));
        assert_eq!(s.status, TaskStatus::Stopped);
    }
}
