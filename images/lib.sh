# Shared by the images/ scripts (sourced, not run): where things are cached,
# how progress is printed, and how pinned inputs are fetched from the
# Debian registry and checked.
#
# Every input is pinned by version and sha256 here, in one place; a bump is
# an edit of this file (see images/README.md, "Bumping a pinned input").

export PATH="$PATH:/usr/sbin:/sbin"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
images="$root/images"
cache=${IMAGE_CACHE:-$root/.tools/images}
downloads="$cache/downloads"

# --- pinned inputs ----------------------------------------------------------

# Guest kernel: Debian's 6.12 cloud kernel from bookworm-backports (SEV_GUEST
# and TSM_REPORTS as modules, VIRTIO_PCI and VIRTIO_CONSOLE built in).
kernel_package=linux-image-6.12.95+deb12-cloud-amd64
kernel_version=6.12.95-1~bpo12+1
kernel_release=6.12.95+deb12-cloud-amd64
kernel_sha256=69c92f43b23821de79576fa4d7c86e2924ae2c1b247a47cc5ed9339e220fbcb7

# The initramfs's userland.
busybox_package=busybox-static
busybox_version=1:1.35.0-4+deb12u1+b1
busybox_sha256=3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744

# grub-mkimage and GRUB's EFI modules, for the grub.efi that edk2's AmdSev
# firmware volume embeds (OvmfPkg/AmdSev/Grub).
grub_version=2.06-13+deb12u2
grub_common_sha256=fa2a91e48bb85effb1d9e22e16d83774e6de0ae6167268e8150e76ae963ec671
grub_efi_sha256=c04786d9f64fbf7cd181013266a8af52b463599cc54189915d03f1459e743135

# edk2: Debian trixie's source package (bookworm's 2022.11 has no
# SNP_KERNEL_HASHES metadata section). Its files, with the sha256 that
# trixie's signed Sources index gives for them.
edk2_version=2025.02-8+deb13u1
edk2_pool=pool/main/e/edk2
edk2_orig=edk2_2025.02.orig.tar.xz
edk2_orig_sha256=b63b6053d6d89c74d9291f9e96fde1584be99e6fb9c169ba9511505129d6b049
edk2_debian=edk2_2025.02-8+deb13u1.debian.tar.xz
edk2_debian_sha256=e2a7f6fc58640818416a028d6d5e9dfc255697a7cdc60c14566c236df6bd9b08

# --- progress ---------------------------------------------------------------

step() { printf 'image: %s\n' "$*"; }
fail() {
  printf 'image: error: %s\n' "$*" >&2
  exit 1
}

# --- Debian registry access (private apt configuration, never the system's) --

. "$root/scripts/lib/debian-apt.sh"

debian_mirror() { private_apt_mirror || fail "no Debian mirror configured on this system"; }

apt_dir="$cache/apt"
private_apt_init "$apt_dir"
apt_updated=0
apt_update() {
  [ "$apt_updated" = 1 ] && return 0
  step "apt: updating the private package index ($apt_dir)"
  private_apt_update || fail "cannot update the private package index in $apt_dir"
  apt_updated=1
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch_deb PACKAGE VERSION SHA256 -> prints the path of the cached .deb.
# Downloaded with `apt-get download` (apt checks it against the signed
# index), then checked against the pinned sha256.
fetch_deb() {
  local package=$1 version=$2 sha256=$3
  local file="$downloads/${package}_${version//:/%3a}_amd64.deb"
  if [ -f "$file" ] && [ "$(sha256_of "$file")" = "$sha256" ]; then
    printf '%s\n' "$file"
    return 0
  fi
  mkdir -p "$downloads"
  local tmp
  tmp=$(mktemp -d "$downloads/.fetch.XXXXXX")
  if [ ! -f "$apt_dir/sources.list" ] || ! apt-cache "${private_apt_options[@]}" show "$package=$version" >/dev/null 2>&1; then
    apt_update >&2
  fi
  step "download: $package $version" >&2
  (cd "$tmp" && apt-get "${private_apt_options[@]}" -qq download "$package=$version" 2>&1 |
    grep -v 'unsandboxed as root' >&2 || true)
  local got
  got=$(find "$tmp" -name '*.deb' | head -n1)
  [ -n "$got" ] || {
    rm -rf "$tmp"
    fail "apt-get download $package=$version failed (is the version still in the archive? see images/README.md)"
  }
  [ "$(sha256_of "$got")" = "$sha256" ] || {
    rm -rf "$tmp"
    fail "$package $version: sha256 $(sha256_of "$got") is not the pinned $sha256"
  }
  mv "$got" "$file"
  rm -rf "$tmp"
  printf '%s\n' "$file"
}

# fetch_pool POOL_DIR FILE SHA256 -> prints the path of the cached file.
# For source package files: fetched from the mirror's pool and checked
# against the pinned sha256 (the value of the suite's signed Sources index).
fetch_pool() {
  local pool=$1 name=$2 sha256=$3
  local file="$downloads/$name"
  if [ -f "$file" ] && [ "$(sha256_of "$file")" = "$sha256" ]; then
    printf '%s\n' "$file"
    return 0
  fi
  mkdir -p "$downloads"
  local url
  url="$(debian_mirror)/$pool/$name"
  step "download: $url" >&2
  curl -fsSL --retry 3 -o "$file.partial" "$url" || fail "cannot fetch $url"
  [ "$(sha256_of "$file.partial")" = "$sha256" ] || {
    rm -f "$file.partial"
    fail "$name: sha256 is not the pinned $sha256"
  }
  mv "$file.partial" "$file"
  printf '%s\n' "$file"
}

# Replaces DEST by SRC only when their bytes differ, so that an unchanged
# artifact keeps its timestamp (and a rerun changes nothing).
install_if_changed() {
  local src=$1 dest=$2
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    rm -f "$src"
  else
    mv -f "$src" "$dest"
  fi
}

# --- unpacked inputs --------------------------------------------------------

# prepare_kernel -> prints the root of the unpacked kernel package (boot/
# and lib/modules/$kernel_release/, with modules.dep made by depmod).
prepare_kernel() {
  local tree="$cache/kernel/$kernel_release"
  if [ "$(cat "$tree/.sha256" 2>/dev/null)" != "$kernel_sha256" ]; then
    local deb
    deb=$(fetch_deb "$kernel_package" "$kernel_version" "$kernel_sha256")
    step "kernel: unpacking $kernel_package $kernel_version" >&2
    rm -rf "$tree"
    mkdir -p "$tree/root"
    dpkg-deb -x "$deb" "$tree/root"
    depmod -b "$tree/root" "$kernel_release"
    echo "$kernel_sha256" >"$tree/.sha256"
  fi
  printf '%s\n' "$tree/root"
}

# prepare_busybox -> prints the path of the pinned static busybox.
prepare_busybox() {
  local tree="$cache/busybox/${busybox_version//:/_}"
  if [ "$(cat "$tree/.sha256" 2>/dev/null)" != "$busybox_sha256" ]; then
    local deb
    deb=$(fetch_deb "$busybox_package" "$busybox_version" "$busybox_sha256")
    rm -rf "$tree"
    mkdir -p "$tree/root"
    dpkg-deb -x "$deb" "$tree/root"
    echo "$busybox_sha256" >"$tree/.sha256"
  fi
  printf '%s\n' "$tree/root/bin/busybox"
}
