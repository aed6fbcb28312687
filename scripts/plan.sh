#!/usr/bin/env bash
# Prints, before `make demo` does anything, what it is about to do on this
# machine and roughly how long each step takes, from what is already here:
# missing packages, built binaries, the cached firmware, the guest image.
# The figures are those of a 2-core machine of the project's kind.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

missing=$(bash scripts/deps.sh --check 2>/dev/null | sed -n 's/^deps: missing: \([^ ]*\).*/\1/p' | paste -sd' ') || true
have_binaries=false
if [ -x target/debug/hsevd ] && [ -x target/debug/hsev ] && [ -x target/debug/hsev-kbs ] &&
  [ -x target/release/hsev-agent ]; then
  have_binaries=true
fi
have_firmware=false
if compgen -G ".tools/images/firmware/*/OVMF.fd" >/dev/null; then have_firmware=true; fi
have_image=false
if [ -f images/out/manifest.json ]; then have_image=true; fi

total=0
line() { printf '  %-64s %s\n' "$1" "$2" | sed 's/ *$//'; }
echo "make demo: what happens now"
if [ -n "$missing" ]; then
  line "1. make deps installs $(wc -w <<<"$missing") missing packages and tools" "about 40 s"
  fold -s -w 60 <<<"$missing" | while read -r names; do line "   $names" ""; done
  total=$((total + 40))
else
  line "1. packages and tools: all present" "1 s"
fi
if ! $have_binaries && ! $have_firmware; then
  line "2. side by side: the Rust binaries (debug), the guest agent" "about 150 s"
  line "   (release) and the SEV firmware from edk2's source" ""
  total=$((total + 150))
elif ! $have_binaries; then
  line "2. the Rust binaries (debug) and the guest agent (release)" "about 130 s"
  total=$((total + 130))
elif ! $have_firmware; then
  line "2. the SEV firmware from edk2's source (cached afterwards)" "about 90 s"
  total=$((total + 90))
else
  line "2. binaries and firmware built: cargo rebuilds what changed" "seconds"
fi
if $have_image; then
  line "3. the guest image: checked, rebuilt only if an input changed" "2 s"
else
  line "3. the guest image: kernel, initramfs, expected measurements" "about 10 s"
  total=$((total + 10))
fi
line "4. the demo: real AMD evidence verified, then a tenant's own" "about 30 s"
line "   key broker and checks against its operator, on a QEMU guest" ""
line "   (unlock, own attestation, reboot, tamper, key never on the host)" ""
line "5. a pool of three hosts in network namespaces: three SNP" "about 40 s"
line "   guests placed with their reasons, one host evacuated" ""
total=$((total + 70))
echo "  in all: about $(((total + 30) / 60)) min; its last line is a JSON summary"
echo
