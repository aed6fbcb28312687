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
)

say() { printf 'deps: %s\n' "$*"; }

missing_apt=()
for package in "${!apt_packages[@]}"; do
  [ -e "${apt_packages[$package]}" ] || missing_apt+=("$package")
done

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
  DEBIAN_FRONTEND=noninteractive apt-get "${apt_options[@]}" -qq install -y \
    --no-install-recommends -t bookworm-backports "${missing_apt[@]}"
fi

# sev-snp-measure, the reference the measurement tests compare against.
if ! "$venv/bin/sev-snp-measure" --help >/dev/null 2>&1 ||
  ! "$venv/bin/pip" show sev-snp-measure 2>/dev/null | grep -qx "Version: $sev_snp_measure_version"; then
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
