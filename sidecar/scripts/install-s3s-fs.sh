#!/usr/bin/env bash
# Installs s3s-fs, the S3-compatible server the sidecar's tests run against (on loopback, in a temp
# dir). Idempotent: does nothing when the pinned version is already on PATH or in ~/.cargo/bin.
# Called by `make deps`; takes about 3 minutes on 2 cores the first time.
set -euo pipefail

VERSION=0.14.1
say() { printf '[s3s-fs] %s\n' "$*"; }

bin=$(command -v s3s-fs || true)
[ -n "$bin" ] || { [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ] && bin="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"; } || true
if [ -n "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$VERSION"; then
  say "s3s-fs $VERSION already installed at $bin"
  exit 0
fi
command -v cargo >/dev/null || { echo "[s3s-fs] ERROR: cargo not found; install Rust first" >&2; exit 1; }
say "installing s3s-fs $VERSION with cargo install (about 3 minutes)"
cargo install s3s-fs --version "$VERSION" --features binary --locked
say "installed $("${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" --version)"
