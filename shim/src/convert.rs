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
use crate::task::{CheckpointKind, CheckpointRequest, CreateRequest, ExecRequest, PidInfo, ProcessState, TaskStatus};

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

/// The type name of Kybernate's own checkpoint options ([`NodeCheckpointOptions`]).
pub const NODE_CHECKPOINT_OPTIONS: &str = "kybernate.shim.v1.CheckpointOptions";

/// `kybernate.shim.v1.CheckpointOptions`, the checkpoint options of Kybernate's node agent: they ask
/// for a *node bundle* (as a checkpoint on stop writes one: the KEP-2008 archive layout with the
/// writable layer, fsynced, signed) in the request's path, which must lie under the shim config's
/// `checkpoint_dir`, instead of containerd's task image. The wire format, as a `.proto` would say it:
///
/// ```proto
/// syntax = "proto3";
/// package kybernate.shim.v1;
/// message CheckpointOptions {
///   bool exit = 1; // end the task after the checkpoint (default: leave it running)
/// }
/// ```
///
/// The shim owns the type and the agent encodes it with [`node_checkpoint_request`], so the one
/// definition serves both sides.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeCheckpointOptions {
    /// End the task after the checkpoint; otherwise it keeps running.
    #[prost(bool, tag = "1")]
    pub exit: bool,
}

/// The options of a CheckpointTaskRequest, by who sent them.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodedCheckpointOptions {
    /// containerd's runc options (or none): a task image into containerd's directory.
    Runc(RuncCheckpointOptions),
    /// Kybernate's node agent: a node bundle.
    Node(NodeCheckpointOptions),
}

/// Decodes the options of a CheckpointTaskRequest. Absent options mean containerd's defaults for a
/// runtime it does not know (`ctr t checkpoint` sends none to us): leave the task running.
pub fn decode_checkpoint_options(any: Option<&Any>) -> Result<DecodedCheckpointOptions> {
    let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
        return Ok(DecodedCheckpointOptions::Runc(RuncCheckpointOptions::default()));
    };
    let undecodable =
        |e: &dyn std::fmt::Display| ShimError::InvalidArgument(format!("checkpoint options do not decode: {e}"));
    match type_name(&any.type_url) {
        "containerd.runc.v1.CheckpointOptions" => RuncCheckpointOptions::parse_from_bytes(&any.value)
            .map(DecodedCheckpointOptions::Runc)
            .map_err(|e| undecodable(&e)),
        NODE_CHECKPOINT_OPTIONS => <NodeCheckpointOptions as prost::Message>::decode(any.value.as_slice())
            .map(DecodedCheckpointOptions::Node)
            .map_err(|e| undecodable(&e)),
        other => Err(ShimError::InvalidArgument(format!(
            "checkpoint options of type {other:?} are not understood: send containerd.runc.v1.CheckpointOptions \
             or {NODE_CHECKPOINT_OPTIONS}"
        ))),
    }
}

/// The CheckpointTaskRequest by which the node agent asks the shim for a node bundle of task `id` in
/// `dir` (under the shim's `checkpoint_dir`).
pub fn node_checkpoint_request(id: &str, dir: &std::path::Path, exit: bool) -> CheckpointTaskRequest {
    CheckpointTaskRequest {
        id: id.to_string(),
        path: dir.display().to_string(),
        options: MessageField::some(Any {
            type_url: format!("type.googleapis.com/{NODE_CHECKPOINT_OPTIONS}"),
            value: prost::Message::encode_to_vec(&NodeCheckpointOptions { exit }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Checkpoint request in domain terms. With runc's options (or none): a task image into the
/// request's path, else the options' image path, with their work directory and CRIU flags. With
/// Kybernate's: a node bundle into the request's path.
pub fn checkpoint_request(req: &CheckpointTaskRequest) -> Result<CheckpointRequest> {
    let opts = match decode_checkpoint_options(req.options.as_ref())? {
        DecodedCheckpointOptions::Runc(opts) => opts,
        DecodedCheckpointOptions::Node(node) => {
            if req.path.is_empty() {
                return Err(ShimError::InvalidArgument(format!(
                    "node checkpoint of {} names no bundle directory: set the request path",
                    req.id
                )));
            }
            return Ok(CheckpointRequest {
                kind: CheckpointKind::NodeBundle,
                image_dir: PathBuf::from(&req.path),
                work_dir: None,
                exit: node.exit,
                flags: CriuFlags::default(),
            });
        }
    };
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
        kind: CheckpointKind::TaskImage,
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
        assert_eq!(opts, DecodedCheckpointOptions::Runc(RuncCheckpointOptions::default()));
        let sent = RuncCheckpointOptions { exit: true, file_locks: true, ..Default::default() };
        let value = sent.write_to_bytes().unwrap();
        let opts = decode_checkpoint_options(Some(&any("containerd.runc.v1.CheckpointOptions", value))).unwrap();
        assert_eq!(opts, DecodedCheckpointOptions::Runc(sent));
        let err = decode_checkpoint_options(Some(&any("x.Y", vec![]))).unwrap_err().to_string();
        assert!(err.contains(NODE_CHECKPOINT_OPTIONS), "{err}");
        let garbage = decode_checkpoint_options(Some(&any(NODE_CHECKPOINT_OPTIONS, vec![0xff]))).unwrap_err();
        assert!(matches!(garbage, ShimError::InvalidArgument(_)), "{garbage}");
    }

    #[test]
    fn node_checkpoint_requests_round_trip() {
        let dir = std::path::Path::new("/var/lib/kybernate/checkpoints/ns/pod/c/2026-01-01T00:00:00.000Z");
        for exit in [false, true] {
            let req = node_checkpoint_request("c1", dir, exit);
            assert_eq!(req.id, "c1");
            let core = checkpoint_request(&req).unwrap();
            assert_eq!(
                core,
                CheckpointRequest {
                    kind: CheckpointKind::NodeBundle,
                    image_dir: dir.to_path_buf(),
                    work_dir: None,
                    exit,
                    flags: CriuFlags::default(),
                }
            );
        }
        let mut no_path = node_checkpoint_request("c1", dir, false);
        no_path.path.clear();
        let err = checkpoint_request(&no_path).unwrap_err().to_string();
        assert!(err.contains("names no bundle directory"), "{err}");
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
        assert_eq!(core.kind, CheckpointKind::TaskImage);
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
