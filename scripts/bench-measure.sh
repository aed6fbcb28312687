#!/usr/bin/env bash
# Times `hsev measure` (release build) against sev-snp-measure 0.0.13 on the
# same inputs, N runs each (default 20; `scripts/bench-measure.sh 50` or
# N=50), and prints the mean wall time of one run and the ratio:
#
#   measure: hsev 12.3 ms, sev-snp-measure 210.0 ms, hsev is 17.1x faster
#
# Cases: SNP on Debian's OVMF.fd with 4 EPYC-v4 vCPUs; and SNP direct boot
# (kernel, initrd, cmdline) on a generated firmware image carrying an
# SNP_KERNEL_HASHES section. Both tools must print the same measurement
# first, or the script fails.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-${N:-20}}
hsev="$root/target/release/hsev"
reference="$root/.tools/venv/bin/sev-snp-measure"
python="$root/.tools/venv/bin/python3"
ovmf=/usr/share/ovmf/OVMF.fd

die() { printf 'bench-measure: %s\n' "$*" >&2; exit 1; }

[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "the number of runs must be a positive integer, not '$runs'"
[ -x "$reference" ] || die "sev-snp-measure is missing at $reference (run \`make deps\`)"
[ -f "$ovmf" ] || die "$ovmf is missing (run \`make deps\`)"
# Build the release binary if it is missing, or older than its sources.
if [ ! -x "$hsev" ] || [ -n "$(find "$root/attestation/src" "$root/xapi/src" -newer "$hsev" -name '*.rs' -print -quit)" ]; then
  printf 'bench-measure: building %s\n' "$hsev" >&2
  (cd "$root" && cargo build --release --quiet --bin hsev)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A 2 MiB firmware image with the OVMF footer table, SEV metadata (including
# SNP_KERNEL_HASHES) and an SEV hashes table entry; a 8 MiB "kernel" and a
# 16 MiB "initrd".
"$python" - "$work" <<'EOF'
import os, struct, sys, uuid
work = sys.argv[1]
guid = lambda text: uuid.UUID(text).bytes_le
size = 0x20_0000
image = bytearray(os.urandom(size))
sections = [(0x80_0000, 0x9000, 1), (0x80_9000, 0x1000, 2), (0x80_a000, 0x1000, 3),
            (0x80_b000, 0x1000, 0x10), (0x80_c000, 0x14000, 1)]
metadata = b"ASEV" + struct.pack("<III", 16 + 12 * len(sections), 1, len(sections))
metadata += b"".join(struct.pack("<III", *section) for section in sections)
image[size - 0x2000:size - 0x2000 + len(metadata)] = metadata
entries = [("7255371f-3a3b-4b04-927b-1da6efa8d454", struct.pack("<II", 0x80_b000, 0x400)),
           ("00f771de-1a7e-4fcb-890e-68c77e2fb44e", struct.pack("<I", 0x80_b004)),
           ("dc886566-984a-4798-a75e-5585a7bf67cc", struct.pack("<I", 0x2000))]
table = b"".join(data + struct.pack("<H", len(data) + 18) + guid(g) for g, data in entries)
table += struct.pack("<H", len(table) + 18) + guid("96b582de-1fb2-45f7-baea-a366c55a082d")
image[size - 32 - len(table):size - 32] = table
open(os.path.join(work, "ovmf-kernel-hashes.fd"), "wb").write(image)
open(os.path.join(work, "vmlinuz"), "wb").write(os.urandom(8 << 20))
open(os.path.join(work, "initrd.img"), "wb").write(os.urandom(16 << 20))
EOF

# Mean wall time of one run of "$@", in milliseconds.
mean_ms() {
  local start end
  start=$(date +%s%N)
  for ((i = 0; i < runs; i++)); do
    "$@" >/dev/null
  done
  end=$(date +%s%N)
  awk -v ns="$((end - start))" -v n="$runs" 'BEGIN { printf "%.1f", ns / n / 1e6 }'
}

bench() {
  local label=$1
  shift
  local ours theirs
  ours=$("$hsev" measure "$@") || die "hsev measure $* failed"
  theirs=$("$reference" "$@") || die "sev-snp-measure $* failed"
  [ "$ours" = "$theirs" ] || die "measurements differ for $*: hsev $ours, sev-snp-measure $theirs"
  local hsev_ms reference_ms
  hsev_ms=$(mean_ms "$hsev" measure "$@")
  reference_ms=$(mean_ms "$reference" "$@")
  awk -v label="$label" -v a="$hsev_ms" -v b="$reference_ms" 'BEGIN {
    printf "%s: hsev %.1f ms, sev-snp-measure %.1f ms, hsev is %.1fx faster\n", label, a, b, (a > 0 ? b / a : 0)
  }'
}

printf 'bench-measure: %d runs per tool and case\n' "$runs"
bench "measure" \
  --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf "$ovmf"
bench "measure (kernel hashes)" \
  --mode snp --vcpus 4 --vcpu-type EPYC-v4 --ovmf "$work/ovmf-kernel-hashes.fd" \
  --kernel "$work/vmlinuz" --initrd "$work/initrd.img" --append "console=ttyS0 root=/dev/vda1"
