//! Generates the Rust bindings for the vendored protobuf files with tonic-build.
//!
//! Needs `protoc` (Debian: `protobuf-compiler`, installed by `scripts/deps.sh`); set `PROTOC` to
//! point at another one.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["deviceplugin/v1beta1/api.proto", "kybernate/agent/v1/agent.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_build::configure().build_server(true).build_client(true).compile_protos(&protos, &["."]).map_err(|e| {
        format!(
            "generating gRPC code from {protos:?} failed: {e}. Is protoc installed? \
                 (Debian: apt-get install protobuf-compiler, or set PROTOC=/path/to/protoc)"
        )
        .into()
    })
}
