//! One process of a container (its init, or an exec'd process): pid, status, exit and stdio.

use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::api::{StateResponse, Status};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageField};

use crate::io::{ProcessIo, StdioPaths};

/// Exit status reported for processes the shim had to kill (SIGKILL), as containerd's runc shim does.
pub const KILLED_STATUS: u32 = 128 + libc::SIGKILL as u32;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// When the shim learnt of it.
    pub at: SystemTime,
}

impl Exit {
    /// The exit time as containerd wants it.
    pub fn timestamp(&self) -> Timestamp {
        Timestamp::from(self.at)
    }
}

/// A container process as the shim tracks it.
pub struct Process {
    /// Exec id; empty for the init process.
    pub exec_id: String,
    /// Host pid; 0 until the process exists.
    pub pid: i32,
    /// Lifecycle status.
    pub status: Status,
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
        Process { exec_id: exec_id.into(), pid: 0, status: Status::CREATED, exit: None, stdio, io: None, spec }
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
        self.status = Status::STOPPED;
    }

    /// The State answer for this process.
    pub fn state(&self, container_id: &str, bundle: &str) -> StateResponse {
        StateResponse {
            id: if self.exec_id.is_empty() { container_id.to_string() } else { self.exec_id.clone() },
            exec_id: self.exec_id.clone(),
            bundle: bundle.to_string(),
            pid: self.pid.max(0) as u32,
            status: EnumOrUnknown::new(self.status),
            stdin: self.stdio.stdin.clone(),
            stdout: self.stdio.stdout.clone(),
            stderr: self.stdio.stderr.clone(),
            terminal: self.stdio.terminal,
            exit_status: self.exit.map(|e| e.status).unwrap_or(0),
            exited_at: MessageField::from_option(self.exit.map(|e| e.timestamp())),
            ..Default::default()
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
        p.status = Status::RUNNING;
        assert!(p.is_alive());
        p.set_exited(7);
        p.set_exited(9);
        assert_eq!(p.exit.map(|e| e.status), Some(7));
        let s = p.state("c1", "/b");
        assert_eq!((s.id.as_str(), s.pid, s.exit_status), ("c1", 42, 7));
        assert_eq!(s.status.enum_value(), Ok(Status::STOPPED));
        assert!(s.exited_at.is_some());
    }
}
