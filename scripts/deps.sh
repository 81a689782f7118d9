#!/usr/bin/env bash
# Installs what Kybernate needs on a Debian bookworm node (run as root). Idempotent: every step checks
# first and says whether it did anything. Used by `make deps`, which `make test` and `make demo` run.
set -euo pipefail

CRIU_MIN_MAJOR=4
CRIU_VERSION=4.1.1
BUILD_DIR=${KYBERNATE_BUILD_DIR:-/var/cache/kybernate/build}
PREFIX=${KYBERNATE_PREFIX:-/usr/local}

say() { printf '[deps] %s\n' "$*"; }
die() { printf '[deps] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and builds CRIU); try: sudo make deps"
command -v apt-get >/dev/null || die "apt-get not found: make deps supports Debian/Ubuntu; install containerd, runc, iptables, protoc and CRIU >= 4 by hand"

# Packages: runtime (containerd, runc, iptables), build (protoc), test images (busybox-static),
# the peer whose checkpoint archives are restored and benchmarked (podman), and CRIU's build
# dependencies.
PACKAGES=(
  containerd runc iptables protobuf-compiler busybox-static xz-utils ca-certificates build-essential pkg-config
  libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev libnl-3-dev libnet1-dev libcap-dev libbsd-dev
  libaio-dev libgnutls28-dev python3-protobuf libnftables-dev uuid-dev libdrm-dev git openssl podman
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "packages: all present"
fi

criu_major() { criu --version 2>/dev/null | sed -n 's/^Version: \([0-9]*\)\..*/\1/p'; }
if command -v criu >/dev/null && [ "$(criu_major || echo 0)" -ge "$CRIU_MIN_MAJOR" ] 2>/dev/null; then
  say "criu: $(criu --version | head -1) already on PATH ($(command -v criu)), nothing to build"
else
  say "criu: building CRIU $CRIU_VERSION from source (Debian bookworm's 3.17 fails on recent kernels)"
  mkdir -p "$BUILD_DIR"
  tarball="$BUILD_DIR/criu_${CRIU_VERSION}.orig.tar.xz"
  if [ ! -s "$tarball" ]; then
    src_list=/etc/apt/sources.list.d/kybernate-trixie-src.sources
    if [ ! -f "$src_list" ]; then
      say "adding a deb-src entry for Debian trixie (source packages only) to fetch CRIU's tarball"
      cat >"$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    apt-get update -qq
    # The .dsc can be missing from the mirror; the orig tarball is what we need, so tolerate that failure.
    (cd "$BUILD_DIR" && apt-get source --download-only -qq "criu/trixie" >/dev/null 2>&1 || true)
    [ -s "$tarball" ] || die "could not download criu_${CRIU_VERSION}.orig.tar.xz from Debian trixie sources; download it into $BUILD_DIR by hand and re-run make deps"
  fi
  src="$BUILD_DIR/criu-$CRIU_VERSION"
  rm -rf "$src" && tar -C "$BUILD_DIR" -xf "$tarball"
  make -C "$src" -j"$(nproc)" criu >"$BUILD_DIR/criu-build.log" 2>&1 || die "CRIU build failed; see $BUILD_DIR/criu-build.log"
  install -m 0755 "$src/criu/criu" "$PREFIX/sbin/criu"
  hash -r
  say "criu: installed $("$PREFIX/sbin/criu" --version | head -1) at $PREFIX/sbin/criu"
fi

if criu check >/dev/null 2>&1; then
  say "criu check: ok"
else
  criu check 2>&1 | tail -5 >&2 || true
  die "criu check failed on this kernel (output above); CRIU cannot checkpoint here"
fi

# containerd 1.7 as the second tested version, beside the system's 1.6: Debian trixie's package
# unpacked into a private directory (it needs libc6 >= 2.34, which bookworm has); nothing of the
# system's containerd is replaced. `make test` runs the containerd tests against it too.
CONTAINERD17_DIR=/opt/kybernate/containerd-1.7
if "$CONTAINERD17_DIR/usr/bin/containerd" --version 2>/dev/null | grep -q ' 1\.7\.'; then
  say "containerd 1.7: present in $CONTAINERD17_DIR"
else
  say "containerd 1.7: fetching Debian trixie's package into $CONTAINERD17_DIR"
  cat > /etc/apt/sources.list.d/kybernate-trixie.sources <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  # trixie's packages are never chosen over bookworm's unless asked for by name
  printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' > /etc/apt/preferences.d/kybernate-trixie
  apt-get update -qq
  dl=$(mktemp -d)
  (cd "$dl" && apt-get download -qq containerd/trixie >/dev/null 2>&1) || die "could not download containerd from trixie"
  rm -rf "$CONTAINERD17_DIR" && mkdir -p "$CONTAINERD17_DIR"
  dpkg -x "$dl"/containerd_*.deb "$CONTAINERD17_DIR"
  rm -rf "$dl"
  "$CONTAINERD17_DIR/usr/bin/containerd" --version >/dev/null || die "containerd 1.7 from trixie does not run here"
  say "containerd 1.7: $("$CONTAINERD17_DIR/usr/bin/containerd" --version)"
fi

# kubectl renders deploy/ with its built-in kustomize in the tests (Debian's kubernetes-client, unless
# a kubectl is installed already).
if command -v kubectl >/dev/null; then
  say "kubectl: $(command -v kubectl)"
else
  say "installing kubernetes-client (kubectl with kustomize)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null
fi

# The node's signing key (docs/security.md): the shim signs every bundle it seals with it and restores
# only bundles signed by it or by a key in the trusted directory. Never replaced once it exists.
KEYS=/etc/kybernate/keys
if [ -f "$KEYS/signing.key" ]; then
  say "signing key: $KEYS/signing.key present"
else
  install -d -m 0755 "$KEYS" "$KEYS/trusted"
  (umask 077 && openssl genpkey -algorithm ed25519 -out "$KEYS/signing.key.tmp") || die "openssl could not create an ed25519 key"
  openssl pkey -in "$KEYS/signing.key.tmp" -pubout -out "$KEYS/signing.pub"
  mv "$KEYS/signing.key.tmp" "$KEYS/signing.key"
  say "signing key: created $KEYS/signing.key (public half $KEYS/signing.pub: copy it into other nodes' $KEYS/trusted/)"
fi
install -d -m 0755 "$KEYS/trusted"

# The sidecar's tests run against a real S3-compatible server on loopback.
bash "$(dirname "${BASH_SOURCE[0]}")/../sidecar/scripts/install-s3s-fs.sh"

say "done"
