//! Protobuf and gRPC APIs that Kybernate speaks, generated at build time from the `.proto` files
//! vendored in this crate.

/// The kubelet device-plugin API, version `v1beta1` (`k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1`).
///
/// Contains the messages, the `Registration` service (served by the kubelet) and the
/// `DevicePlugin` service (served by a device plugin), with tonic clients and servers for both.
pub mod deviceplugin {
    /// Version `v1beta1` of the device-plugin API.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1beta1 {
        tonic::include_proto!("v1beta1");

        /// The API version a device plugin sends in its `RegisterRequest`.
        pub const VERSION: &str = "v1beta1";
        /// Health value of a device that can be allocated.
        pub const HEALTHY: &str = "Healthy";
        /// Health value of a device that must not be allocated.
        pub const UNHEALTHY: &str = "Unhealthy";
        /// The directory where the kubelet and device plugins put their sockets.
        pub const DEVICE_PLUGIN_PATH: &str = "/var/lib/kubelet/device-plugins";
        /// The file name of the kubelet's registration socket inside [`DEVICE_PLUGIN_PATH`].
        pub const KUBELET_SOCKET_NAME: &str = "kubelet.sock";
    }
}

/// Kybernate's own APIs.
pub mod kybernate {
    /// The node agent's API (`kybernate.agent.v1`, `kybernate/agent/v1/agent.proto`): the `Agent`
    /// service (Checkpoint, List, Delete, Status, Events) with its tonic client and server.
    pub mod agent {
        /// Version `v1` of the agent API.
        #[allow(missing_docs, clippy::all, clippy::pedantic)]
        pub mod v1 {
            tonic::include_proto!("kybernate.agent.v1");
        }
    }
}
