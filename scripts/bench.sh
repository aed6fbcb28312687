#!/usr/bin/env bash
# `make bench`: every benchmark the issues name, each printed beside its
# reference measured in the same run on the same machine, as a ratio.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export HSEV_TESTDATA=${HSEV_TESTDATA:-$root/../shared/testdata/snp}
seconds=${BENCH_SECONDS:-5}

echo "== report verification (one core, chain cached) vs OpenSSL raw ECDSA P-384 verify"
cargo bench --quiet -p hsev-attestation --bench verify >/dev/null 2>&1 || true
ours=$(BENCH_SECONDS=$seconds cargo bench --quiet -p hsev-attestation --bench verify 2>/dev/null | awk '/^verify_per_second/ {print $2}')
openssl_rate=$(openssl speed -seconds "$seconds" ecdsap384 2>/dev/null | awk '/ecdsa \(nistp384\)/ {print $NF}')
awk -v ours="$ours" -v ref="$openssl_rate" 'BEGIN {
  printf "verify: hsev %.0f reports/s, openssl %.0f verify/s, ratio %.1f%% (target >= 80%%)\n", ours, ref, 100 * ours / ref
}'

echo "== simulated attestation round trips (report from the simulated Secure Processor + verification, one core)"
cargo bench --quiet -p hsev-attestation --bench sim_round_trip >/dev/null 2>&1 || true
round_trips=$(BENCH_SECONDS=$seconds cargo bench --quiet -p hsev-attestation --bench sim_round_trip 2>/dev/null | awk '/^sim_round_trips_per_second/ {print $2}')
sign_rate=$(openssl speed -seconds "$seconds" ecdsap384 2>/dev/null | awk '/ecdsa \(nistp384\)/ {print $(NF-1)}')
awk -v ours="$round_trips" -v sign="$sign_rate" -v verify="$openssl_rate" 'BEGIN {
  bound = 1 / (1 / sign + 1 / verify)
  printf "sim round trips: %.0f/s (target >= 400); one OpenSSL P-384 sign + verify bounds it at %.0f/s: %.1f%% of that\n", ours, bound, 100 * ours / bound
}'

echo "== launch measurement vs sev-snp-measure"
bash scripts/bench-measure.sh

echo "== hsevd: VM start latency, vm list with 1000 VMs, resident memory"
cargo build --quiet --release --bins
cargo bench --quiet -p hsev-e2e --bench hsevd 2>/dev/null | grep -v '^$'
