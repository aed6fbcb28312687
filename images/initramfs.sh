#!/usr/bin/env bash
# Builds the guest initramfs (a gzip'd newc cpio) into $1:
#   /init                    images/init (mounts, modules, acpid, marker,
#                            agent, /hsev/run)
#   /etc/acpid.conf          busybox acpid: the power button (PWRF) runs
#   /etc/acpi/power-button   images/power-button (closes the data disk,
#                            powers off)
#   /bin/busybox + applets   Debian's busybox-static (pinned in lib.sh)
#   /lib/modules/...         the guest kernel's modules in $GUEST_MODULES and
#                            their dependencies (unpacked .ko), and
#                            /lib/modules/hsev-load-order (insmod order)
#   /usr/bin/hsev-agent      the guest agent ($HSEV_AGENT, stripped), which
#                            /init runs to unlock the data disk
#   /usr/sbin/cryptsetup     the host's cryptsetup and mke2fs (cryptsetup-bin,
#   /usr/sbin/mke2fs         e2fsprogs), for the agent's LUKS2 disk and its ext4
#   extra files              EXTRA_BINARIES and EXTRA_FILES, below
# Each executable brings the shared libraries ldd finds for it.
#
# Environment:
#   HSEV_AGENT      the hsev-agent binary (default target/release/hsev-agent:
#                   `make image` builds it)
#   GUEST_MODULES   module names (default: configfs tsm sev-guest virtio_blk
#                   virtio_net dm-crypt xts aesni_intel algif_skcipher vsock
#                   vmw_vsock_virtio_transport evdev button)
#   EXTRA_BINARIES  "SRC[:DEST] ..." executables; DEST defaults to
#                   /usr/bin/<name>. A dynamically linked one brings the
#                   shared libraries ldd finds for it, and its loader. The
#                   agent goes in as e.g. "target/release/hsev-agent:/hsev/run".
#   EXTRA_FILES     "SRC:DEST ..." files or folders copied as they are.
#
# Reproducible: same inputs, same bytes (sorted entries, fixed owner and
# timestamps, gzip -n).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

dest=${1:?usage: initramfs.sh OUT.img}
# dm-crypt (with dm-mod) and xts for the LUKS2 data disk (AES, SHA-256 and
# ext4 are built into this kernel); algif_skcipher (with af_alg): cryptsetup
# decrypts LUKS2 keyslots through the kernel's user-space crypto API.
# evdev and button: the ACPI power button as /dev/input/event*, which acpid
# reads (QEMU's system_powerdown: hsevd's graceful stop).
modules=(${GUEST_MODULES:-configfs tsm sev-guest virtio_blk virtio_net dm-crypt xts aesni_intel algif_skcipher vsock vmw_vsock_virtio_transport evdev button})
agent=${HSEV_AGENT:-$root/target/release/hsev-agent}
[ -x "$agent" ] || fail "$agent is missing: run \`make image\` (cargo build --release -p hsev-agent)"
kernel_root=$(prepare_kernel)
busybox=$(prepare_busybox)
guest_tools=()
for tool in cryptsetup mke2fs; do
  found=$(command -v "$tool") || fail "$tool is missing: run \`make deps\`"
  guest_tools+=("$found")
done

staging=$(mktemp -d "$cache/.initramfs.XXXXXX")
trap 'rm -rf "$staging"' EXIT
tree="$staging/root"
mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc,root,hsev,lib/modules,usr/share/udhcpc}

# busybox and its applets, as links (busybox lists where each belongs).
install -m 0755 "$busybox" "$tree/bin/busybox"
while read -r applet; do
  [ -e "$tree/$applet" ] || ln -s /bin/busybox "$tree/$applet"
done < <("$busybox" --list-full | sort)
install -m 0755 "$images/init" "$tree/init"
install -m 0755 "$images/udhcpc.script" "$tree/usr/share/udhcpc/default.script"
# busybox acpid (started by /init): the power button's key is the event
# "PWRF" (its built-in map), which runs /etc/acpi/power-button.
install -D -m 0755 "$images/power-button" "$tree/etc/acpi/power-button"
printf 'PWRF power-button\n' >"$tree/etc/acpid.conf"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$tree/etc/passwd"
printf 'root:x:0:\n' >"$tree/etc/group"

# Kernel modules, dependencies first (modprobe reads the depmod'ed tree).
: >"$tree/lib/modules/hsev-load-order"
for module in "${modules[@]}"; do
  lines=$(modprobe -d "$kernel_root" -S "$kernel_release" --show-depends "$module" 2>&1) ||
    fail "kernel module $module: $lines"
  while read -r kind path _; do
    [ "$kind" = insmod ] || continue # "builtin NAME": nothing to load
    relative="$kernel_release/${path#*/lib/modules/"$kernel_release"/}"
    relative=${relative%.xz}
    grep -qxF "$relative" "$tree/lib/modules/hsev-load-order" && continue
    mkdir -p "$(dirname "$tree/lib/modules/$relative")"
    # Unpacked here (the initramfs is compressed whole): busybox insmod
    # would first hand the .xz to the kernel, which logs "Invalid ELF header
    # magic", then unpack it itself. Debian's signature stays appended.
    case $path in
      *.xz) xz -dc "$path" >"$tree/lib/modules/$relative" ;;
      *) cp "$path" "$tree/lib/modules/$relative" ;;
    esac
    chmod 0644 "$tree/lib/modules/$relative"
    echo "$relative" >>"$tree/lib/modules/hsev-load-order"
  done <<<"$lines"
done

# copy_with_libraries SRC DEST: an executable and what ldd says it needs.
copy_with_libraries() {
  local src=$1 dest=$2
  [ -f "$src" ] || fail "$src is not a file"
  rm -f "$tree/$dest" # a busybox applet link of the same name goes
  install -D -m 0755 "$src" "$tree/$dest"
  local libraries
  if libraries=$(ldd "$src" 2>/dev/null); then
    # "libx.so.1 => /path/libx.so.1 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
    while read -r library; do
      [ -n "$library" ] || continue
      [ -e "$tree/$library" ] || install -D -m 0755 "$(readlink -f "$library")" "$tree/$library"
    done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$libraries" | sort -u)
    grep -q 'not found' <<<"$libraries" && fail "$src needs a library ldd cannot find: $(grep 'not found' <<<"$libraries")"
  fi
  return 0
}

# The agent, stripped (the release build keeps line tables: a few MiB that
# TCG would decompress at every boot), and the tools it runs.
strip --strip-all -o "$staging/hsev-agent" "$agent"
copy_with_libraries "$staging/hsev-agent" /usr/bin/hsev-agent
for tool in "${guest_tools[@]}"; do
  name=$(basename "$tool")
  copy_with_libraries "$tool" "/usr/sbin/$name"
  # busybox's ext2-only mke2fs must not be found first on any PATH.
  for applet in "$tree/bin/$name" "$tree/sbin/$name" "$tree/usr/bin/$name"; do
    [ -L "$applet" ] && rm -f "$applet"
  done
done

for spec in ${EXTRA_BINARIES:-}; do
  src=${spec%%:*}
  target=${spec#*:}
  [ "$target" != "$spec" ] || target="/usr/bin/$(basename "$src")"
  copy_with_libraries "$src" "$target"
done
for spec in ${EXTRA_FILES:-}; do
  src=${spec%%:*}
  target=${spec#*:}
  [ "$target" != "$spec" ] && [ -n "$target" ] || fail "EXTRA_FILES wants SRC:DEST, not $spec"
  [ -e "$src" ] || fail "EXTRA_FILES: $src does not exist"
  mkdir -p "$(dirname "$tree/$target")"
  cp -a "$src" "$tree/$target"
done

# Fixed timestamps and owners, sorted entries: a reproducible archive.
find "$tree" -exec touch -h -d @0 {} +
(cd "$tree" && find . -mindepth 1 | LC_ALL=C sort |
  cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >"$dest.partial"
install_if_changed "$dest.partial" "$dest"
