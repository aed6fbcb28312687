#!/usr/bin/env bash
# Installs every system package and tool the build, tests, demo and benchmarks
# need, from the package registries only. Idempotent: a second run that finds
# everything in place finishes in about a second.
#
# Debian packages come from bookworm and bookworm-backports through a private
# sources list, so the system's own apt configuration is never edited.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
apt_dir="$tools/apt"
venv="$tools/venv"
sev_snp_measure_version=0.0.13

# Debian packages the project needs, and a file each provides (the check).
declare -A apt_packages=(
  [ovmf]=/usr/share/ovmf/OVMF.fd
  [libssl-dev]=/usr/include/openssl/ssl.h
  [pkg-config]=/usr/bin/pkg-config
  [openssl]=/usr/bin/openssl
  [protobuf-compiler]=/usr/bin/protoc
  # hsevd's store links the system SQLite (3.37 or newer).
  [libsqlite3-dev]=/usr/include/sqlite3.h
  # Guests: QEMU (bookworm-backports, as the preinstalled qemu-utils is),
  # and the tools `make image` assembles the initramfs with (the image's
  # own busybox is a pinned busybox-static .deb; this one is for people).
  [qemu-system-x86]=/usr/bin/qemu-system-x86_64
  [busybox-static]=/bin/busybox
  [cpio]=/bin/cpio
  [xz-utils]=/usr/bin/xz
  [curl]=/usr/bin/curl
  [kmod]=/sbin/depmod
  # `make image` builds the SEV firmware (edk2's OvmfPkg/AmdSev) from source.
  [gcc]=/usr/bin/gcc
  [g++]=/usr/bin/g++
  [make]=/usr/bin/make
  [nasm]=/usr/bin/nasm
  [acpica-tools]=/usr/bin/iasl
  [uuid-dev]=/usr/include/uuid/uuid.h
  [python3]=/usr/bin/python3
  [dosfstools]=/sbin/mkfs.msdos
  [mtools]=/usr/bin/mcopy
  # grub-mkimage (unpacked from grub-common by images/build.sh) links it.
  [libdevmapper1.02.1]=/lib/x86_64-linux-gnu/libdevmapper.so.1.02.1
  # Encrypted data disks: hsevd formats them (LUKS2), and `make image` puts
  # cryptsetup and mke2fs (with the libraries ldd finds) in the initramfs.
  [cryptsetup-bin]=/sbin/cryptsetup
  [e2fsprogs]=/sbin/mke2fs
)

say() { printf 'deps: %s\n' "$*"; }

missing_apt=()
for package in "${!apt_packages[@]}"; do
  [ -e "${apt_packages[$package]}" ] || missing_apt+=("$package")
done

# The guest image's firmware checks the kernel it gets over fw_cfg against
# the measured hashes; without SEV only QEMU >= 10 hands it the unpatched
# kernel (fw_cfg "etc/boot/kernel"). Bookworm's own QEMU is 7.2.
qemu_major=$(/usr/bin/qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
if [ -n "$qemu_major" ] && [ "$qemu_major" -lt 10 ]; then
  missing_apt+=(qemu-system-x86)
fi

if [ ${#missing_apt[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing_apt[*]}"
  mkdir -p "$apt_dir/lists/partial"
  # The system's own Debian mirror, as configured in its deb822 sources.
  mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  security=$(awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  : "${mirror:?no Debian mirror found in /etc/apt/sources.list.d/debian.sources}"
  {
    echo "deb $mirror bookworm main"
    echo "deb $mirror bookworm-updates main"
    echo "deb $mirror bookworm-backports main"
    [ -n "$security" ] && echo "deb $security bookworm-security main"
  } >"$apt_dir/sources.list"
  apt_options=(-o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$apt_dir/lists")
  apt-get "${apt_options[@]}" -qq update
  # dpkg's chatter goes to a log, shown only if the install fails.
  if ! DEBIAN_FRONTEND=noninteractive apt-get "${apt_options[@]}" -qq install -y \
    --no-install-recommends -t bookworm-backports "${missing_apt[@]}" >"$apt_dir/install.log" 2>&1; then
    tail -n 40 "$apt_dir/install.log" >&2
    say "apt-get install failed (log: $apt_dir/install.log)"
    exit 1
  fi
fi

# sev-snp-measure, the reference the measurement tests compare against.
# (pip's output is read whole: `grep -q` on a pipe would stop reading early,
# pip would die of SIGPIPE and pipefail would call it missing every time.)
installed_version=$("$venv/bin/pip" show sev-snp-measure 2>/dev/null || true)
if ! "$venv/bin/sev-snp-measure" --help >/dev/null 2>&1 ||
  ! grep -qx "Version: $sev_snp_measure_version" <<<"$installed_version"; then
  say "installing sev-snp-measure $sev_snp_measure_version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "sev-snp-measure==$sev_snp_measure_version"
fi

# cargo-fuzz, for `make fuzz-smoke`.
cargo_fuzz_version=0.13.2
if ! "$tools/cargo/bin/cargo-fuzz" --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
  say "installing cargo-fuzz $cargo_fuzz_version into $tools/cargo"
  cargo install --quiet --locked --root "$tools/cargo" "cargo-fuzz@$cargo_fuzz_version"
fi

say "all present"
