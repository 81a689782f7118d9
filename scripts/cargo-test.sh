#!/usr/bin/env bash
# Runs `cargo test` with the given arguments and closes with one line summing every test binary's
# results ("tests: N passed, N failed, N skipped"), so the outcome is readable at a glance and by CI.
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
read -r passed failed ignored < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } } END { print p+0, f+0, s+0 }' "$log")
echo
echo "tests: ${passed} passed, ${failed} failed, ${ignored} skipped"
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  echo "cargo test exited with status $status before all tests ran (build error?)" >&2
fi
exit "$status"
