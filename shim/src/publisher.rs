//! The protobuf edge of task events: [`Publisher`] turns each [`TaskEvent`] into containerd's event
//! message and one thread forwards them over ttrpc, in the order they were sent, so `TaskStart`
//! always precedes the `TaskExit` of the same process.

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;

use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;

use crate::events::{EventSender, TaskEvent};

/// An event with its topic, as queued for the forwarding thread.
type Queued = (String, Box<dyn MessageDyn>);

/// Sends task events to containerd.
pub struct Publisher {
    tx: Mutex<Sender<Queued>>,
}

impl Publisher {
    /// Starts the forwarding thread for events of containerd namespace `namespace`.
    pub fn start(remote: RemotePublisher, namespace: String) -> std::io::Result<Publisher> {
        let (tx, rx) = channel::<Queued>();
        std::thread::Builder::new().name("events".into()).stack_size(256 * 1024).spawn(move || {
            for (topic, event) in rx {
                if let Err(e) = remote.publish(Context::default(), &topic, &namespace, event) {
                    tracing::warn!(topic, error = %e, "publishing an event to containerd failed");
                }
            }
        })?;
        Ok(Publisher { tx: Mutex::new(tx) })
    }
}

impl EventSender for Publisher {
    fn send(&self, event: TaskEvent) {
        let (topic, message) = to_protobuf(event);
        tracing::debug!(topic, "event");
        let sent = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send((topic.clone(), message));
        if sent.is_err() {
            tracing::warn!(topic, "the event forwarder has stopped; event dropped");
        }
    }
}

fn queued<E: Event + 'static>(event: E) -> Queued {
    (event.topic(), Box::new(event))
}

/// containerd's topic and message for `event`.
pub fn to_protobuf(event: TaskEvent) -> Queued {
    match event {
        TaskEvent::Create { container_id, bundle, rootfs, stdio, checkpoint, pid } => queued(TaskCreate {
            container_id,
            bundle,
            rootfs: rootfs
                .into_iter()
                .map(|m| containerd_shim::protos::types::mount::Mount {
                    type_: m.kind,
                    source: m.source,
                    options: m.options,
                    ..Default::default()
                })
                .collect(),
            io: MessageField::some(TaskIO {
                stdin: stdio.stdin,
                stdout: stdio.stdout,
                stderr: stdio.stderr,
                terminal: stdio.terminal,
                ..Default::default()
            }),
            checkpoint,
            pid,
            ..Default::default()
        }),
        TaskEvent::Start { container_id, pid } => queued(TaskStart { container_id, pid, ..Default::default() }),
        TaskEvent::Exit { container_id, id, pid, status, at } => queued(TaskExit {
            container_id,
            id,
            pid,
            exit_status: status,
            exited_at: MessageField::some(Timestamp::from(at)),
            ..Default::default()
        }),
        TaskEvent::Delete { container_id, pid, status, at } => queued(TaskDelete {
            id: container_id.clone(),
            container_id,
            pid,
            exit_status: status,
            exited_at: MessageField::some(Timestamp::from(at)),
            ..Default::default()
        }),
        TaskEvent::ExecAdded { container_id, exec_id } => {
            queued(TaskExecAdded { container_id, exec_id, ..Default::default() })
        }
        TaskEvent::ExecStarted { container_id, exec_id, pid } => {
            queued(TaskExecStarted { container_id, exec_id, pid, ..Default::default() })
        }
        TaskEvent::Paused { container_id } => queued(TaskPaused { container_id, ..Default::default() }),
        TaskEvent::Resumed { container_id } => queued(TaskResumed { container_id, ..Default::default() }),
        TaskEvent::Checkpointed { container_id, checkpoint } => {
            queued(TaskCheckpointed { container_id, checkpoint, ..Default::default() })
        }
        TaskEvent::Oom { container_id } => queued(TaskOOM { container_id, ..Default::default() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::Message;

    #[test]
    fn events_get_containerd_topics_and_fields() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(7);
        let (topic, message) =
            to_protobuf(TaskEvent::Exit { container_id: "c".into(), id: "e1".into(), pid: 42, status: 143, at });
        assert_eq!(topic, "/tasks/exit");
        let exit = TaskExit::parse_from_bytes(&message.write_to_bytes_dyn().unwrap()).unwrap();
        assert_eq!((exit.container_id.as_str(), exit.id.as_str(), exit.pid, exit.exit_status), ("c", "e1", 42, 143));
        assert_eq!(exit.exited_at.seconds, 7);
        let (topic, _) = to_protobuf(TaskEvent::Oom { container_id: "c".into() });
        assert_eq!(topic, "/tasks/oom");
        let (topic, message) = to_protobuf(TaskEvent::Delete { container_id: "c".into(), pid: 1, status: 0, at });
        assert_eq!(topic, "/tasks/delete");
        let delete = TaskDelete::parse_from_bytes(&message.write_to_bytes_dyn().unwrap()).unwrap();
        assert_eq!((delete.id.as_str(), delete.container_id.as_str()), ("c", "c"));
    }
}
