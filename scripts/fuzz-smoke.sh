#!/usr/bin/env bash
# Fuzzes every target for a while, seeded with the real AMD evidence; fails
# on the first panic or sanitizer report. Usage: fuzz-smoke.sh [SECONDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-30}
testdata=${HSEV_TESTDATA:-$root/attestation/testdata/snp}
export PATH="$root/.tools/cargo/bin:$PATH"
# cargo-fuzz needs nightly-only compiler flags (sanitizers, coverage); the
# project's toolchain is stable, and RUSTC_BOOTSTRAP allows them.
export RUSTC_BOOTSTRAP=1

cd "$root/attestation/fuzz"

# Seeds: each real vector behind the selector byte of its parser, and a
# well-formed report request for the channel.
corpus=corpus/parse_evidence
mkdir -p "$corpus" corpus/channel_relay
seed() { { printf "\\x$(printf %02x "$1")"; cat "$2"; } >"$corpus/seed-$1-$(basename "$2")"; }
for report in "$testdata"/reports/*.report.bin; do seed 0 "$report"; done
seed 1 "$testdata/reports/genoa-v3-json.evidence.json"
for certificate in "$testdata"/reports/*.der; do seed 2 "$certificate"; done
{ printf 'HSEV\x01\x02\x00\x00\x44\x00\x00\x00'; head -c 68 /dev/zero; } >corpus/channel_relay/seed-extended-report

log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in parse_evidence channel_relay; do
  echo "fuzz-smoke: $target for ${seconds}s"
  status=0
  cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(Done|stat::number_of_executed_units)' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$log"
    echo "fuzz-smoke: $target FAILED with status $status (crash inputs in attestation/fuzz/artifacts/$target/)"
    exit "$status"
  fi
done
echo "fuzz-smoke: no crash in ${seconds}s per target"
