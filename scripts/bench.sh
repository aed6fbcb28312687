#!/usr/bin/env bash
# `make bench`: every benchmark the issues name, each printed beside its
# reference measured in the same run on the same machine, as a ratio.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export HSEV_TESTDATA=${HSEV_TESTDATA:-$root/attestation/testdata/snp}
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

echo "== hsevd: VM start latency through the qemu and the libvirt driver (beside a bare QEMU), vm list with 1000 VMs, resident memory"
cargo build --quiet --release --bins
cargo bench --quiet -p hsev-e2e --bench hsevd 2>/dev/null | grep -v '^$'

echo "== SlapOS: slapos request to connection parameters published through the connector, vs hsev vm create --start of the same VM"
cargo bench --quiet -p hsev-e2e --bench slapos 2>/dev/null | grep -v '^$'

echo "== key broker: full releases through hsev-kbs (auth + attest + resource + decrypt, simulated evidence per nonce) vs OpenSSL raw ECDSA P-384 verify"
cargo bench --quiet -p hsev-attestation --bench kbs_release >/dev/null 2>&1 || true
kbs_out=$(BENCH_SECONDS=$seconds cargo bench --quiet -p hsev-attestation --bench kbs_release 2>/dev/null || true)
kbs_rate=$(awk '/^kbs_releases_per_second/ {print $2}' <<<"$kbs_out")
kbs_p50=$(awk '/^kbs_release_p50_ms/ {print $2}' <<<"$kbs_out")
kbs_p99=$(awk '/^kbs_release_p99_ms/ {print $2}' <<<"$kbs_out")
kbs_verify=$(openssl speed -seconds "$seconds" ecdsap384 2>/dev/null | awk '/ecdsa \(nistp384\)/ {print $NF}')
awk -v ours="${kbs_rate:-0}" -v ref="${kbs_verify:-1}" -v p50="${kbs_p50:-0}" -v p99="${kbs_p99:-0}" 'BEGIN {
  printf "kbs releases: %.0f/s, openssl %.0f verify/s, ratio %.1f%% (target >= 40%%); one release p50 %.2f ms, p99 %.2f ms (target < 25 ms)\n", ours, ref, 100 * ours / ref, p50, p99
}'
