#!/usr/bin/env bash
# Builds the SEV-SNP guest firmware: edk2's OvmfPkg/AmdSev/AmdSevX64.dsc
# from Debian trixie's edk2 source package, and writes it to $1.
#
# Why this build and not Debian's `ovmf` package: only the AmdSev platform
# carries the SNP_KERNEL_HASHES metadata section and the SEV hashes-table
# entry in its footer, and verifies the kernel, initrd and command line it
# gets from QEMU against that table (BlobVerifierLibSevHashes). That is what
# makes the kernel, initrd and cmdline part of the SNP launch measurement.
#
# The result is cached under .tools/images/firmware/<recipe hash>/ and reused
# until a pinned input, the build options or this script change.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

dest=${1:?usage: firmware.sh OUT.fd}
build_type=${FIRMWARE_BUILD_TYPE:-RELEASE}
toolchain=GCC5
platform=OvmfPkg/AmdSev/AmdSevX64.dsc
build_flags=(-a X64 -t "$toolchain" -b "$build_type" -p "$platform")
if [ "$build_type" = DEBUG ]; then build_flags+=(-D DEBUG_ON_SERIAL_PORT=TRUE); fi
# The GRUB modules edk2's OvmfPkg/AmdSev/Grub/grub.sh asks for, less
# `sevsecret`, which no GRUB release or Debian package has (it came from
# out-of-tree patches); see images/README.md.
grub_modules=(part_msdos part_gpt cryptodisk luks gcry_rijndael gcry_sha256 ext2
  btrfs xfs fat configfile memdisk sleep normal echo test regexp linux linuxefi reboot)
# Fixed timestamps make the GRUB memdisk (a FAT image) reproducible.
export SOURCE_DATE_EPOCH=1700000000
# The build happens at a fixed path: the PE images' debug directory keeps
# room for the path of each module's .dll (GenFw zeroes the text but not its
# length), so the firmware's bytes depend on the length of the build path.
# Built here, the same inputs give the same OVMF.fd from any checkout.
work=${EDK2_BUILD_DIR:-/var/tmp/hsev-edk2}

recipe=$(
  {
    echo "edk2 $edk2_version $edk2_orig_sha256 $edk2_debian_sha256"
    echo "grub $grub_version $grub_common_sha256 $grub_efi_sha256 ${grub_modules[*]}"
    echo "build ${build_flags[*]} in $work"
    cat "$0"
    for patch in "$images"/edk2/*.patch; do
      if [ -f "$patch" ]; then cat "$patch"; fi
    done
  } | sha256sum | cut -c1-16
)
firmware_cache="$cache/firmware/$recipe"

if [ -f "$firmware_cache/OVMF.fd" ]; then
  step "firmware: edk2 $edk2_version AmdSevX64 $build_type (cached, $firmware_cache)"
else
  started=$(date +%s)
  step "firmware: building edk2 $edk2_version $platform ($build_type); takes about 3 minutes on 2 cores"
  orig=$(fetch_pool "$edk2_pool" "$edk2_orig" "$edk2_orig_sha256")
  debian=$(fetch_pool "$edk2_pool" "$edk2_debian" "$edk2_debian_sha256")
  grub_common=$(fetch_deb grub-common "$grub_version" "$grub_common_sha256")
  grub_efi=$(fetch_deb grub-efi-amd64-bin "$grub_version" "$grub_efi_sha256")

  # One build at a time in $work, whichever checkout asks.
  mkdir -p "$(dirname "$work")"
  exec 8>"$work.lock"
  flock 8
  rm -rf "$work"
  mkdir -p "$work/src" "$work/grub"
  step "firmware: unpacking edk2 $edk2_version and applying Debian's patches"
  tar -xJf "$orig" -C "$work/src" --strip-components=1
  tar -xJf "$debian" -C "$work/src"
  # What dpkg-source -x does for a "3.0 (quilt)" package (the registry here
  # serves trixie's tarballs but not its .dsc, so apt-get source cannot run).
  while read -r patch _; do
    case $patch in '' | '#'*) continue ;; esac
    patch -d "$work/src" -p1 -s -N <"$work/src/debian/patches/$patch" ||
      fail "Debian patch $patch does not apply"
  done <"$work/src/debian/patches/series"
  for patch in "$images"/edk2/*.patch; do
    [ -f "$patch" ] || continue
    step "firmware: applying $(basename "$patch")"
    patch -d "$work/src" -p1 -s -N <"$patch" || fail "$patch does not apply"
  done

  step "firmware: grub.efi from Debian's GRUB $grub_version"
  dpkg-deb -x "$grub_common" "$work/grub"
  dpkg-deb -x "$grub_efi" "$work/grub"
  grub_dir="$work/src/OvmfPkg/AmdSev/Grub"
  (
    cd "$work"
    # grub.sh's own recipe: a memdisk holding grub.cfg, and a bootstrap
    # config that reads it.
    echo 'normal (memdisk)/grub.cfg' >grub-bootstrap.cfg
    cp "$grub_dir/grub.cfg" grub.cfg
    touch -d "@$SOURCE_DATE_EPOCH" grub.cfg
    mkfs.msdos --invariant -C disk.fat 64 >/dev/null
    MTOOLS_SKIP_CHECK=1 mcopy -m -i disk.fat grub.cfg ::grub.cfg
    "$work/grub/usr/bin/grub-mkimage" -d "$work/grub/usr/lib/grub/x86_64-efi" \
      -O x86_64-efi -p '(crypto0)' -c grub-bootstrap.cfg -m disk.fat \
      -o "$grub_dir/grub.efi" "${grub_modules[@]}"
  )
  # grub.sh, edk2's PREBUILD step, keeps a grub.efi newer than its inputs.
  touch "$grub_dir/grub.efi"

  log="$work/build.log"
  step "firmware: BaseTools"
  (
    cd "$work/src"
    unset WORKSPACE EDK_TOOLS_PATH CONF_PATH PACKAGES_PATH ELF_PACKAGE_METADATA
    export PYTHON_COMMAND=/usr/bin/python3
    make -C BaseTools/Source/C -j"$(nproc)" >"$log" 2>&1
  ) || fail "BaseTools failed: see $log"

  step "firmware: build ${build_flags[*]} (log: $log)"
  (
    cd "$work/src"
    unset WORKSPACE EDK_TOOLS_PATH CONF_PATH PACKAGES_PATH ELF_PACKAGE_METADATA
    export PYTHON_COMMAND=/usr/bin/python3
    set +u -- # edksetup.sh, sourced, would take this script's arguments as its own
    . ./edksetup.sh >>"$log" 2>&1
    exec build "${build_flags[@]}" -n "$(nproc)" >>"$log" 2>&1
  ) &
  builder=$!
  while kill -0 "$builder" 2>/dev/null; do
    for _ in $(seq 20); do
      sleep 1
      kill -0 "$builder" 2>/dev/null || break
    done
    kill -0 "$builder" 2>/dev/null &&
      step "firmware: building... $(grep -c '^Building \.\.\.' "$log" || true) modules and libraries so far, $(($(date +%s) - started)) s"
  done
  wait "$builder" || {
    tail -n 30 "$log" >&2
    fail "the edk2 build failed: see $log"
  }

  fd="$work/src/Build/AmdSev/${build_type}_$toolchain/FV/OVMF.fd"
  [ -f "$fd" ] || fail "the edk2 build wrote no $fd"
  mkdir -p "$firmware_cache.partial"
  cp "$fd" "$firmware_cache.partial/OVMF.fd"
  cp "$log" "$firmware_cache.partial/build.log"
  rm -rf "$firmware_cache"
  mv "$firmware_cache.partial" "$firmware_cache"
  [ "${KEEP_EDK2_TREE:-0}" = 1 ] || rm -rf "$work"
  flock -u 8
  step "firmware: built in $(($(date +%s) - started)) s"
fi

mkdir -p "$(dirname "$dest")"
cp "$firmware_cache/OVMF.fd" "$dest.partial"
install_if_changed "$dest.partial" "$dest"
