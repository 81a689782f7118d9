//! How the controllers report what they did: conditions that keep their transition time, the whole
//! status written with server-side apply on the status subresource, and Kubernetes Events.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::chrono::Utc;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::backoff::Backoff;

/// The field manager of every status write, and the reporting controller of every Event.
pub const MANAGER: &str = "kybernate-operator";

/// What the reconciles of every controller share: the API server's client, the Event recorder
/// (reporting controller [`MANAGER`], instance `$POD_NAME` when set), the backoff of failed
/// reconciles, and the clock of the status timestamps.
pub struct Base {
    /// The API server.
    pub client: Client,
    /// Where Events go.
    pub recorder: Recorder,
    /// The waits before retrying objects.
    pub backoff: Backoff,
    /// Now (tests fix it).
    pub now: fn() -> Time,
}

impl Base {
    /// The shared part of a controller's context on `client`, with the default backoff and clock.
    pub fn new(client: Client) -> Self {
        let reporter = Reporter { controller: MANAGER.to_string(), instance: std::env::var("POD_NAME").ok() };
        Base {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            backoff: Backoff::default(),
            now: || Time(Utc::now()),
        }
    }
}

/// Condition `type_` of `generation`, keeping the transition time of the `previous` condition of the
/// same type when its status did not change.
pub fn condition(
    previous: &[Condition],
    generation: Option<i64>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// Writes `status` as the whole status of object `name` (server-side apply, forced, field manager
/// [`MANAGER`]).
pub async fn apply<K>(api: &Api<K>, name: &str, status: serde_json::Value) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let patch = Patch::Apply(json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    }));
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &patch).await?;
    Ok(())
}

/// Publishes an Event of `action` on `object`; a failure to is only logged (the status says the
/// same).
pub async fn publish(
    recorder: &Recorder,
    object: &ObjectReference,
    type_: EventType,
    action: &str,
    reason: &str,
    note: String,
) {
    let event =
        Event { type_, reason: reason.to_string(), note: Some(note), action: action.to_string(), secondary: None };
    if let Err(e) = recorder.publish(&event, object).await {
        tracing::warn!(
            object = %format!("{}/{}", object.namespace.as_deref().unwrap_or_default(), object.name.as_deref().unwrap_or_default()),
            error = %e,
            "publishing an Event failed"
        );
    }
}
