//! The protobuf edge: containerd's task requests decoded into the domain types of `task.rs` (runtime
//! and checkpoint options included), and the domain answers encoded back.

use std::path::PathBuf;

use checkpoint_core::{CgroupsMode, CriuFlags, EmptyNamespace};
use containerd_shim::api::{
    CheckpointTaskRequest, CreateTaskRequest, ExecProcessRequest, PidsResponse, StateResponse, Status,
};
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{EnumOrUnknown, Message as _, MessageDyn, MessageField};
use containerd_shim::protos::shim::oci::{CheckpointOptions as RuncCheckpointOptions, ProcessDetails};
use containerd_shim::util::convert_to_any;

use crate::config::{type_name, RuntimeOptions};
use crate::error::{Result, ShimError};
use crate::io::StdioPaths;
use crate::mount::MountSpec;
use crate::task::{CheckpointRequest, CreateRequest, ExecRequest, PidInfo, ProcessState, TaskStatus};

/// A Create request in domain terms (its runtime options decoded).
pub fn create_request(req: &CreateTaskRequest) -> Result<CreateRequest> {
    Ok(CreateRequest {
        id: req.id.clone(),
        bundle: PathBuf::from(&req.bundle),
        rootfs: req
            .rootfs
            .iter()
            .map(|m| MountSpec { kind: m.type_.clone(), source: m.source.clone(), options: m.options.clone() })
            .collect(),
        stdio: StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        },
        checkpoint: req.checkpoint.clone(),
        parent_checkpoint: req.parent_checkpoint.clone(),
        options: RuntimeOptions::decode(req.options.as_ref())?,
    })
}

/// An Exec request in domain terms (its process spec parsed).
pub fn exec_request(req: &ExecProcessRequest) -> Result<ExecRequest> {
    let spec = req
        .spec
        .as_ref()
        .ok_or_else(|| ShimError::InvalidArgument(format!("exec {} has no process spec", req.exec_id)))?;
    let spec = serde_json::from_slice(&spec.value).map_err(|e| {
        ShimError::InvalidArgument(format!("the process spec of exec {} is not JSON: {e}", req.exec_id))
    })?;
    Ok(ExecRequest {
        exec_id: req.exec_id.clone(),
        stdio: StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        },
        spec,
    })
}

/// Decodes the options of a CheckpointTaskRequest. Absent options mean containerd's defaults for a
/// runtime it does not know (`ctr t checkpoint` sends none to us): leave the task running.
pub fn decode_checkpoint_options(any: Option<&Any>) -> Result<RuncCheckpointOptions> {
    let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
        return Ok(RuncCheckpointOptions::default());
    };
    match type_name(&any.type_url) {
        "containerd.runc.v1.CheckpointOptions" => RuncCheckpointOptions::parse_from_bytes(&any.value)
            .map_err(|e| ShimError::InvalidArgument(format!("checkpoint options do not decode: {e}"))),
        other => Err(ShimError::InvalidArgument(format!(
            "checkpoint options of type {other:?} are not understood: send containerd.runc.v1.CheckpointOptions"
        ))),
    }
}

/// A Checkpoint request in domain terms: the image directory (the request's path, else the options'
/// image path), the work directory, and the CRIU flags of containerd's runc options.
pub fn checkpoint_request(req: &CheckpointTaskRequest) -> Result<CheckpointRequest> {
    let opts = decode_checkpoint_options(req.options.as_ref())?;
    let image_dir = match (req.path.as_str(), opts.image_path.as_str()) {
        ("", "") => {
            return Err(ShimError::InvalidArgument(format!(
                "checkpoint of {} names no image directory: set the request path or ImagePath",
                req.id
            )))
        }
        ("", path) | (path, _) => PathBuf::from(path),
    };
    Ok(CheckpointRequest {
        image_dir,
        work_dir: (!opts.work_path.is_empty()).then(|| PathBuf::from(&opts.work_path)),
        exit: opts.exit,
        flags: criu_flags(&opts)?,
    })
}

/// containerd's runc checkpoint options as CRIU flags.
fn criu_flags(opts: &RuncCheckpointOptions) -> Result<CriuFlags> {
    let manage_cgroups_mode = match opts.cgroups_mode.as_str() {
        "" => None,
        mode => Some(mode.parse::<CgroupsMode>()?),
    };
    let empty_namespaces = opts
        .empty_namespaces
        .iter()
        .map(|ns| match ns.as_str() {
            "network" | "net" => Ok(EmptyNamespace::Network),
            other => Err(ShimError::InvalidArgument(format!(
                "empty namespace {other:?} is not supported: runc can only leave the network namespace empty"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CriuFlags {
        tcp_established: opts.open_tcp,
        ext_unix_sk: opts.external_unix_sockets,
        shell_job: opts.terminal,
        file_locks: opts.file_locks,
        manage_cgroups_mode,
        empty_namespaces,
    })
}

fn status(status: TaskStatus) -> Status {
    match status {
        TaskStatus::Created => Status::CREATED,
        TaskStatus::Running => Status::RUNNING,
        TaskStatus::Paused => Status::PAUSED,
        TaskStatus::Stopped => Status::STOPPED,
    }
}

/// The State answer for a process.
pub fn state_response(state: ProcessState) -> StateResponse {
    StateResponse {
        id: state.id,
        exec_id: state.exec_id,
        bundle: state.bundle,
        pid: state.pid,
        status: EnumOrUnknown::new(status(state.status)),
        stdin: state.stdio.stdin,
        stdout: state.stdio.stdout,
        stderr: state.stdio.stderr,
        terminal: state.stdio.terminal,
        exit_status: state.exit.map(|e| e.status).unwrap_or(0),
        exited_at: MessageField::from_option(state.exit.map(|e| Timestamp::from(e.at))),
        ..Default::default()
    }
}

/// The Pids answer: exec'd processes carry their exec id as runc's `ProcessDetails`.
pub fn pids_response(pids: Vec<PidInfo>) -> Result<PidsResponse> {
    let processes = pids
        .into_iter()
        .map(|p| {
            let mut info = ProcessInfo { pid: p.pid, ..Default::default() };
            if let Some(exec_id) = p.exec_id {
                info.info = MessageField::some(any(ProcessDetails { exec_id, ..Default::default() })?);
            }
            Ok(info)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PidsResponse { processes, ..Default::default() })
}

/// Packs a message the way containerd's typeurl expects it.
pub fn any<M: MessageDyn>(m: M) -> Result<Any> {
    convert_to_any(Box::new(m)).map_err(|e| ShimError::Internal(format!("encoding a protobuf message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        Any { type_url: type_url.into(), value, ..Default::default() }
    }

    #[test]
    fn checkpoint_options_decode() {
        let opts = decode_checkpoint_options(None).unwrap();
        assert!(!opts.exit);
        let sent = RuncCheckpointOptions { exit: true, file_locks: true, ..Default::default() };
        let value = sent.write_to_bytes().unwrap();
        let opts = decode_checkpoint_options(Some(&any("containerd.runc.v1.CheckpointOptions", value))).unwrap();
        assert!(opts.exit && opts.file_locks);
        assert!(decode_checkpoint_options(Some(&any("x.Y", vec![]))).is_err());
    }

    #[test]
    fn containerd_options_translate() {
        let opts = RuncCheckpointOptions {
            exit: true,
            open_tcp: true,
            file_locks: true,
            terminal: true,
            cgroups_mode: "soft".into(),
            empty_namespaces: vec!["network".into()],
            work_path: "/w".into(),
            ..Default::default()
        };
        let req = CheckpointTaskRequest {
            id: "c".into(),
            path: "/images".into(),
            options: MessageField::some(any("containerd.runc.v1.CheckpointOptions", opts.write_to_bytes().unwrap())),
            ..Default::default()
        };
        let core = checkpoint_request(&req).unwrap();
        assert!(core.exit);
        assert_eq!(core.image_dir, PathBuf::from("/images"));
        assert_eq!(core.work_dir.as_deref(), Some(std::path::Path::new("/w")));
        let flags = core.flags;
        assert!(flags.tcp_established && flags.file_locks && flags.shell_job && !flags.ext_unix_sk);
        assert_eq!(flags.manage_cgroups_mode, Some(CgroupsMode::Soft));
        assert_eq!(flags.empty_namespaces, vec![EmptyNamespace::Network]);

        let plain = checkpoint_request(&CheckpointTaskRequest { path: "/i".into(), ..Default::default() }).unwrap();
        assert!(!plain.exit && plain.work_dir.is_none());
        assert!(checkpoint_request(&CheckpointTaskRequest::default()).unwrap_err().to_string().contains("ImagePath"));
        let bad = RuncCheckpointOptions { empty_namespaces: vec!["ipc".into()], ..Default::default() };
        assert!(matches!(criu_flags(&bad), Err(ShimError::InvalidArgument(_))));
        let bad = RuncCheckpointOptions { cgroups_mode: "weird".into(), ..Default::default() };
        assert!(criu_flags(&bad).is_err());
    }
}
