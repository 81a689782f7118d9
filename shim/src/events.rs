//! Publishing task events to containerd: one thread forwards them over ttrpc, in the order they were
//! queued, so `TaskStart` always precedes the `TaskExit` of the same process.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use containerd_shim::event::Event;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;

/// An event with its topic, as queued for the forwarding thread.
type Queued = (String, Box<dyn MessageDyn>);

/// A handle for queueing events; clones share the forwarding thread.
#[derive(Clone)]
pub struct Publisher {
    tx: Arc<Mutex<Sender<Queued>>>,
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
        Ok(Publisher { tx: Arc::new(Mutex::new(tx)) })
    }

    /// Queues `event` for containerd.
    pub fn publish<E: Event + 'static>(&self, event: E) {
        let topic = event.topic();
        tracing::debug!(topic, "event");
        let sent = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send((topic.clone(), Box::new(event)));
        if sent.is_err() {
            tracing::warn!(topic, "the event forwarder has stopped; event dropped");
        }
    }
}
