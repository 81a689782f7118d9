#!/usr/bin/env bash
# Kybernate's shim against containerd's stock runc shim and raw CRIU, in one run on a private containerd:
#   - shim memory per container (RSS and PSS of the shim processes) with N idle containers each;
#   - `ctr c checkpoint --task` and `ctr c restore --live` time on the same workload (a shell counter);
#   - stop-to-durable: checkpoint on stop (`ctr t kill` returns once the bundle is sealed and fsynced)
#     of a container holding STOP_GIB GiB of memory, against raw `criu dump` + `sync` of the same
#     program outside a container and against `ctr c checkpoint --task` with the stock shim;
# and the ratios (below 1 means Kybernate is smaller or faster).
#
# Usage (as root, after `make deps`):
#   shim/scripts/bench.sh
#   N=20 ROUNDS=9 STOP_GIB=2 SHIM=/path/to/containerd-shim-kybernate-v1 shim/scripts/bench.sh
# Without SHIM the release binary is built with cargo (honouring CARGO_TARGET_DIR). KEEP=1 keeps the
# work directory (containerd's log, with the shims' logs) for inspection.
#
# containerd runs as PID 1 of its own pid namespace (unshare --pid --mount-proc): the shims it
# daemonizes are re-parented to it, and the kernel reaps whatever is left when it exits, so the
# benchmark leaves no processes or zombies behind even where PID 1 does not reap orphans.
set -euo pipefail

N=${N:-10}
ROUNDS=${ROUNDS:-5}
STOP_GIB=${STOP_GIB:-2}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KYBERNATE=io.containerd.kybernate.v1
STOCK=io.containerd.runc.v2
IMAGE=docker.io/kybernate/bench-busybox:latest
COUNTER='i=0; while :; do i=$((i+1)); echo $i > /state/counter.new; mv /state/counter.new /state/counter; sleep 0.1; done'

die() { echo "bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (containerd, runc and CRIU need it)"
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
for tool in containerd ctr runc criu containerd-shim-runc-v2 busybox sha256sum tar unshare gcc; do
    command -v "$tool" >/dev/null || die "$tool is missing: run \`make deps\`"
done

if [ -z "${SHIM:-}" ]; then
    echo "building containerd-shim-kybernate-v1 (release)..." >&2
    (cd "$REPO" && cargo build --quiet --release -p kybernate-shim --bin containerd-shim-kybernate-v1)
    SHIM="${CARGO_TARGET_DIR:-$REPO/target}/release/containerd-shim-kybernate-v1"
fi
[ -x "$SHIM" ] || die "no shim binary at $SHIM"

WORK=$(mktemp -d /tmp/kybernate-bench.XXXXXX)
SOCK="$WORK/containerd.sock"
NS=bench-$$ # unique: runc state lives under /run/containerd/runc/<namespace>
UNSHARE_PID=""
CONTAINERD_PID=""

ctr_() { ctr --address "$SOCK" --namespace "$NS" "$@"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

cleanup() {
    set +e
    [ -n "${raw_pid:-}" ] && kill -KILL "$raw_pid" 2>/dev/null
    if [ -n "$CONTAINERD_PID" ]; then
        for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
        for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks rm -f "$t" >/dev/null 2>&1; done
        for c in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers rm "$c" >/dev/null 2>&1; done
        kill -TERM "$CONTAINERD_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$CONTAINERD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$CONTAINERD_PID" 2>/dev/null
    fi
    [ -n "$UNSHARE_PID" ] && wait "$UNSHARE_PID" 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then
        rm -rf "$WORK/root" "$WORK/state" "$WORK/xdg"
        echo "kept $WORK (containerd.log)" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# --- a busybox image as an OCI layout (no registry) ---------------------------------------------
build_image() {
    local d="$WORK/image" rootfs="$WORK/image-rootfs"
    mkdir -p "$d/blobs/sha256" "$rootfs/bin" "$rootfs/state" "$rootfs/tmp" "$rootfs/proc" "$rootfs/dev" "$rootfs/sys"
    cp "$(command -v busybox)" "$rootfs/bin/busybox"
    for a in sh sleep echo cat mv; do ln -sf busybox "$rootfs/bin/$a"; done
    tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf "$WORK/layer.tar" .
    local layer size_l config size_c manifest size_m
    layer=$(sha256sum "$WORK/layer.tar" | cut -d' ' -f1); size_l=$(stat -c %s "$WORK/layer.tar")
    mv "$WORK/layer.tar" "$d/blobs/sha256/$layer"
    printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
        "$(case $(uname -m) in x86_64) echo amd64;; aarch64) echo arm64;; *) uname -m;; esac)" "$layer" >"$WORK/config.json"
    config=$(sha256sum "$WORK/config.json" | cut -d' ' -f1); size_c=$(stat -c %s "$WORK/config.json")
    mv "$WORK/config.json" "$d/blobs/sha256/$config"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
        "$config" "$size_c" "$layer" "$size_l" >"$WORK/manifest.json"
    manifest=$(sha256sum "$WORK/manifest.json" | cut -d' ' -f1); size_m=$(stat -c %s "$WORK/manifest.json")
    mv "$WORK/manifest.json" "$d/blobs/sha256/$manifest"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"latest"}}]}' \
        "$manifest" "$size_m" "$IMAGE" >"$d/index.json"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$d/oci-layout"
    tar -C "$d" -cf "$WORK/image.tar" .
}

# --- a private containerd ------------------------------------------------------------------------
mkdir -p "$WORK/bin"
ln -s "$(readlink -f "$SHIM")" "$WORK/bin/containerd-shim-kybernate-v1"
cat >"$WORK/containerd.toml" <<EOF
version = 2
root = "$WORK/root"
state = "$WORK/state"
oom_score = 0
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
EOF
build_image
# containerd 1.6 extracts checkpoints for restore into $XDG_RUNTIME_DIR and never removes them.
mkdir -p "$WORK/xdg"
PATH="$WORK/bin:$PATH" XDG_RUNTIME_DIR="$WORK/xdg" unshare --fork --pid --mount-proc --kill-child \
    containerd --config "$WORK/containerd.toml" >"$WORK/containerd.log" 2>&1 &
UNSHARE_PID=$!
for _ in $(seq 300); do
    CONTAINERD_PID=$(pgrep -P "$UNSHARE_PID" -x containerd || true)
    [ -n "$CONTAINERD_PID" ] && ctr_ version >/dev/null 2>&1 && break
    sleep 0.1
done
ctr_ version >/dev/null 2>&1 || { tail -20 "$WORK/containerd.log" >&2; die "containerd did not start"; }
ctr_ images import "$WORK/image.tar" >/dev/null

# Host pids of this containerd's shims of one kind.
shim_pids() {
    local binary=$1 pid
    for pid in $(pgrep -f -- " -address $SOCK( |$)" || true); do
        [ "$(basename "$(readlink -f "/proc/$pid/exe" 2>/dev/null)")" = "$binary" ] && echo "$pid"
    done
}

# Sums a /proc field (kB) over pids: sum_kb <file> <field> pids...
sum_kb() {
    local file=$1 field=$2 total=0 pid v; shift 2
    for pid in "$@"; do
        v=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/$file" 2>/dev/null || echo 0)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

wait_running() {
    local id=$1
    for _ in $(seq 300); do
        ctr_ tasks ls 2>/dev/null | awk -v id="$id" '$1 == id { print $3 }' | grep -qx RUNNING && return 0
        sleep 0.1
    done
    die "task $id did not start"
}

# The counter of a container, read through containerd's mount namespace.
counter() {
    cat "/proc/$CONTAINERD_PID/root$WORK/state/io.containerd.runtime.v2.task/$NS/$1/rootfs/state/counter" 2>/dev/null || echo 0
}

wait_counter() {
    local id=$1 min=$2
    for _ in $(seq 300); do
        [ "$(counter "$id")" -gt "$min" ] 2>/dev/null && return 0
        sleep 0.1
    done
    die "the counter of $id did not pass $min"
}

remove() {
    ctr_ tasks kill -s SIGKILL "$1" >/dev/null 2>&1 || true
    for _ in $(seq 100); do
        ctr_ tasks ls 2>/dev/null | awk -v id="$1" '$1 == id { print $3 }' | grep -qx RUNNING || break
        sleep 0.1
    done
    ctr_ tasks rm -f "$1" >/dev/null 2>&1 || true
    ctr_ containers rm "$1" >/dev/null 2>&1 || true
}

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

declare -A RSS PSS CKPT RESTORE CONTINUED

# --- memory: N idle containers per runtime ----------------------------------------------------
for rt in "$KYBERNATE" "$STOCK"; do
    tag=$(echo "$rt" | cut -d. -f3)
    binary=containerd-shim-$tag-$(echo "$rt" | cut -d. -f4)
    echo "starting $N idle containers on $rt..." >&2
    for i in $(seq "$N"); do
        ctr_ run -d --runtime "$rt" "$IMAGE" "idle-$tag-$i" sleep 1000000 >/dev/null
    done
    for i in $(seq "$N"); do wait_running "idle-$tag-$i"; done
    sleep 1 # let the shims settle after start-up
    mapfile -t pids < <(shim_pids "$binary")
    [ "${#pids[@]}" -gt 0 ] || die "no $binary processes found"
    RSS[$tag]=$(( $(sum_kb status VmRSS "${pids[@]}") / N ))
    PSS[$tag]=$(( $(sum_kb smaps_rollup Pss "${pids[@]}") / N ))
    echo "  ${#pids[@]} shim processes for $N containers" >&2
    for i in $(seq "$N"); do remove "idle-$tag-$i"; done
done

# --- checkpoint and restore of the same workload (runtimes alternate within each round) -------
declare -A CK_TIMES RS_TIMES
CONTINUED[kybernate]=yes; CONTINUED[runc]=yes
for r in $(seq "$ROUNDS"); do
    for rt in "$KYBERNATE" "$STOCK"; do
        tag=$(echo "$rt" | cut -d. -f3)
        echo "checkpoint/restore round $r on $rt..." >&2
        id="ck-$tag-$r"
        ctr_ run -d --runtime "$rt" "$IMAGE" "$id" sh -c "$COUNTER" >/dev/null
        wait_running "$id"
        wait_counter "$id" 5
        at=$(counter "$id") # before the dump: the restored counter must continue past it
        t0=$(now_ms); ctr_ containers checkpoint --task "$id" "ckimg-$id" >/dev/null; t1=$(now_ms)
        remove "$id"
        t2=$(now_ms); ctr_ containers restore --live "re-$id" "ckimg-$id" >/dev/null; t3=$(now_ms)
        wait_counter "re-$id" 0
        # the restored counter continues (a fresh start would begin at 1)
        [ "$(counter "re-$id")" -gt "$at" ] || CONTINUED[$tag]=no
        CK_TIMES[$tag]+="$((t1 - t0)) "
        RS_TIMES[$tag]+="$((t3 - t2)) "
        remove "re-$id"
        ctr_ images rm --sync "ckimg-$id" >/dev/null 2>&1 || true
    done
done
for tag in kybernate runc; do
    CKPT[$tag]=$(printf '%s\n' ${CK_TIMES[$tag]} | median)
    RESTORE[$tag]=$(printf '%s\n' ${RS_TIMES[$tag]} | median)
done

# --- stop-to-durable of a container holding STOP_GIB GiB ----------------------------------------
# A static program that fills its memory with incompressible data, says so in a file, then idles.
mkdir -p "$WORK/hog"
cat >"$WORK/hog.c" <<'C'
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    size_t n = (size_t)atol(argv[1]) << 30;
    uint64_t *p = malloc(n), x = 88172645463325252ULL;
    if (!p) return 1;
    for (size_t i = 0; i < n / 8; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; p[i] = x; }
    FILE *f = fopen(argv[2], "w");
    fputs("ready\n", f);
    fclose(f);
    for (;;) sleep(1);
}
C
gcc -O2 -static -o "$WORK/hog/hog" "$WORK/hog.c" || die "gcc -static failed (libc6-dev provides libc.a)"
printf 'checkpoint_dir = "%s"\n' "$WORK/checkpoints" >"$WORK/shim.toml"
HOG_MOUNT="type=bind,src=$WORK/hog,dst=/hog,options=rbind:ro"
wait_file() {
    for _ in $(seq 600); do [ -s "$1" ] && return 0; sleep 0.1; done
    die "$1 did not appear"
}
rootfs_of() { echo "/proc/$CONTAINERD_PID/root$WORK/state/io.containerd.runtime.v2.task/$NS/$1/rootfs"; }
sync

# Raw CRIU: dump the same program outside a container, then fsync the image files and their
# directory (`sync FILE...`), as the shim fsyncs the bundle. Run before and after the shim's turn; the
# faster run counts, so page-cache state does not favour either side.
raw_dump() {
    setsid "$WORK/hog/hog" "$STOP_GIB" "$WORK/raw-ready" </dev/null >/dev/null 2>&1 &
    raw_pid=$!
    wait_file "$WORK/raw-ready"
    mkdir -p "$WORK/raw-images"
    local t0 t1
    t0=$(now_ms)
    criu dump -t "$raw_pid" -D "$WORK/raw-images" -o dump.log >/dev/null 2>&1 ||
        die "raw criu dump failed (see $WORK/raw-images/dump.log)"
    sync "$WORK/raw-images"/* "$WORK/raw-images"
    t1=$(now_ms)
    { wait "$raw_pid"; } 2>/dev/null || true
    raw_pid=""
    rm -rf "$WORK/raw-images" "$WORK/raw-ready"; sync
    echo $((t1 - t0))
}
echo "stop-to-durable: raw criu dump + fsync of $STOP_GIB GiB..." >&2
STOP_RAW=$(raw_dump)

echo "stop-to-durable: checkpoint on stop with $KYBERNATE..." >&2
ctr_ run -d --runtime "$KYBERNATE" --runtime-config-path "$WORK/shim.toml" \
    --annotation kybernate.io/checkpoint-on-stop=true --mount "$HOG_MOUNT" "$IMAGE" stop-k /hog/hog "$STOP_GIB" /state/ready >/dev/null
wait_file "$(rootfs_of stop-k)/state/ready"
t0=$(now_ms); ctr_ tasks kill stop-k >/dev/null; t1=$(now_ms)
STOP_K=$((t1 - t0))
STOP_BUNDLE=$(find "$WORK/checkpoints" -name COMPLETE | head -1)
[ -n "$STOP_BUNDLE" ] || die "no sealed bundle after the checkpoint on stop (see containerd.log)"
STOP_BYTES=$(du -sb "$(dirname "$STOP_BUNDLE")" | cut -f1)
remove stop-k
rm -rf "$WORK/checkpoints"; sync
echo "stop-to-durable: raw criu dump + fsync again..." >&2
again=$(raw_dump)
[ "$again" -lt "$STOP_RAW" ] && STOP_RAW=$again

echo "stop-to-durable: ctr c checkpoint --task with $STOCK..." >&2
ctr_ run -d --runtime "$STOCK" --mount "$HOG_MOUNT" "$IMAGE" stop-s /hog/hog "$STOP_GIB" /state/ready >/dev/null
wait_file "$(rootfs_of stop-s)/state/ready"
t0=$(now_ms); ctr_ containers checkpoint --task stop-s stop-s-img >/dev/null; sync; t1=$(now_ms)
STOP_S=$((t1 - t0))
remove stop-s
ctr_ images rm --sync stop-s-img >/dev/null 2>&1 || true

k=kybernate s=runc
echo
echo "Kybernate shim vs containerd-shim-runc-v2 — $(containerd --version | awk '{print $3}'), $(runc --version | head -1), CRIU $(criu --version | awk '/Version/ {print $2}')"
echo "memory: $N idle containers per runtime; checkpoint/restore: median of $ROUNDS rounds (ms)"
printf '%-40s %12s %12s %10s\n' "" "kybernate" "runc-v2" "ratio"
printf '%-40s %12s %12s %10s\n' "shim RSS per container (KiB)" "${RSS[$k]}" "${RSS[$s]}" "$(ratio "${RSS[$k]}" "${RSS[$s]}")"
printf '%-40s %12s %12s %10s\n' "shim PSS per container (KiB)" "${PSS[$k]}" "${PSS[$s]}" "$(ratio "${PSS[$k]}" "${PSS[$s]}")"
printf '%-40s %12s %12s %10s\n' "ctr c checkpoint --task (ms)" "${CKPT[$k]}" "${CKPT[$s]}" "$(ratio "${CKPT[$k]}" "${CKPT[$s]}")"
printf '%-40s %12s %12s %10s\n' "ctr c restore --live (ms)" "${RESTORE[$k]}" "${RESTORE[$s]}" "$(ratio "${RESTORE[$k]}" "${RESTORE[$s]}")"
printf '%-40s %12s %12s\n' "restored counter continued" "${CONTINUED[$k]}" "${CONTINUED[$s]}"
echo
echo "stop-to-durable, $STOP_GIB GiB of memory (ms; bundle $((STOP_BYTES / 1048576)) MiB)"
printf '%-40s %12s\n' "raw criu dump + fsync (best of 2)" "$STOP_RAW"
printf '%-40s %12s %14s\n' "kybernate checkpoint on stop" "$STOP_K" "$(ratio "$STOP_K" "$STOP_RAW")x raw"
printf '%-40s %12s %14s\n' "runc-v2 ctr c checkpoint --task + sync" "$STOP_S" "$(ratio "$STOP_S" "$STOP_K")x ours"
