#!/usr/bin/env bash
# `make demo`: verifies the real AMD SEV-SNP evidence in attestation/testdata with
# the hsev CLI and prints each verdict; then tells the story of a tenant's
# encrypted disk on an operator's host, in a temporary folder, with a
# simulated AMD Secure Processor. Two actors, each with its own credentials:
# the operator (hsevd's admin token, and an operator token at the tenant's
# broker that may only announce VMs) and the tenant (hsevd's tenant token,
# and its own broker's tenant token).
#
#   1. the operator starts hsevd on its host; the tenant starts its own key
#      broker (hsev-kbs, HTTPS, development mode: it trusts the operator's
#      simulated platform) and reads the pin of its TLS key;
#   2. the tenant creates an SEV-SNP VM with an encrypted disk and its
#      broker's URL, pin and repository; hsevd makes the disk empty;
#   3. the operator announces the VM at the broker with the measurement it
#      expects (and is refused when it tries to set a policy); the tenant
#      computes the measurement from its own copy of the image and pins it:
#      the two figures, computed apart, are equal;
#   4. first boot: the agent attests, the broker generates the key and
#      releases it, the agent formats the disk itself and mounts it; the
#      tenant verifies its VM itself (hsev vm attest); after a reboot the
#      guest reads back what it wrote;
#   5. the operator tampers with the initrd; the next boot measures
#      differently and the tenant's broker refuses, saying why;
#   6. the tenant stops its broker, reads the key back from it, and scans
#      the operator's state folder and log for it; the broker's audit chain
#      is verified; everything is cleaned up;
#   7. a pool of three hosts, each its own network namespace: three SNP
#      VMs placed with the coordinator's reasons, one host evacuated, where
#      each VM went (scripts/demo-pool.sh).
#
# Whatever happens, the last line is one JSON object, and the exit status is
# 0 only if unlocked, data_survived_reboot, tampered_refused,
# measurements_equal, tenant_verified and pool_evacuated are true and
# host_saw_key false:
#   {"unlocked": bool, "data_survived_reboot": bool, "tampered_refused": bool,
#    "refusal_reason": string, "measurements_equal": bool,
#    "tenant_verified": bool, "host_saw_key": bool, "pool_evacuated": bool}
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib/hsevd-config.sh"
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


echo "### A tenant's encrypted disk on an operator's host (simulated AMD Secure Processor: NO confidentiality)"
hsevd="$root/target/debug/hsevd"
kbs="$root/target/debug/hsev-kbs"
image="$root/images/out"
[ -f "$image/manifest.json" ] || { echo "demo: the guest image is missing: run \`make image\`" >&2; exit 1; }
work=$(mktemp -d)
mkdir -p "$work/operator" "$work/tenant"
ops_token=demo-operator-hsevd-token
alice_token=demo-tenant-hsevd-token
printf '%s\n' demo-tenant-kbs-token >"$work/tenant/kbs.token"
printf '%s\n' demo-operator-kbs-token >"$work/operator/kbs.token"
unlocked=false survived=false refused=false reason="" equal=false verified=false saw_key=unknown
evacuated=false
cleanup() {
  local status=$?
  for pid in "${daemon_pid:-}" "${kbs_pid:-}"; do
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  done
  # VMs outlive hsevd by design: stop any the demo left behind.
  pgrep -f "$work/operator/state/vms" | xargs -r kill -9 2>/dev/null || true
  rm -rf "$work"
  echo
  python3 -c 'import json, sys
b = lambda value: value == "true"
print(json.dumps({"unlocked": b(sys.argv[1]), "data_survived_reboot": b(sys.argv[2]),
                  "tampered_refused": b(sys.argv[3]), "refusal_reason": sys.argv[4],
                  "measurements_equal": b(sys.argv[5]), "tenant_verified": b(sys.argv[6]),
                  "host_saw_key": sys.argv[7] != "false", "pool_evacuated": b(sys.argv[8])}))' \
    "$unlocked" "$survived" "$refused" "$reason" "$equal" "$verified" "$saw_key" "$evacuated"
  if [ "$status" = 0 ] &&
    [ "$unlocked$survived$refused$equal$verified$saw_key$evacuated" != truetruetruetruetruefalsetrue ]; then
    status=1
  fi
  exit "$status"
}
trap cleanup EXIT
step() { echo; echo "## $*"; }
unset HSEV_CONFIG HSEV_KEY_BROKER HSEV_KEY_BROKER_PIN HSEV_KEY_BROKER_REPOSITORY
export HSEV_ENDPOINT="unix://$work/operator/state/hsevd.sock" XDG_CONFIG_HOME="$work"
# The two actors: each runs hsev with its own hsevd token.
operator() { HSEV_TOKEN=$ops_token "$hsev" "$@"; }
tenant() { HSEV_TOKEN=$alice_token "$hsev" "$@"; }

# wait_console VM PATTERN COUNT: until PATTERN shows COUNT times on the console.
wait_console() {
  for _ in $(seq 1 360); do
    [ "$(tenant vm console "$1" | grep -cE "$2")" -ge "$3" ] && return 0
    sleep 0.5
  done
  echo "demo: no \"$2\" (x$3) on the console of $1" >&2
  tenant vm console "$1" | tail -30 >&2
  return 1
}
# console_of VM: the guest's console, as hsevd logged it.
console_of() { tenant vm console "$1"; }
# console_has VM PATTERN: the console matches PATTERN (no early-closed pipe).
console_has() { grep -qE "$2" <<<"$(console_of "$1")"; }
verdicts='HSEV-DISK-UNLOCKED|HSEV-KBS-REFUSED|HSEV-KBS-WRONG-BROKER'

step "1. operator: hsevd and its simulated Secure Processor; tenant: its own key broker (HTTPS)"
"$hsev" firmware sim init --dir "$work/operator/sim" >/dev/null
cat >"$work/operator/hsevd.toml" <<TOML
state_dir = "$work/operator/state"
$(hsevd_sim_and_tokens "$work/operator/sim" "$ops_token" "$alice_token")
TOML
"$hsevd" --config "$work/operator/hsevd.toml" >"$work/operator/hsevd.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 600); do [ -S "$work/operator/state/hsevd.sock" ] && break; sleep 0.1; done
[ -S "$work/operator/state/hsevd.sock" ] || { cat "$work/operator/hsevd.log"; exit 1; }
operator image import debian --from "$image" >/dev/null
echo "operator: hsevd up, image imported; it hands its simulated platform's roots to its tenants"
cat "$work/operator/sim/ask.pem" "$work/operator/sim/ark.pem" >"$work/tenant/operator-roots.pem"

"$kbs" init --state-dir "$work/tenant/kbs" >/dev/null
cat >"$work/tenant/kbs.toml" <<TOML
listen = "127.0.0.1:0"
state_dir = "$work/tenant/kbs"
mode = "development"
simulated_roots = ["$work/tenant/operator-roots.pem"]
[[admin_tokens]]
name = "alice"
role = "tenant"
repository = "alice"
sha256 = "$(sha256 demo-tenant-kbs-token)"
[[admin_tokens]]
name = "operator"
role = "operator"
sha256 = "$(sha256 demo-operator-kbs-token)"
TOML
"$kbs" serve --config "$work/tenant/kbs.toml" >"$work/tenant/kbs.out" 2>"$work/tenant/kbs.log" &
kbs_pid=$!
for _ in $(seq 1 300); do grep -q '^hsev-kbs listening on ' "$work/tenant/kbs.out" && break; sleep 0.1; done
kbs_url=$(sed -n 's/^hsev-kbs listening on //p' "$work/tenant/kbs.out")
[ -n "$kbs_url" ] || { cat "$work/tenant/kbs.log"; exit 1; }
pin=$("$kbs" fingerprint --config "$work/tenant/kbs.toml")
guest_url="https://10.0.2.2:${kbs_url##*:}"
echo "tenant: hsev-kbs at $kbs_url (the guest reaches it at $guest_url), its key $pin"
broker=(--broker "$kbs_url" --broker-pin "$pin")

step "2. tenant: an SEV-SNP VM with an encrypted disk whose key its own broker will hold"
tenant vm create vault --image debian --vcpus 1 --memory 512 --mode sev-snp --encrypted-disk 32 \
  --key-broker "$guest_url" --key-broker-pin "$pin" --key-broker-repository alice >/dev/null
vm_id=$(tenant vm show vault --output json | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
tenant vm show vault | grep -E 'encrypted|key|measurement' || true

step "3. the expected measurement, computed apart by the operator and by the tenant"
operator kbs announce "${broker[@]}" --broker-token-file "$work/operator/kbs.token" --vm "$vm_id"
operator_figure=$(operator vm show "$vm_id" --output json |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["expected_measurement"])')
echo "the operator's hsevd expects: $operator_figure"
echo "the operator's broker token cannot pin a policy:"
operator kbs policy set "${broker[@]}" --broker-token-file "$work/operator/kbs.token" --repository alice \
  --vm "$vm_id" --image-manifest "$image/manifest.json" --allow-simulated 2>&1 | sed 's/^/  /' || true
tenant_copy="$work/tenant/image"
cp -r "$image" "$tenant_copy"
tenant kbs policy set "${broker[@]}" --broker-token-file "$work/tenant/kbs.token" --repository alice \
  --vm vault --image-manifest "$tenant_copy/manifest.json" --key-broker "$guest_url" --allow-simulated
tenant_figure=$(tenant kbs policy list "${broker[@]}" --broker-token-file "$work/tenant/kbs.token" --output json |
  python3 -c 'import json, sys, tomllib
for resource in json.load(sys.stdin):
    if resource["path"] == "alice/disk-key/" + sys.argv[1]:
        print(tomllib.loads(resource["policy"])["allowed_measurements"][0])' "$vm_id")
echo "the tenant's broker pins: $tenant_figure"
if [ -n "$tenant_figure" ] && [ "$tenant_figure" = "$operator_figure" ]; then
  equal=true
  echo "EQUAL: computed apart, the same figure"
fi

step "4. first boot: the agent attests, the broker generates the key, the agent formats and mounts the disk"
tenant vm start vault >/dev/null
wait_console vault "$verdicts" 1
console_of vault | grep -E 'hsev-agent|HSEV-DISK|HSEV-KBS' || true
if console_has vault 'HSEV-DISK-UNLOCKED .*boot=1'; then unlocked=true; fi
tenant vm show vault | grep -E 'measurement|attestation'

step "   the tenant verifies its VM itself: a fresh nonce, the verdict computed on its side"
wait_console vault 'answering attestation requests' 1
if tenant vm attest vault --image-manifest "$tenant_copy/manifest.json" --key-broker "$guest_url" \
  --key-broker-pin "$pin" --key-broker-repository alice --sim-root "$work/tenant/operator-roots.pem"; then
  verified=true
fi

step "   reboot: the second boot only opens the disk and reads back what the first wrote"
tenant vm reboot vault >/dev/null
wait_console vault "$verdicts" 2
console_of vault | grep -E 'hsev-agent: boot log|HSEV-DISK' | tail -3 || true
if console_has vault 'HSEV-DISK-UNLOCKED .*boot=2' &&
  [ "$(console_of vault | grep -c 'hsev-agent: boot log: boot=1 ')" -ge 2 ] &&
  [ "$(console_of vault | grep -c 'formatting it as LUKS2')" -eq 1 ]; then
  survived=true
fi

step "5. the operator tampers with the initrd (appends one file) and boots the VM again"
operator vm stop "$vm_id" --force >/dev/null
initrd=$(find "$work/operator/state/images" -name initrd.img)
(cd "$work/operator" && echo "the host was here" >tampered && echo tampered | cpio --quiet -o -H newc >>"$initrd")
operator vm start "$vm_id" >/dev/null
wait_console vault "$verdicts" 3
console_of vault | grep 'HSEV-KBS-REFUSED' | tail -1 || true
tenant vm show vault | grep -E 'measurement|attestation'
verdict=$(tenant vm show vault --output json |
  python3 -c 'import json, sys; a = json.load(sys.stdin)["attestation"]; print(a["state"]); print(a["reason"])')
if [ "$(sed -n 1p <<<"$verdict")" = refused ] && ! console_has vault 'HSEV-DISK-UNLOCKED .*boot=3'; then
  refused=true
  reason=$(sed -n '2,$p' <<<"$verdict")
fi
operator vm stop "$vm_id" --force >/dev/null

step "6. did the host ever see the key? the tenant reads it back from its stopped broker and scans the host"
kill "$kbs_pid"
wait "$kbs_pid" 2>/dev/null || true
kbs_pid=""
"$kbs" resource export --config "$work/tenant/kbs.toml" --resource "alice/disk-key/$vm_id" \
  --out "$work/tenant/key.bin"
saw_key=$(python3 - "$work/tenant/key.bin" "$work/operator/state" "$work/operator/hsevd.log" <<'PY'
import base64, os, sys
key = open(sys.argv[1], "rb").read()
forms = [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key),
         base64.urlsafe_b64encode(key).rstrip(b"=")]
paths = [sys.argv[3]] + [os.path.join(top, name) for top, _, names in os.walk(sys.argv[2]) for name in names]
found = []
for path in paths:
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            data = handle.read()
        if any(form in data for form in forms):
            found.append(path)
for path in found:
    print("demo: the key is in " + path, file=sys.stderr)
print("true" if found or len(key) != 32 else "false")
PY
)
echo "scanned the operator's state folder ($(find "$work/operator/state" -type f | wc -l) files) and its log: host_saw_key=$saw_key"
"$kbs" audit verify --state-dir "$work/tenant/kbs"
operator vm delete "$vm_id" --yes >/dev/null

# The pool chapter prints its verdict last; its own namespaces and hosts are
# gone when it returns.
pool_out="$work/pool.out"
bash "$root/scripts/demo-pool.sh" | tee "$pool_out"
if [ "$(tail -1 "$pool_out")" = pool_evacuated=true ]; then evacuated=true; fi
