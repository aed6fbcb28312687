#!/usr/bin/env bash
# `make image`: assembles the guest image artifacts into $IMAGE_OUT
# (default images/out) with a manifest of their sha256 and of the launch
# measurement a guest started from them must show, per vCPU count.
#
# Today the image is the firmware: Debian's OVMF with its SEV metadata
# (OVMF_CODE_4M carries none and cannot be measured; it is never used).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${IMAGE_OUT:-$root/images/out}
hsev=${HSEV:-$root/target/debug/hsev}
ovmf_source=${OVMF:-/usr/share/ovmf/OVMF.fd}
vcpu_type=${VCPU_TYPE:-EPYC-v4}
vcpu_counts=(${VCPU_COUNTS:-1 2 4 8 16})

step() { printf 'image: %s\n' "$*"; }

[ -x "$hsev" ] || { echo "image: $hsev is missing: run \`make build\`" >&2; exit 1; }
[ -f "$ovmf_source" ] || { echo "image: $ovmf_source is missing: run \`make deps\`" >&2; exit 1; }

mkdir -p "$out/firmware"
step "firmware: $ovmf_source"
cp "$ovmf_source" "$out/firmware/OVMF.fd.partial"
mv "$out/firmware/OVMF.fd.partial" "$out/firmware/OVMF.fd"
firmware_sha256=$(sha256sum "$out/firmware/OVMF.fd" | cut -d' ' -f1)

measurements=""
for vcpus in "${vcpu_counts[@]}"; do
  step "expected SNP measurement, $vcpus x $vcpu_type"
  digest=$("$hsev" measure --mode snp --vcpus "$vcpus" --vcpu-type "$vcpu_type" --ovmf "$out/firmware/OVMF.fd")
  measurements+="${measurements:+,}\"$vcpus\": \"$digest\""
done

cat >"$out/manifest.json.partial" <<JSON
{
  "firmware": { "path": "firmware/OVMF.fd", "sha256": "$firmware_sha256" },
  "expected_measurements": {
    "snp": { "vmm_type": "QEMU", "vcpu_type": "$vcpu_type", "guest_features": "0x1", "by_vcpus": { $measurements } }
  }
}
JSON
mv "$out/manifest.json.partial" "$out/manifest.json"
step "manifest: $out/manifest.json"
