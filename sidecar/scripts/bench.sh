#!/usr/bin/env bash
# Benchmarks `kybernate-sidecar push` against `tar cf` of the same bundle directory:
#   - tar cf to a file (the baseline),
#   - push to a filesystem store (plain tar and zstd),
#   - push to s3s-fs on loopback (plain tar and zstd; multipart, parallel parts),
#   - pull back from the filesystem store (download + verify + safe extract),
#   - each push and pull again with encryption at rest (XChaCha20-Poly1305 STREAM, a key from
#     `kybernate-sidecar keygen`), right after its unencrypted twin, printed as a ratio
#     (encrypted / plain) of time and peak RSS.
# Reports seconds, MB/s (bundle bytes / wall time), peak RSS (/usr/bin/time -v) and the ratio of each
# run's time to tar's (plain `tar cf`, and `tar cf` followed by an fsync of the archive, since the
# stores fsync what they write). Page cache is warmed first, so all runs read the bundle from memory.
# s3s-fs runs on the same machine, so the S3 numbers include the server's own work (it writes every
# part, then concatenates them into the object).
#
# Environment:
#   SIZE       bundle size (default 2G; IEC suffixes: 512M, 2G, …)
#   BENCH_DIR  scratch directory (default: a new directory under /var/tmp; removed afterwards)
#   SIDECAR    kybernate-sidecar binary (default: cargo build --release -p kybernate-sidecar)
#   PART_MIB   S3 part size in MiB (default 16), CONCURRENCY parallel parts (default 4)
# Used by `make bench`.
set -euo pipefail

SIZE=${SIZE:-2G}
PART_MIB=${PART_MIB:-16}
CONCURRENCY=${CONCURRENCY:-4}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
say() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

bytes=$(numfmt --from=iec "$SIZE") || die "SIZE=$SIZE is not a size (use e.g. 512M or 2G)"
[ "$bytes" -ge $((64 << 20)) ] || die "SIZE must be at least 64M"

if [ ! -x /usr/bin/time ]; then
  [ "$(id -u)" = 0 ] || die "/usr/bin/time is missing; install the 'time' package (apt-get install time)"
  say "installing the 'time' package for peak RSS measurements"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
fi
"$here/install-s3s-fs.sh" >&2
s3s=$(command -v s3s-fs || echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs")

if [ -z "${SIDECAR:-}" ]; then
  say "building kybernate-sidecar (release)"
  (cd "$repo" && cargo build --release -q -p kybernate-sidecar)
  SIDECAR="${CARGO_TARGET_DIR:-$repo/target}/release/kybernate-sidecar"
fi
[ -x "$SIDECAR" ] || die "no kybernate-sidecar binary at $SIDECAR"

work=${BENCH_DIR:-$(mktemp -d /var/tmp/kybernate-bench.XXXXXX)}
mkdir -p "$work"
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -z "${BENCH_DIR:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
need=$((bytes * 5 / 1024 + 1048576))
avail=$(df -Pk "$work" | awk 'NR==2 {print $4}')
[ "$avail" -ge "$need" ] || die "$work has $((avail / 1024)) MiB free; the benchmark needs about $((need / 1024)) MiB"

# A bundle like the shim's: CRIU images in 256 MiB files, half random (incompressible, like GPU
# memory of a trained model), half repetitive text (compressible, like zeroed or sparse pages).
ckpt="$work/ckpt"
rel="bench/pod-0/ctr/2024-01-01T00:00:00.000Z"
bundle="$ckpt/$rel"
mkdir -p "$bundle/checkpoint"
say "creating a $(numfmt --to=iec "$bytes") bundle in $bundle"
chunk=$((256 << 20)); left=$bytes; i=0
while [ "$left" -gt 0 ]; do
  n=$(( left < chunk ? left : chunk ))
  if [ $((i % 2)) = 0 ]; then
    head -c "$n" /dev/urandom >"$bundle/checkpoint/pages-$i.img"
  else
    (set +o pipefail; yes "kybernate checkpoint page $i 0000000000000000" | head -c "$n") >"$bundle/checkpoint/pages-$i.img"
  fi
  left=$((left - n)); i=$((i + 1))
done
# Seal it as checkpoint-core does (docs/bundle-format.md): every file's size and sha256 in
# kybernate.json, then COMPLETE holding the manifest's own sha256; pulls verify both.
{
  printf '{"format_version":1,"created":"2024-01-01T00:00:00.000Z",'
  printf '"host":{"criu_version":"4.1.1","runc_version":null,"kernel":"%s","arch":"%s"},' "$(uname -r)" "$(uname -m)"
  printf '"container":{"namespace":"bench","pod":"pod-0","name":"ctr","id":"ctr","image":null},'
  printf '"checkpoint":null,"gpu":null,"files":{'
  sep=""
  while read -r f; do
    printf '%s"%s":{"size":%s,"sha256":"%s"}' "$sep" "$f" "$(stat -c %s "$bundle/$f")" "$(sha256sum "$bundle/$f" | cut -d' ' -f1)"
    sep=","
  done < <(cd "$bundle" && find . -type f ! -name kybernate.json ! -name COMPLETE | sed 's|^\./||' | sort)
  printf '}}'
} >"$bundle/kybernate.json"
printf 'kybernate.json sha256:%s\n' "$(sha256sum "$bundle/kybernate.json" | cut -d' ' -f1)" >"$bundle/COMPLETE"
tar cf /dev/null -C "$ckpt" "$rel"   # warm the page cache

results="$work/results.tsv"
: >"$results"
# run NAME COMMAND...: times COMMAND, records seconds and peak RSS.
run() {
  local name=$1; shift
  sync
  say "running: $name"
  /usr/bin/time -v -o "$work/time.txt" "$@" >/dev/null 2>"$work/stderr.txt" ||
    { cat "$work/stderr.txt" >&2; die "$name failed"; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$work/time.txt" |
    awk -F: '{ if (NF == 3) print $1*3600 + $2*60 + $3; else print $1*60 + $2 }')
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time.txt")
  printf '%s\t%s\t%s\n' "$name" "$wall" "$rss" >>"$results"
}

sidecar=("$SIDECAR" --config /dev/null --checkpoint-dir "$ckpt")
export RUST_LOG=warn
key="$work/bench.key"
"$SIDECAR" keygen --out "$key" >/dev/null
enc=(--encryption-key-file "$key")

run "tar cf (baseline)" tar cf "$work/bundle.tar" -C "$ckpt" "$rel"
rm -f "$work/bundle.tar"
# The stores fsync what they write; tar does not. This second baseline does.
run "tar cf + fsync" sh -c 'tar cf "$1" -C "$2" "$3" && sync "$1"' sh "$work/bundle.tar" "$ckpt" "$rel"
rm -f "$work/bundle.tar"

store="file://$work/store"
run "push fs store, tar" "${sidecar[@]}" --store "$store" --compression none push --force "$bundle"
run "push fs store, tar +enc" "${sidecar[@]}" "${enc[@]}" --store "$store" --compression none push --force "$bundle"
run "pull fs store, tar" "${sidecar[@]}" --store "$store" pull "$store/$rel.tar" "$work/pulled"
rm -rf "$work/pulled"
run "pull fs store, tar +enc" "${sidecar[@]}" "${enc[@]}" --store "$store" pull "$store/$rel.tar.kenc" "$work/pulled"
rm -rf "$work/pulled" "$work/store"
run "push fs store, zstd" "${sidecar[@]}" --store "$store" --compression zstd push --force "$bundle"
run "push fs store, zstd +enc" "${sidecar[@]}" "${enc[@]}" --store "$store" --compression zstd push --force "$bundle"
rm -rf "$work/store"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/s3/bench"
"$s3s" --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench-secret "$work/s3" >/dev/null 2>&1 &
server_pid=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
s3=(--store s3://bench/run --s3-endpoint "http://127.0.0.1:$port" --s3-part-size-mib "$PART_MIB" --s3-concurrency "$CONCURRENCY")
run "push s3s-fs, tar" "${sidecar[@]}" "${s3[@]}" --compression none push --force "$bundle"
run "push s3s-fs, tar +enc" "${sidecar[@]}" "${enc[@]}" "${s3[@]}" --compression none push --force "$bundle"
run "push s3s-fs, zstd" "${sidecar[@]}" "${s3[@]}" --compression zstd push --force "$bundle"
run "push s3s-fs, zstd +enc" "${sidecar[@]}" "${enc[@]}" "${s3[@]}" --compression zstd push --force "$bundle"

mb=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1e6 }')
printf '\nbundle: %s MB (%s), %s, part size %s MiB x %s parallel, %s cores\n' \
  "$mb" "$(numfmt --to=iec "$bytes")" "$(uname -m)" "$PART_MIB" "$CONCURRENCY" "$(nproc)"
awk -F'\t' -v b="$bytes" '
  function ratio(x, y) { return x / (y > 0 ? y : 0.001) }
  FNR == NR { if (FNR == 1) tar = $2; if (FNR == 2) synced = $2; next }
  { printf "%-27s %8.2f s %9.1f MB/s %8.1f MiB RSS  %5.2fx tar  %5.2fx tar+fsync\n", $1, $2, ratio(b / 1e6, $2), $3 / 1024, ratio($2, tar), ratio($2, synced) }
' "$results" "$results"
printf '\nencryption at rest (encrypted / plain, same run):\n'
awk -F'\t' '
  function ratio(x, y) { return x / (y > 0 ? y : 0.001) }
  { wall[$1] = $2; rss[$1] = $3; order[NR] = $1 }
  END {
    for (i = 1; i <= NR; i++) {
      name = order[i]
      if (name !~ / \+enc$/) continue
      plain = substr(name, 1, length(name) - 5)
      printf "%-22s %5.2fx time  %5.2fx peak RSS  (+%.1f MiB)\n", plain, ratio(wall[name], wall[plain]), ratio(rss[name], rss[plain]), (rss[name] - rss[plain]) / 1024
    }
  }
' "$results"
