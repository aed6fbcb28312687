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

echo "== launch measurement vs sev-snp-measure"
bash scripts/bench-measure.sh
