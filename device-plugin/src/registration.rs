//! Talking to the kubelet: gRPC channels over Unix sockets and the `Register` call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use kybernate_proto::deviceplugin::v1beta1::{
    registration_client::RegistrationClient, DevicePluginOptions, RegisterRequest, VERSION,
};
use thiserror::Error;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// Why registering with the kubelet failed.
#[derive(Debug, Error)]
pub enum RegistrationError {
    /// The kubelet socket could not be connected to.
    #[error("cannot connect to the kubelet at {socket}: {source}; is the kubelet running, and is its device-plugin directory mounted into this pod?")]
    Connect {
        /// The kubelet socket.
        socket: PathBuf,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The kubelet answered with an error.
    #[error("the kubelet at {socket} rejected the registration of {resource}: {status}")]
    Rejected {
        /// The kubelet socket.
        socket: PathBuf,
        /// The resource name that was registered.
        resource: String,
        /// The kubelet's answer.
        status: Box<tonic::Status>,
    },
    /// The kubelet did not answer in time.
    #[error("the kubelet at {socket} did not answer the registration within {after:?}")]
    Timeout {
        /// The kubelet socket.
        socket: PathBuf,
        /// How long was waited.
        after: Duration,
    },
}

/// The options this plugin announces: no `PreStartContainer` needed, `GetPreferredAllocation`
/// available.
pub fn plugin_options() -> DevicePluginOptions {
    DevicePluginOptions { pre_start_required: false, get_preferred_allocation_available: true }
}

/// Connects a gRPC channel to the Unix socket at `path` (the URI is required by tonic but unused).
pub async fn uds_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

/// Registers `resource_name`, served on the socket file `endpoint` (relative to the kubelet's
/// device-plugin directory), with the kubelet listening on `kubelet_socket`.
pub async fn register(
    kubelet_socket: &Path,
    endpoint: &str,
    resource_name: &str,
    timeout: Duration,
) -> Result<(), RegistrationError> {
    let attempt = async {
        let channel = uds_channel(kubelet_socket)
            .await
            .map_err(|source| RegistrationError::Connect { socket: kubelet_socket.to_owned(), source })?;
        let request = RegisterRequest {
            version: VERSION.to_owned(),
            endpoint: endpoint.to_owned(),
            resource_name: resource_name.to_owned(),
            options: Some(plugin_options()),
        };
        RegistrationClient::new(channel).register(request).await.map_err(|status| RegistrationError::Rejected {
            socket: kubelet_socket.to_owned(),
            resource: resource_name.to_owned(),
            status: Box::new(status),
        })?;
        Ok(())
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(RegistrationError::Timeout { socket: kubelet_socket.to_owned(), after: timeout }))
}
