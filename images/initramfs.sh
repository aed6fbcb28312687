#!/usr/bin/env bash
# Builds the guest initramfs (a gzip'd newc cpio) into $1:
#   /init                    images/init (mounts, modules, marker, /hsev/run)
#   /bin/busybox + applets   Debian's busybox-static (pinned in lib.sh)
#   /lib/modules/...         the guest kernel's modules in $GUEST_MODULES and
#                            their dependencies (unpacked .ko), and
#                            /lib/modules/hsev-load-order (insmod order)
#   extra files              EXTRA_BINARIES and EXTRA_FILES, below
#
# Environment:
#   GUEST_MODULES   module names (default: configfs tsm sev-guest virtio_blk
#                   virtio_net dm-crypt xts aesni_intel vsock
#                   vmw_vsock_virtio_transport)
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
modules=(${GUEST_MODULES:-configfs tsm sev-guest virtio_blk virtio_net dm-crypt xts aesni_intel vsock vmw_vsock_virtio_transport})
kernel_root=$(prepare_kernel)
busybox=$(prepare_busybox)

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
  [ -f "$src" ] || fail "EXTRA_BINARIES: $src is not a file"
  install -D -m 0755 "$src" "$tree/$dest"
  local libraries
  if libraries=$(ldd "$src" 2>/dev/null); then
    # "libx.so.1 => /path/libx.so.1 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
    while read -r library; do
      [ -n "$library" ] || continue
      [ -e "$tree/$library" ] || install -D -m 0755 "$(readlink -f "$library")" "$tree/$library"
    done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$libraries" | sort -u)
    grep -q 'not found' <<<"$libraries" && fail "EXTRA_BINARIES: $src needs a library ldd cannot find: $(grep 'not found' <<<"$libraries")"
  fi
  return 0
}

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
