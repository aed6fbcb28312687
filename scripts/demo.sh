#!/usr/bin/env bash
# `make demo`: verifies the real AMD SEV-SNP evidence in attestation/testdata with
# the hsev CLI and prints each verdict; then tells the attested disk-key
# story in a temporary folder, with a simulated AMD Secure Processor:
#
#   1. hsev-kbs (development mode: it trusts that simulated platform) and
#      hsevd (which registers disk keys there) start;
#   2. an SEV-SNP VM is created with a LUKS2 disk: hsevd formats it with a
#      fresh random key, registers the key at the key broker for the VM's
#      expected measurement, and forgets it;
#   3. the guest's agent attests (RCAR), gets the key, unlocks and mounts
#      the disk and writes to it; after a reboot it reads that back;
#   4. the host tampers with the initrd; the next boot measures differently
#      and the key broker refuses, saying why;
#   5. the key broker's audit chain is verified; everything is cleaned up.
#
# Whatever happens, the last line is one JSON object, and the exit status is
# 0 only if the first three are true:
#   {"unlocked": bool, "data_survived_reboot": bool, "tampered_refused": bool,
#    "refusal_reason": string}
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
hsev="$root/target/debug/hsev"
testdata=${HSEV_TESTDATA:-$root/attestation/testdata/snp}
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


echo "### Attested disk-key release (simulated AMD Secure Processor: NO confidentiality)"
hsevd="$root/target/debug/hsevd"
kbs="$root/target/debug/hsev-kbs"
image="$root/images/out"
[ -f "$image/manifest.json" ] || { echo "demo: the guest image is missing: run \`make image\`" >&2; exit 1; }
work=$(mktemp -d)
token=demo-admin-token
kbs_token=demo-kbs-admin-token
unlocked=false survived=false refused=false reason=""
cleanup() {
  local status=$?
  for pid in "${daemon_pid:-}" "${kbs_pid:-}"; do
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  done
  # VMs outlive hsevd by design: stop any the demo left behind.
  pgrep -f "$work/state/vms" | xargs -r kill -9 2>/dev/null || true
  rm -rf "$work"
  echo
  python3 -c 'import json, sys
print(json.dumps({"unlocked": sys.argv[1] == "true", "data_survived_reboot": sys.argv[2] == "true",
                  "tampered_refused": sys.argv[3] == "true", "refusal_reason": sys.argv[4]}))' \
    "$unlocked" "$survived" "$refused" "$reason"
  if [ "$status" = 0 ] && [ "$unlocked$survived$refused" != truetruetrue ]; then status=1; fi
  exit "$status"
}
trap cleanup EXIT
sha256() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
step() { echo; echo "## $*"; }

# wait_console VM PATTERN COUNT: until PATTERN shows COUNT times on the console.
wait_console() {
  for _ in $(seq 1 360); do
    [ "$("$hsev" vm console "$1" | grep -cE "$2")" -ge "$3" ] && return 0
    sleep 0.5
  done
  echo "demo: no \"$2\" (x$3) on the console of $1" >&2
  "$hsev" vm console "$1" | tail -30 >&2
  return 1
}
# console_of VM: the guest's console, as hsevd logged it.
console_of() { "$hsev" vm console "$1"; }
# console_has VM PATTERN: the console matches PATTERN (no early-closed pipe).
console_has() { grep -qE "$2" <<<"$(console_of "$1")"; }

step "1. a simulated AMD Secure Processor, the key broker (hsev-kbs) and hsevd"
"$hsev" firmware sim init --dir "$work/sim" >/dev/null
"$kbs" init --state-dir "$work/kbs" >/dev/null
printf '%s\n' "$kbs_token" >"$work/kbs-admin.token"
cat >"$work/kbs.toml" <<EOF
listen = "127.0.0.1:0"
state_dir = "$work/kbs"
mode = "development"
simulated_roots = ["$work/sim"]
[[admin_tokens]]
name = "hsevd"
sha256 = "$(sha256 "$kbs_token")"
EOF
"$kbs" serve --config "$work/kbs.toml" >"$work/kbs.out" 2>"$work/kbs.log" &
kbs_pid=$!
for _ in $(seq 1 300); do grep -q '^hsev-kbs listening on ' "$work/kbs.out" && break; sleep 0.1; done
kbs_url=$(sed -n 's/^hsev-kbs listening on //p' "$work/kbs.out")
[ -n "$kbs_url" ] || { cat "$work/kbs.log"; exit 1; }
echo "hsev-kbs at $kbs_url, development mode: trusts the simulated platform in $work/sim"
cat >"$work/hsevd.toml" <<EOF
state_dir = "$work/state"
[firmware]
simulated_dir = "$work/sim"
[key_broker]
url = "$kbs_url"
admin_token_file = "$work/kbs-admin.token"
[[tokens]]
name = "demo"
role = "admin"
sha256 = "$(sha256 "$token")"
EOF
"$hsevd" --config "$work/hsevd.toml" >"$work/hsevd.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 600); do [ -S "$work/state/hsevd.sock" ] && break; sleep 0.1; done
[ -S "$work/state/hsevd.sock" ] || { cat "$work/hsevd.log"; exit 1; }
unset HSEV_CONFIG
export HSEV_ENDPOINT="unix://$work/state/hsevd.sock" HSEV_TOKEN="$token" XDG_CONFIG_HOME="$work"
"$hsev" image import debian --from "$image"

step "2. an SEV-SNP VM with a LUKS2 disk whose random key only the key broker holds"
"$hsev" vm create vault --image debian --vcpus 1 --memory 512 --mode sev-snp --encrypted-disk 32 --start

step "3. first boot: the agent attests, gets the key, unlocks and mounts the disk, writes to it"
wait_console vault 'HSEV-DISK-UNLOCKED|HSEV-KBS-REFUSED' 1
console_of vault | grep -E 'hsev-agent|HSEV-DISK|HSEV-KBS' || true
if console_has vault 'HSEV-DISK-UNLOCKED .*boot=1'; then unlocked=true; fi
"$hsev" vm show vault | grep -E 'measurement|attestation|encrypted disk'

step "   reboot: the second boot reads back what the first wrote on the encrypted disk"
"$hsev" vm reboot vault >/dev/null
wait_console vault 'HSEV-DISK-UNLOCKED|HSEV-KBS-REFUSED' 2
console_of vault | grep -E 'hsev-agent: boot log|HSEV-DISK' | tail -3 || true
if console_has vault 'HSEV-DISK-UNLOCKED .*boot=2' &&
  [ "$(console_of vault | grep -c 'hsev-agent: boot log: boot=1 ')" -ge 2 ]; then
  survived=true
fi

step "4. the host tampers with the initrd (appends one file) and boots the VM again"
"$hsev" vm stop vault --force >/dev/null
initrd=$(find "$work/state/images" -name initrd.img)
(cd "$work" && echo "the host was here" >tampered && echo tampered | cpio --quiet -o -H newc >>"$initrd")
"$hsev" vm start vault >/dev/null
wait_console vault 'HSEV-DISK-UNLOCKED|HSEV-KBS-REFUSED' 3
console_of vault | grep 'HSEV-KBS-REFUSED' | tail -1 || true
"$hsev" vm show vault | grep -E 'measurement|attestation'
verdict=$("$hsev" vm show vault --output json |
  python3 -c 'import json, sys; a = json.load(sys.stdin)["attestation"]; print(a["state"]); print(a["reason"])')
if [ "$(sed -n 1p <<<"$verdict")" = refused ] && ! console_has vault 'HSEV-DISK-UNLOCKED .*boot=3'; then
  refused=true
  reason=$(sed -n '2,$p' <<<"$verdict")
fi

step "5. the key broker's audit log: every attestation, release and refusal, hash-chained"
"$kbs" audit verify --state-dir "$work/kbs"
"$hsev" vm stop vault --force >/dev/null
"$hsev" vm delete vault --yes >/dev/null
