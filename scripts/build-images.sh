#!/usr/bin/env bash
# Builds Kybernate's container images without a registry, docker or buildah: one OCI image archive per
# component, target/images/<name>.oci.tar, named ghcr.io/kybernate/<name>:<workspace version>, for
#   ctr -n k8s.io images import target/images/<name>.oci.tar
# Each is one layer: the release binary at /usr/local/bin/<name> (the agent's image also carries
# kybernate-sidecar and the host's criu, the installer's the shim), the shared libraries ldd names,
# the host's CA bundle; its Entrypoint is the binary. The work is done by
# tests/src/bin/kybernate-build-images.rs (the OCI writer of tests/src/images.rs).
#
#   scripts/build-images.sh                 build the release binaries, then every image
#   scripts/build-images.sh NAME...         only these images (kybernate-agent, kybernate-sidecar, ...)
#   SKIP_BUILD=1 scripts/build-images.sh    use target/release as it is
#   REGISTRY=registry.example.com/kybernate VERSION=0.1.0-rc1 scripts/build-images.sh
# With a registry, images/Dockerfile builds the same images (docs/deploy.md).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET_DIR/images}
REGISTRY=${REGISTRY:-ghcr.io/kybernate}
VERSION=${VERSION:-$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)}
[[ -n $VERSION ]] || { echo "no version in Cargo.toml's [workspace.package]" >&2; exit 1; }

if [[ -z ${SKIP_BUILD:-} ]]; then
  "$CARGO" build --release -p kybernate-agent -p kybernate-sidecar -p kybernate-device-plugin \
    -p kybernate-operator -p kybernate-shim -p kybernate-install
fi
"$CARGO" build -q -p kybernate-tests --bin kybernate-build-images
"$TARGET_DIR/debug/kybernate-build-images" --release-dir "$TARGET_DIR/release" --out "$OUT" \
  --registry "$REGISTRY" --version "$VERSION" "$@"
