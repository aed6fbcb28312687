#!/usr/bin/env bash
# `make demo`: verifies the real AMD SEV-SNP evidence in shared/testdata with
# the hsev CLI and prints each verdict, then computes the launch measurement
# of a 4-vCPU SNP guest on Debian's OVMF.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
hsev="$root/target/debug/hsev"
testdata=${HSEV_TESTDATA:-$root/../shared/testdata/snp}
reports="$testdata/reports"
[ -d "$reports" ] || { echo "demo: the real AMD evidence is expected in $testdata (set HSEV_TESTDATA)" >&2; exit 1; }
# The evidence is judged at a fixed time inside every certificate's validity;
# the VLEK-signed vector is also judged today, when its VLEK has expired.
pinned=2025-06-01T00:00:00Z

verdict() {
  local title=$1
  shift
  echo
  echo "### $title"
  set +e
  "$hsev" attest verify "$@"
  local status=$?
  set -e
  echo "exit status $status"
}

verdict "Milan v2, VCEK-signed" --report "$reports/milan-v2-a.report.bin" --vcek "$reports/milan-v2-a.vcek.der" --at "$pinned"
verdict "Milan v2, another chip" --report "$reports/milan-v2-b.report.bin" --vcek "$reports/milan-v2-b.vcek.der" --at "$pinned"
verdict "Milan v2, debug policy: refused" --report "$reports/milan-v2-c.report.bin" --vcek "$reports/milan-v2-c.vcek.der" --at "$pinned"
verdict "Milan v3, VLEK-signed, at $pinned" --report "$reports/milan-v3-vlek.report.bin" --vlek "$reports/milan-v3-vlek.vlek.der" --at "$pinned"
verdict "Milan v3, VLEK-signed, today" --report "$reports/milan-v3-vlek.report.bin" --vlek "$reports/milan-v3-vlek.vlek.der"
verdict "Genoa v3, Trustee KBS JSON evidence" --report "$reports/genoa-v3-json.evidence.json" --at "$pinned"

echo
echo "### Expected launch measurement: SNP guest, 4 x EPYC-v4, Debian OVMF"
"$hsev" measure --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf /usr/share/ovmf/OVMF.fd --verbose
