#!/usr/bin/env bash
# `make demo`: verifies the real AMD SEV-SNP evidence in shared/testdata with
# the hsev CLI and prints each verdict; then runs hsevd with a simulated-SNP
# host in a temporary folder, imports the guest image, creates and boots an
# SEV-SNP VM, shows its expected measurement beside the launch digest the
# Secure Processor computed and its console up to the guest's marker line,
# then stops and deletes it and cleans up.
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
echo "### A confidential VM on hsevd (simulated AMD Secure Processor: NO confidentiality)"
hsevd="$root/target/debug/hsevd"
image="$root/images/out"
[ -f "$image/manifest.json" ] || { echo "demo: the guest image is missing: run \`make image\`" >&2; exit 1; }
work=$(mktemp -d)
token=demo-admin-token
cleanup() {
  local status=$?
  if [ -n "${daemon_pid:-}" ]; then kill "$daemon_pid" 2>/dev/null || true; fi
  # VMs outlive hsevd by design: stop any the demo left behind.
  pgrep -f "$work/state/vms" | xargs -r kill -9 2>/dev/null || true
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
{
  echo "state_dir = \"$work/state\""
  echo "[firmware]"
  echo "simulated_dir = \"$work/sim\""
  echo "[[tokens]]"
  echo "name = \"demo\""
  echo "role = \"admin\""
  echo "sha256 = \"$(printf %s "$token" | sha256sum | cut -d' ' -f1)\""
} >"$work/hsevd.toml"
"$hsevd" --config "$work/hsevd.toml" >"$work/hsevd.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 600); do [ -S "$work/state/hsevd.sock" ] && break; sleep 0.1; done
[ -S "$work/state/hsevd.sock" ] || { cat "$work/hsevd.log"; exit 1; }
unset HSEV_CONFIG
export HSEV_ENDPOINT="unix://$work/state/hsevd.sock" HSEV_TOKEN="$token" XDG_CONFIG_HOME="$work"
"$hsev" host list
"$hsev" image import debian --from "$image"
"$hsev" vm create demo --image debian --vcpus 2 --memory 512 --mode sev-snp --start
echo
echo "### Console of the guest, up to its marker line"
for _ in $(seq 1 240); do
  if "$hsev" vm console demo | grep -q HSEV-GUEST-READY; then break; fi
  sleep 0.5
done
"$hsev" vm console demo | sed -n '/HSEV-GUEST-READY/q;p' | tail -15
"$hsev" vm console demo | grep -m1 HSEV-GUEST-READY || { echo "demo: the guest did not reach its marker" >&2; exit 1; }
echo
"$hsev" vm stop demo --force
"$hsev" vm delete demo --yes
echo "demo: done"
