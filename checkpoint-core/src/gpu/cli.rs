//! NVIDIA's `cuda-checkpoint` utility as a backend, for nodes where it is installed.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{CudaCheckpointDriver, CudaProcessState, GpuError, GpuPair};
use crate::exec::Spawner;

/// Drives `cuda-checkpoint --action … --pid …`.
#[derive(Debug, Clone)]
pub struct CudaCheckpointCli {
    binary: PathBuf,
    spawner: Spawner,
}

impl CudaCheckpointCli {
    /// Uses the `cuda-checkpoint` binary at `binary`, spawned by `spawner`.
    pub fn new(binary: impl Into<PathBuf>, spawner: Spawner) -> Self {
        CudaCheckpointCli { binary: binary.into(), spawner }
    }

    /// Finds `cuda-checkpoint` on PATH.
    pub fn from_path(spawner: Spawner) -> Option<Self> {
        crate::criu::find_on_path("cuda-checkpoint").map(|binary| Self::new(binary, spawner))
    }

    fn run(&self, operation: &'static str, pid: i32, extra: &[String]) -> Result<String, GpuError> {
        let fail = |detail: String| GpuError { backend: "cuda-checkpoint".into(), operation, pid, detail };
        let out = self
            .spawner
            .output(Command::new(&self.binary).args(extra).arg("--pid").arg(pid.to_string()).stdin(Stdio::null()))
            .map_err(|e| fail(format!("cannot run {}: {e}", self.binary.display())))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(fail(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())))
        }
    }

    fn action(&self, action: &'static str, pid: i32, more: &[String]) -> Result<(), GpuError> {
        let mut args = vec!["--action".to_string(), action.to_string()];
        args.extend_from_slice(more);
        self.run(action, pid, &args).map(|_| ())
    }
}

fn uuid_text(raw: &[u8; 16]) -> String {
    let h: Vec<String> = raw.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

impl CudaCheckpointDriver for CudaCheckpointCli {
    fn name(&self) -> &str {
        "cuda-checkpoint"
    }

    fn state(&self, pid: i32) -> Result<CudaProcessState, GpuError> {
        let text = self.run("get-state", pid, &["--get-state".to_string()])?;
        Ok(match text.to_ascii_lowercase().as_str() {
            "running" => CudaProcessState::Running,
            "locked" => CudaProcessState::Locked,
            "checkpointed" => CudaProcessState::Checkpointed,
            "failed" => CudaProcessState::Failed,
            _ => CudaProcessState::Unknown(-1),
        })
    }

    fn lock(&self, pid: i32, timeout: Duration) -> Result<(), GpuError> {
        self.action("lock", pid, &["--timeout".into(), timeout.as_millis().to_string()])
    }

    fn checkpoint(&self, pid: i32) -> Result<(), GpuError> {
        self.action("checkpoint", pid, &[])
    }

    fn restore(&self, pid: i32, gpu_pairs: &[GpuPair]) -> Result<(), GpuError> {
        let mut more = Vec::new();
        if !gpu_pairs.is_empty() {
            let pairs: Vec<String> =
                gpu_pairs.iter().map(|p| format!("{}={}", uuid_text(&p.old_uuid), uuid_text(&p.new_uuid))).collect();
            more = vec!["--device-map".into(), pairs.join(",")];
        }
        self.action("restore", pid, &more)
    }

    fn unlock(&self, pid: i32) -> Result<(), GpuError> {
        self.action("unlock", pid, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_spelt_like_nvidia_smi() {
        let raw = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
        assert_eq!(uuid_text(&raw), "GPU-12345678-9abc-def0-0123-456789abcdef");
    }
}
